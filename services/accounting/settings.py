"""Settings of the accounting service (env prefix FIRST_ACCOUNTING_, shared ones FIRST_)."""

from __future__ import annotations

from pydantic import Field
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
    prefetch: int = 512
    """Unacked usage events the consumer holds at most.

    Twice `max_batch`: under load one batch is in flight while the next one forms from the
    deliveries that keep arriving, so a smaller prefetch caps the batches below `max_batch`.
    """
    max_batch: int = Field(default=256, ge=1)
    """Usage events written in one ledger transaction at most."""
    db_timeout_s: float = 10.0
    """Bound on one try of a ledger write (one batch, split if the database refuses it)."""
    db_retry_attempts: int = 8
    """Tries per batch before its events go back to the queue."""
    db_retry_backoff_s: float = 0.5
    """First pause between two tries; doubles each time up to `db_retry_backoff_max_s`.

    With the defaults one delivery rides out about a minute of database outage, and the
    queue's delivery limit multiplies that before the event is dead-lettered.
    """
    db_retry_backoff_max_s: float = 30.0
