"""The usage ledger: one row per request_id, written once, whatever the redeliveries.

Times are epoch seconds (UTC) stored as double precision: `created_at` and `finished_at`
come from the event as the site agent measured them, `recorded_at` is when the ledger
took the row. Reports group a day by the UTC date of `finished_at`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Final

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.messages import UsageRecorded
from services.accounting.errors import LedgerUnavailable, UnsupportedDatabase

logger = logging.getLogger(__name__)

metadata: Final = sa.MetaData()

usage_ledger: Final = sa.Table(
    "usage_ledger",
    metadata,
    sa.Column("request_id", sa.String, primary_key=True),
    sa.Column("user_id", sa.String, nullable=False),
    sa.Column("username", sa.String, nullable=False),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("site_id", sa.String, nullable=False),
    sa.Column("endpoint", sa.String, nullable=False),
    sa.Column("priority", sa.String, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("outcome", sa.String, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("finished_at", sa.Double, nullable=False),
    sa.Column("recorded_at", sa.Double, nullable=False),
    sa.Index("ix_usage_ledger_finished_at", "finished_at"),
    sa.Index("ix_usage_ledger_user_id_finished_at", "user_id", "finished_at"),
)

_EVENT_COLUMNS: Final = tuple(col.name for col in usage_ledger.c if col.name != "recorded_at")

# Everything a database or its driver raises when it cannot do the work right now;
# asyncpg lets OSError through when the server is unreachable.
DB_ERRORS: Final = (SQLAlchemyError, OSError)


def describe(exc: BaseException) -> str:
    """Return the first line of a database error (SQLAlchemy appends the statement)."""
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the ledger."""

    request_id: str
    user_id: str
    username: str
    model: str
    site_id: str
    endpoint: str
    priority: str
    prompt_tokens: int
    completion_tokens: int
    outcome: str
    created_at: float
    finished_at: float
    recorded_at: float


def _check_dialect(engine: AsyncEngine) -> str:
    dialect = engine.dialect.name
    if dialect not in ("postgresql", "sqlite"):
        raise UnsupportedDatabase(f"the ledger needs SQLite or PostgreSQL, not {dialect}")
    return dialect


async def create_schema(engine: AsyncEngine) -> None:
    """Create the ledger table and its indexes if they do not exist."""
    _check_dialect(engine)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    except DB_ERRORS as exc:
        raise LedgerUnavailable(f"cannot create the ledger schema: {describe(exc)}") from exc


def _insert_once(engine: AsyncEngine, values: dict[str, object]) -> sa.Insert:
    """Return INSERT … ON CONFLICT (request_id) DO NOTHING RETURNING request_id."""
    key = [usage_ledger.c.request_id]
    if _check_dialect(engine) == "postgresql":
        pg = postgresql.insert(usage_ledger).values(values)
        return pg.on_conflict_do_nothing(index_elements=key).returning(*key)
    lite = sqlite.insert(usage_ledger).values(values)
    return lite.on_conflict_do_nothing(index_elements=key).returning(*key)


async def record_usage(engine: AsyncEngine, event: UsageRecorded) -> bool:
    """Insert the event's row; return False if its request_id was already recorded."""
    values: dict[str, object] = {name: getattr(event, name) for name in _EVENT_COLUMNS}
    values["recorded_at"] = time.time()
    try:
        async with engine.begin() as conn:
            result = await conn.execute(_insert_once(engine, values))
            return result.first() is not None
    except DB_ERRORS as exc:
        raise LedgerUnavailable(f"cannot record usage: {describe(exc)}") from exc


async def get_usage(engine: AsyncEngine, request_id: str) -> LedgerEntry | None:
    """Return the ledger row of one request, if there is one."""
    query = sa.select(usage_ledger).where(usage_ledger.c.request_id == request_id)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(query)).first()
    except DB_ERRORS as exc:
        raise LedgerUnavailable(f"cannot read the ledger: {describe(exc)}") from exc
    return None if row is None else LedgerEntry(**row._mapping)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How long a ledger write may take and how often it is tried, with doubling pauses."""

    attempts: int = 8
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    timeout_s: float = 10.0


async def record_with_retry(engine: AsyncEngine, event: UsageRecorded, policy: RetryPolicy) -> bool:
    """Record the event as `record_usage` does, retrying while the database is unavailable.

    Raises LedgerUnavailable once `policy.attempts` tries have failed or timed out.
    """
    pause = policy.backoff_s
    for attempt in range(1, policy.attempts + 1):
        try:
            async with asyncio.timeout(policy.timeout_s):
                return await record_usage(engine, event)
        except (LedgerUnavailable, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {policy.timeout_s}s"
            if attempt == policy.attempts:
                raise LedgerUnavailable(f"gave up after {attempt} tries: {reason}") from exc
            logger.warning(
                "ledger write failed (try %d of %d), retrying in %.2fs: %s",
                attempt,
                policy.attempts,
                pause,
                reason,
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, policy.backoff_max_s)
    raise LedgerUnavailable("no try was allowed (attempts < 1)")
