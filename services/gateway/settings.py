"""Gateway settings (env prefix FIRST_GATEWAY_, shared ones FIRST_)."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.common.db import DEFAULT_DATABASE_URL
from services.common.settings import CommonSettings

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


class Settings(CommonSettings):
    """What the gateway needs; every wait has a bound here."""

    model_config = SettingsConfigDict(env_prefix="FIRST_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices(
            "FIRST_GATEWAY_DATABASE_URL", "FIRST_ACCOUNTING_DATABASE_URL"
        ),
    )
    models: list[CatalogueModel] = Field(default_factory=lambda: list(DEFAULT_CATALOGUE))
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens_cap: int | None = None
    """The most `max_tokens` (or `max_completion_tokens`) a request may ask for; None: no cap."""
    no_site_wait_s: float = 5.0
    """How long a request for a known model waits for a live site before a 503."""
    retry_after_s: int = 5
    first_record_timeout_s: float = 300.0
    """Bound on waiting for the first stream record (queueing + time to first token)."""
    record_timeout_s: float = 120.0
    """Bound on the gap between two stream records."""
    read_block_ms: int = 1000
    redis_give_up_s: float = 3.0
    """After Redis has been unreachable this long, in-flight requests end with a 503 error."""
    apikey_cache_ttl_s: float = 60.0
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
    registry_cache_s: float = 0.5

    # Files and batches (services/gateway/batch_*.py; the worker is `first batch-worker`).
    batch_dir: str = ".first/files"
    """Where uploaded and result files live (services/gateway/filestore.py)."""
    batch_max_lines: int = 50_000
    batch_max_file_bytes: int = 200 * 1024 * 1024
    batch_expiry_s: float = 86400.0
    """How long a batch runs before it expires; the API accepts only `24h`, tests shorten it."""
    batch_window: int = 128
    """Lines of one batch published but not yet ended: several batches interleave at the router."""
    batch_poll_s: float = 1.0
    """How often the worker looks at its batches."""
    batch_sweep_after_s: float = 60.0
    """A line published this long ago without a reply is looked up in its Redis stream."""
    batch_republish_after_s: float = 300.0
    """... and republished (same request_id) when its stream is still empty after this long."""
    batch_cancel_grace_s: float = 10.0
    """A cancelled batch's in-flight lines get this long to finish before they are cancelled."""
    batch_worker_host: str = "127.0.0.1"
    batch_worker_port: int = 8050
