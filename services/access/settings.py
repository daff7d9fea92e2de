"""Who may ask for what: settings shared by every component that admits requests.

The gateway (HTTP) and the router (`first.ingress`) both admit with these; each process reads
them from the FIRST_ACCESS_* environment in its `__main__` and hands them to its factory, so
the two doors apply one policy and neither reads the other's environment.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.db import DEFAULT_DATABASE_URL

ModelKind = Literal["chat", "embedding"]


class CatalogueModel(BaseModel):
    """One model the service offers; `sites` empty means any site may serve it."""

    name: str
    owned_by: str = "first"
    context_length: int = 2048
    kind: ModelKind = "chat"
    sites: list[str] = []
    groups: list[str] = []
    """Globus group ids whose members may use the model (with `domains`: either suffices)."""
    domains: list[str] = []
    """Identity-provider domains whose users may use the model. Both empty: every caller."""


class Limits(BaseModel):
    """Limits of one user or one group (a shared allocation); None: no limit of that kind."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None


DEFAULT_CATALOGUE = [
    CatalogueModel(name="smollm2-135m", owned_by="HuggingFaceTB", context_length=2048),
    CatalogueModel(
        name="all-minilm-l6-v2",
        owned_by="sentence-transformers",
        context_length=256,
        kind="embedding",
    ),
]


class AccessSettings(BaseSettings):
    """API keys, Globus Auth, the catalogue and its policy, limits (env prefix FIRST_ACCESS_)."""

    model_config = SettingsConfigDict(
        env_prefix="FIRST_ACCESS_", extra="ignore", populate_by_name=True
    )

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices("FIRST_ACCESS_DATABASE_URL", "FIRST_ACCOUNTING_DATABASE_URL"),
    )
    """Where API keys live (by default the ledger's database)."""
    models: list[CatalogueModel] = Field(default_factory=lambda: list(DEFAULT_CATALOGUE))
    max_tokens_cap: int | None = None
    """The most `max_tokens` (or `max_completion_tokens`) a request may ask for; None: no cap."""
    apikey_cache_ttl_s: float = 60.0
    cache_secret: SecretStr = SecretStr("")
    """Seals the principals and verdicts cached in Redis (services/access/sealed.py); only the
    admitting components (gateway, router, batch worker) hold it. Empty: a random secret per
    process (entries then serve only the process that wrote them; set it for replicas)."""
    request_id_skew_s: float = Field(default=600.0, gt=0)
    """A direct producer's request id (a UUIDv7) is accepted only within this of the router's
    clock; ids are reserved for twice as long (services/access/request_ids.py)."""
    globus_client_id: str = ""
    """The gateway's confidential client (a Globus Auth resource server); empty: API keys only."""
    globus_client_secret: SecretStr = SecretStr("")
    globus_auth_url: str | None = None
    """globus-sdk's `base_url` for Globus Auth; None is globus.org (tests and `first dev` use
    the local fake, `first fake-globus`)."""
    globus_groups_url: str | None = None
    globus_audience: str = ""
    """The audience a token must carry; empty means the client id."""
    globus_required_scope: str = ""
    """A scope string the token must include; empty: not checked."""
    globus_domains: list[str] = Field(default_factory=list)
    """Identity-provider domains allowed to use the service at all (e.g. anl.gov); empty: any."""
    globus_cache_ttl_s: float = 60.0
    """How long an introspection verdict is reused: a revoked token stops within this."""
    globus_timeout_s: float = 5.0
    user_limits: Limits = Field(default_factory=Limits)
    """Every user's limits, unless `user_limit_overrides` names the user (by user id)."""
    user_limit_overrides: dict[str, Limits] = Field(default_factory=dict)
    group_limits: dict[str, Limits] = Field(default_factory=dict)
    """Shared allocations by Globus group id: every member's usage counts against them."""
