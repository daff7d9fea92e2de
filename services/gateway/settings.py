"""Gateway settings (env prefix FIRST_GATEWAY_, shared ones FIRST_)."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, Field
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
    registry_cache_s: float = 0.5
