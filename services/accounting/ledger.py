"""The usage ledger: one row per request_id, written once, whatever the redeliveries.

Times are epoch seconds (UTC) stored as double precision: `created_at` and `finished_at`
come from the event as the site agent measured them, `recorded_at` is when the ledger
took the row. Reports group a day by the UTC date of `finished_at`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Final

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from schemas.codec import encode
from schemas.messages import UsageRecorded
from services.accounting.errors import LedgerUnavailable, UnsupportedDatabase
from services.accounting.metrics import LEDGER_CONFLICTS
from services.common.db import create_tables

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

usage_conflicts: Final = sa.Table(
    "usage_conflicts",
    metadata,
    sa.Column("request_id", sa.String, primary_key=True),
    sa.Column("user_id", sa.String, primary_key=True),
    sa.Column("owner_user_id", sa.String, nullable=False),
    sa.Column("event", sa.LargeBinary, nullable=False),
    sa.Column("recorded_at", sa.Double, nullable=False),
)
"""Usage events refused because their request_id is billed to another user: parked here, with
the event as it came (msgpack), for an operator; never billed, never dropped."""

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
        await create_tables(engine, metadata)
    except DB_ERRORS as exc:
        raise LedgerUnavailable(f"cannot create the ledger schema: {describe(exc)}") from exc


def _insert_new(dialect: str) -> sa.Insert:
    """Return INSERT … ON CONFLICT (request_id) DO NOTHING RETURNING request_id."""
    key = [usage_ledger.c.request_id]
    if dialect == "postgresql":
        return (
            postgresql.insert(usage_ledger)
            .on_conflict_do_nothing(index_elements=key)
            .returning(*key)
        )
    return sqlite.insert(usage_ledger).on_conflict_do_nothing(index_elements=key).returning(*key)


# Built once: the statement is the same for every batch, and SQLAlchemy caches its
# compiled form (executemany spreads the rows over multi-row VALUES, "insertmanyvalues").
_INSERT_NEW: Final = {dialect: _insert_new(dialect) for dialect in ("postgresql", "sqlite")}

# What a write can raise besides DB_ERRORS: sqlite3 refuses an int beyond 64 bits with a
# plain OverflowError, before SQLAlchemy could wrap it.
_WRITE_ERRORS: Final = (*DB_ERRORS, OverflowError)


async def _park_conflicts(
    conn: AsyncConnection, events: dict[str, UsageRecorded], inserted: set[str], at: float
) -> None:
    """Park the events whose request_id the ledger already bills to another user.

    A request id is owned (services/access/request_ids.py); one that arrives under a second
    user is an attack or a bug, never a redelivery, and is refused loudly.
    """
    repeated = [key for key in events if key not in inserted]
    if not repeated:
        return
    query = sa.select(usage_ledger.c.request_id, usage_ledger.c.user_id).where(
        usage_ledger.c.request_id.in_(repeated)
    )
    owners = {key: user for key, user in (await conn.execute(query)).all()}
    parked = [
        {
            "request_id": key,
            "user_id": events[key].user_id,
            "owner_user_id": owners[key],
            "event": encode(events[key]),
            "recorded_at": at,
        }
        for key in repeated
        if key in owners and owners[key] != events[key].user_id
    ]
    if not parked:
        return
    dialect = conn.dialect.name
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(usage_conflicts)
    await conn.execute(insert.on_conflict_do_nothing(), parked)
    for row in parked:
        LEDGER_CONFLICTS.inc()
        logger.error(
            "usage refused: request %s is billed to user %s, not to %s; event parked in %s",
            row["request_id"],
            row["owner_user_id"],
            row["user_id"],
            usage_conflicts.name,
        )


async def record_batch(engine: AsyncEngine, events: Sequence[UsageRecorded]) -> set[str]:
    """Insert the events' rows in one transaction; return the request_ids that were new.

    Of several events with one request_id only the first is written. An event whose
    request_id is already billed to another user is parked (`usage_conflicts`), not billed.
    Raises LedgerUnavailable if the transaction did not commit (then nothing was written).
    """
    statement = _INSERT_NEW[_check_dialect(engine)]
    if not events:
        return set()  # SQLAlchemy would run an empty executemany as one INSERT without values
    recorded_at = time.time()
    rows: dict[str, dict[str, object]] = {}
    firsts: dict[str, UsageRecorded] = {}
    for event in events:
        if event.request_id not in rows:
            row: dict[str, object] = {name: getattr(event, name) for name in _EVENT_COLUMNS}
            row["recorded_at"] = recorded_at
            rows[event.request_id] = row
            firsts[event.request_id] = event
    # Rows in key order: two writers (replicas, or a redelivery racing its original) that
    # insert overlapping request_ids then take PostgreSQL's index locks in the same order
    # and cannot deadlock.
    ordered = [rows[key] for key in sorted(rows)]
    try:
        async with engine.begin() as conn:
            result = await conn.execute(statement, ordered)
            inserted = set(result.scalars().all())
            await _park_conflicts(conn, firsts, inserted, recorded_at)
            return inserted
    except _WRITE_ERRORS as exc:
        raise LedgerUnavailable(f"cannot record usage: {describe(exc)}") from exc


async def record_usage(engine: AsyncEngine, event: UsageRecorded) -> bool:
    """Insert one event's row; return False if its request_id was already recorded."""
    return event.request_id in await record_batch(engine, [event])


async def ping(engine: AsyncEngine) -> None:
    """Run `SELECT 1`; raise LedgerUnavailable if the database does not answer it."""
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except DB_ERRORS as exc:
        raise LedgerUnavailable(f"cannot reach the ledger: {describe(exc)}") from exc


async def get_usage(engine: AsyncEngine, request_id: str) -> LedgerEntry | None:
    """Return the ledger row of one request, if there is one."""
    query = sa.select(usage_ledger).where(usage_ledger.c.request_id == request_id)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(query)).first()
    except DB_ERRORS as exc:
        raise LedgerUnavailable(f"cannot read the ledger: {describe(exc)}") from exc
    return None if row is None else LedgerEntry(**row._mapping)
