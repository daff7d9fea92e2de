"""Per-model access policy (pure): who may see and use a catalogue model."""

from __future__ import annotations

from services.access.principal import Principal
from services.access.settings import CatalogueModel


def may_use(principal: Principal, model: CatalogueModel) -> bool:
    """Tell whether `principal` may see and use `model`.

    A model with neither `groups` nor `domains` is open to every authenticated caller; else
    membership of one listed Globus group or an identity from one listed domain suffices.
    Admins see everything (they operate the service). API-key callers carry no groups and no
    domain, so restricted models are Globus-only.
    """
    if principal.is_admin or not (model.groups or model.domains):
        return True
    if principal.domain and principal.domain in {d.lower() for d in model.domains}:
        return True
    return any(group in model.groups for group in principal.groups)
