"""Settings of the accounting service (env prefix FIRST_ACCOUNTING_, shared ones FIRST_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.db import DEFAULT_DATABASE_URL
from services.common.settings import CommonSettings


class Settings(CommonSettings):
    """Where the ledger lives, how the consumer retries, and where /health listens."""

    model_config = SettingsConfigDict(
        env_prefix="FIRST_ACCOUNTING_", extra="ignore", populate_by_name=True
    )

    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = 8030
    prefetch: int = 64
    """Unacked usage events the consumer holds (and writes concurrently) at most."""
    db_timeout_s: float = 10.0
    """Bound on one ledger write."""
    db_retry_attempts: int = 8
    """Writes tried per delivery before the event goes back to the queue."""
    db_retry_backoff_s: float = 0.5
    """First pause between two tries; doubles each time up to `db_retry_backoff_max_s`.

    With the defaults one delivery rides out about a minute of database outage, and the
    queue's delivery limit multiplies that before the event is dead-lettered.
    """
    db_retry_backoff_max_s: float = 30.0
