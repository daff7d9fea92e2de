"""What admits a request, whichever door it came through (HTTP here, `first.ingress` at the
router): the body's checks, the catalogue and its access policy, and the job it becomes."""

from __future__ import annotations

from schemas.messages import Endpoint, RunInference
from schemas.names import Priority
from services.gateway.errors import NotFound
from services.gateway.policy import may_use
from services.gateway.principal import Principal
from services.gateway.settings import CatalogueModel
from services.gateway.validation import AnyRequest, check_max_tokens, include_usage, parse_body


def model_not_found(model: str) -> NotFound:
    return NotFound(
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def check_request(
    endpoint: Endpoint,
    body: bytes,
    principal: Principal,
    catalogue: dict[str, CatalogueModel],
    max_tokens_cap: int | None,
) -> tuple[AnyRequest, CatalogueModel]:
    """Return the parsed body and its catalogue entry, or raise the ApiError to answer."""
    parsed = parse_body(endpoint, body)
    check_max_tokens(parsed, max_tokens_cap)
    entry = catalogue.get(parsed.model)
    if entry is None or not may_use(principal, entry):
        raise model_not_found(parsed.model)  # a model the caller may not use does not exist
    return parsed, entry


def job_for(
    principal: Principal,
    endpoint: Endpoint,
    parsed: AnyRequest,
    body: bytes,
    entry: CatalogueModel,
    *,
    request_id: str,
    priority: Priority,
    created_at: float,
    expires_at: float,
    reply_to: str = "",
) -> RunInference:
    """Return the RunInference an admitted request travels as (no credential in it)."""
    return RunInference(
        request_id=request_id,
        user_id=principal.user_id,
        username=principal.username,
        groups=principal.groups,
        model=parsed.model,
        endpoint=endpoint,
        priority=priority,
        stream=bool(getattr(parsed, "stream", False)),
        include_usage=include_usage(parsed),
        body=body,
        created_at=created_at,
        expires_at=expires_at,
        allowed_sites=tuple(entry.sites),
        reply_to=reply_to,
    )
