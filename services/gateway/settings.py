"""Gateway settings (env prefix FIRST_GATEWAY_, shared ones FIRST_; who may ask for what is
services/access/settings.py, FIRST_ACCESS_)."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.common.db import DEFAULT_DATABASE_URL
from services.common.settings import CommonSettings


class Settings(CommonSettings):
    """What the gateway needs; every wait has a bound here."""

    model_config = SettingsConfigDict(env_prefix="FIRST_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = Field(  # files, batches and the usage the gateway reports
        default=DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices(
            "FIRST_GATEWAY_DATABASE_URL", "FIRST_ACCOUNTING_DATABASE_URL"
        ),
    )
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
