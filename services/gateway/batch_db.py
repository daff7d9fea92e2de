"""Files, batches and batch lines in SQL (SQLAlchemy core, async; PostgreSQL or SQLite).

A batch line's row is the unit of exactly-once: its `request_id` is written before the line is
published (a republish reuses it), and its result is written only while the line is not yet
`done` — so a reply delivered twice, or a reply and the sweeper's read of the same stream,
change the row once.

Line states: pending (not yet published) -> published (request_id set) -> done.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from services.common.db import create_tables

LineState = Literal["pending", "published", "done"]

metadata = sa.MetaData()
files = sa.Table(
    "batch_files",
    metadata,
    sa.Column("file_id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(200), nullable=False, index=True),
    sa.Column("filename", sa.String(500), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("url", sa.String(64), nullable=False, default=""),
    sa.Column("lines", sa.Integer, nullable=False, default=0),
)
STEP_TIMES: Final = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
"""When a batch reached each status (OpenAI's timestamps; None until it does)."""
BATCH_TIMES: Final = ("created_at", "expires_at", *STEP_TIMES)

batches = sa.Table(
    "batches",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(200), nullable=False, index=True),
    sa.Column("username", sa.String(200), nullable=False),
    sa.Column("groups", sa.Text, nullable=False, default="[]"),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", sa.String(64), nullable=False),
    sa.Column("completion_window", sa.String(8), nullable=False),
    sa.Column("metadata", sa.Text, nullable=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("errors", sa.Text, nullable=True),
    sa.Column("output_file_id", sa.String(64), nullable=True),
    sa.Column("error_file_id", sa.String(64), nullable=True),
    *(sa.Column(name, sa.Float, nullable=name != "created_at") for name in BATCH_TIMES),
)
lines = sa.Table(
    "batch_lines",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("line_no", sa.Integer, primary_key=True),
    sa.Column("custom_id", sa.String(500), nullable=False),
    sa.Column("request_id", sa.String(32), nullable=True, unique=True),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("published_at", sa.Float, nullable=True),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("response", sa.LargeBinary, nullable=True),
    sa.Column("error_code", sa.String(64), nullable=True),
    sa.Column("error_message", sa.Text, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.UniqueConstraint("batch_id", "custom_id", name="uq_batch_lines_custom_id"),
    sa.Index("ix_batch_lines_state", "batch_id", "state"),
)


class FileRow(msgspec.Struct, frozen=True, kw_only=True):
    file_id: str
    user_id: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    url: str = ""
    lines: int = 0


class BatchRow(msgspec.Struct, frozen=True, kw_only=True):
    batch_id: str
    user_id: str
    username: str
    groups: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: str | None
    status: str
    total: int
    errors: str | None
    output_file_id: str | None
    error_file_id: str | None
    created_at: float
    expires_at: float | None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None


class LineRow(msgspec.Struct, frozen=True, kw_only=True):
    batch_id: str
    line_no: int
    custom_id: str
    request_id: str | None
    body: bytes
    state: str
    published_at: float | None
    status_code: int | None
    response: bytes | None
    error_code: str | None
    error_message: str | None


def _row(kind: type[Any], row: sa.RowMapping) -> Any:
    return kind(**{f: row[f] for f in kind.__struct_fields__})


async def create_schema(engine: AsyncEngine) -> None:
    """Create the tables if they are missing."""
    await create_tables(engine, metadata)


async def insert_file(engine: AsyncEngine, row: FileRow) -> None:
    """Insert a file's row; an existing id is left as it is (result files are rewritten)."""
    async with engine.begin() as conn:
        found = await conn.execute(sa.select(files.c.file_id).where(files.c.file_id == row.file_id))
        if found.first() is None:
            await conn.execute(files.insert().values(**msgspec.structs.asdict(row)))


async def get_file(engine: AsyncEngine, file_id: str) -> FileRow | None:
    async with engine.connect() as conn:
        row = (await conn.execute(files.select().where(files.c.file_id == file_id))).mappings()
        first = row.first()
    return None if first is None else _row(FileRow, first)


async def list_files(engine: AsyncEngine, user_id: str, purpose: str | None) -> list[FileRow]:
    query = files.select().where(files.c.user_id == user_id)
    if purpose:
        query = query.where(files.c.purpose == purpose)
    async with engine.connect() as conn:
        rows = (await conn.execute(query.order_by(files.c.created_at.desc()))).mappings()
        return [_row(FileRow, r) for r in rows]


async def delete_file(engine: AsyncEngine, file_id: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(files.delete().where(files.c.file_id == file_id))


async def insert_batch(engine: AsyncEngine, row: BatchRow) -> None:
    async with engine.begin() as conn:
        await conn.execute(batches.insert().values(**msgspec.structs.asdict(row)))


async def get_batch(engine: AsyncEngine, batch_id: str) -> BatchRow | None:
    async with engine.connect() as conn:
        rows = await conn.execute(batches.select().where(batches.c.batch_id == batch_id))
        first = rows.mappings().first()
    return None if first is None else _row(BatchRow, first)


async def list_batches(
    engine: AsyncEngine, user_id: str, after: str | None, limit: int
) -> list[BatchRow]:
    """Return up to `limit` of the user's batches, newest first, after the id `after`."""
    query = batches.select().where(batches.c.user_id == user_id)
    if after:
        query = query.where(batches.c.batch_id < after)  # ids are time-ordered (UUIDv7)
    query = query.order_by(batches.c.batch_id.desc()).limit(limit)
    async with engine.connect() as conn:
        return [_row(BatchRow, r) for r in (await conn.execute(query)).mappings()]


async def batches_in(engine: AsyncEngine, statuses: Sequence[str]) -> list[BatchRow]:
    query = batches.select().where(batches.c.status.in_(statuses)).order_by(batches.c.batch_id)
    async with engine.connect() as conn:
        return [_row(BatchRow, r) for r in (await conn.execute(query)).mappings()]


async def update_batch(
    engine: AsyncEngine, batch_id: str, *, only_if: Sequence[str] = (), **values: Any
) -> bool:
    """Update a batch (only while its status is one of `only_if`, if given); True if it was."""
    query = batches.update().where(batches.c.batch_id == batch_id).values(**values)
    if only_if:
        query = query.where(batches.c.status.in_(only_if))
    async with engine.begin() as conn:
        return (await conn.execute(query)).rowcount > 0


async def line_counts(engine: AsyncEngine, batch_id: str) -> dict[str, int]:
    """Return the batch's lines by outcome: pending, published, completed (2xx), failed."""
    ok = sa.and_(lines.c.state == "done", lines.c.status_code.between(200, 299))
    kind = sa.case(
        (ok, "completed"), (lines.c.state == "done", "failed"), else_=lines.c.state
    ).label("kind")
    query = sa.select(kind, sa.func.count()).where(lines.c.batch_id == batch_id).group_by(kind)
    async with engine.connect() as conn:
        return {str(k): int(n) for k, n in (await conn.execute(query)).all()}


async def has_lines(engine: AsyncEngine, batch_id: str) -> bool:
    query = sa.select(lines.c.line_no).where(lines.c.batch_id == batch_id).limit(1)
    async with engine.connect() as conn:
        return (await conn.execute(query)).first() is not None


async def insert_lines(
    engine: AsyncEngine, batch_id: str, items: Iterable[tuple[int, str, bytes]]
) -> None:
    """Insert the batch's lines (line_no, custom_id, body) pending, in one transaction."""
    rows = [
        {"batch_id": batch_id, "line_no": n, "custom_id": c, "body": b, "state": "pending"}
        for n, c, b in items
    ]
    async with engine.begin() as conn:
        for start in range(0, len(rows), 1000):
            await conn.execute(lines.insert(), rows[start : start + 1000])


async def lines_in(
    engine: AsyncEngine, batch_id: str, state: LineState, limit: int | None = None
) -> list[LineRow]:
    query = (
        lines.select()
        .where(lines.c.batch_id == batch_id, lines.c.state == state)
        .order_by(lines.c.line_no)
    )
    if limit is not None:
        query = query.limit(limit)
    async with engine.connect() as conn:
        return [_row(LineRow, r) for r in (await conn.execute(query)).mappings()]


async def all_lines(engine: AsyncEngine, batch_id: str) -> list[LineRow]:
    query = lines.select().where(lines.c.batch_id == batch_id).order_by(lines.c.line_no)
    async with engine.connect() as conn:
        return [_row(LineRow, r) for r in (await conn.execute(query)).mappings()]


async def assign(
    engine: AsyncEngine, batch_id: str, line_no: int, request_id: str, now: float
) -> bool:
    """Give a pending line its request_id (before it is published); False if not pending."""
    query = (
        lines.update()
        .where(lines.c.batch_id == batch_id, lines.c.line_no == line_no)
        .where(lines.c.state == "pending")
        .values(request_id=request_id, state="published", published_at=now)
    )
    async with engine.begin() as conn:
        return (await conn.execute(query)).rowcount > 0


async def touch(engine: AsyncEngine, request_id: str, now: float) -> None:
    """Note that a published line was published again (same request_id)."""
    query = lines.update().where(lines.c.request_id == request_id).values(published_at=now)
    async with engine.begin() as conn:
        await conn.execute(query)


async def record_result(
    engine: AsyncEngine,
    request_id: str,
    *,
    status_code: int,
    response: bytes,
    now: float,
) -> bool:
    """Write a line's result once: True if this call ended the line, False if it was ended."""
    query = (
        lines.update()
        .where(lines.c.request_id == request_id, lines.c.state != "done")
        .values(state="done", status_code=status_code, response=response, finished_at=now)
    )
    async with engine.begin() as conn:
        return (await conn.execute(query)).rowcount > 0


async def record_expired(engine: AsyncEngine, request_id: str, *, message: str, now: float) -> bool:
    """End a line `batch_expired` if its batch's expiry has passed: True if this call ended it.

    A line that fails because its batch expired (the router's 503 for a line it held past the
    expiry, a site's "expired before start") is marked like the lines that never ran.
    """
    expired = sa.select(batches.c.batch_id).where(batches.c.expires_at <= now)
    query = (
        lines.update()
        .where(lines.c.request_id == request_id, lines.c.state != "done")
        .where(lines.c.batch_id.in_(expired.scalar_subquery()))
        .values(state="done", error_code="batch_expired", error_message=message, finished_at=now)
    )
    async with engine.begin() as conn:
        return (await conn.execute(query)).rowcount > 0


async def end_lines(
    engine: AsyncEngine,
    batch_id: str,
    states: Sequence[LineState],
    *,
    code: str,
    message: str,
    now: float,
) -> list[str]:
    """End the batch's lines in `states` with an error; return the request_ids among them."""
    where = sa.and_(lines.c.batch_id == batch_id, lines.c.state.in_(states))
    async with engine.begin() as conn:
        ids = await conn.execute(sa.select(lines.c.request_id).where(where))
        found = [r for (r,) in ids.all() if r]
        await conn.execute(
            lines.update()
            .where(where)
            .values(state="done", error_code=code, error_message=message, finished_at=now)
        )
    return found


async def stale_lines(engine: AsyncEngine, published_before: float, limit: int) -> list[LineRow]:
    """Return published lines (of any batch) published before `published_before`."""
    query = (
        lines.select()
        .where(lines.c.state == "published", lines.c.published_at < published_before)
        .order_by(lines.c.published_at)
        .limit(limit)
    )
    async with engine.connect() as conn:
        return [_row(LineRow, r) for r in (await conn.execute(query)).mappings()]


async def end_lines_by_no(
    engine: AsyncEngine, batch_id: str, line_no: int, *, code: str, message: str, now: float
) -> None:
    """End one pending line with an error (it never ran)."""
    query = (
        lines.update()
        .where(lines.c.batch_id == batch_id, lines.c.line_no == line_no)
        .where(lines.c.state == "pending")
        .values(state="done", error_code=code, error_message=message, finished_at=now)
    )
    async with engine.begin() as conn:
        await conn.execute(query)
