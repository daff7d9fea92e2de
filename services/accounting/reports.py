"""Usage reports: token sums grouped by user, model, site, UTC day or kind, and their rendering."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any, Final, Literal, get_args

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from services.accounting.errors import InvalidReport, LedgerUnavailable
from services.accounting.ledger import DB_ERRORS, describe, usage_ledger

ReportBy = Literal["user", "model", "site", "day", "kind"]
ReportFormat = Literal["table", "csv", "json"]
REPORT_BYS: Final[tuple[ReportBy, ...]] = get_args(ReportBy)
REPORT_FORMATS: Final[tuple[ReportFormat, ...]] = get_args(ReportFormat)
COLUMNS: Final = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


class ReportRow(msgspec.Struct, frozen=True, kw_only=True):
    """Totals of one group: `key` is a user_id, model, site_id, YYYY-MM-DD (UTC) or priority."""

    key: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class utc_day(FunctionElement[str]):
    """SQL expression: the UTC date (YYYY-MM-DD) of an epoch-seconds column."""

    type = sa.String()
    name = "utc_day"
    inherit_cache = True


@compiles(utc_day, "sqlite")
def _utc_day_sqlite(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"strftime('%Y-%m-%d', {compiler.process(element.clauses, **kw)}, 'unixepoch')"


@compiles(utc_day, "postgresql")
def _utc_day_postgresql(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"to_char(to_timestamp({seconds}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


def _group_key(by: ReportBy) -> sa.ColumnElement[str]:
    c = usage_ledger.c
    keys: dict[str, sa.ColumnElement[str]] = {
        "user": c.user_id,
        "model": c.model,
        "site": c.site_id,
        "kind": c.priority,
        "day": utc_day(c.finished_at),
    }
    if by not in keys:
        raise InvalidReport(f"cannot group usage by {by!r}; choose one of {', '.join(REPORT_BYS)}")
    return keys[by]


def _epoch(day: dt.date) -> float:
    return dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC).timestamp()


async def usage_report(
    engine: AsyncEngine,
    by: ReportBy,
    since: dt.date | None = None,
    user_id: str | None = None,
) -> list[ReportRow]:
    """Sum requests and tokens per group, ordered by key.

    `since` keeps requests that finished on or after that UTC date; `user_id` keeps one user's.
    """
    c = usage_ledger.c
    key = _group_key(by)
    query = (
        sa.select(
            key.label("key"),
            sa.func.count().label("requests"),
            sa.func.sum(c.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(c.completion_tokens).label("completion_tokens"),
        )
        .group_by(key)
        .order_by(key)
    )
    if since is not None:
        query = query.where(c.finished_at >= _epoch(since))
    if user_id is not None:
        query = query.where(c.user_id == user_id)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(query)
            rows = result.all()
    except DB_ERRORS as exc:
        raise LedgerUnavailable(f"cannot read the ledger: {describe(exc)}") from exc
    return [
        ReportRow(
            key=str(row.key),
            requests=int(row.requests),
            prompt_tokens=int(row.prompt_tokens),
            completion_tokens=int(row.completion_tokens),
            total_tokens=int(row.prompt_tokens) + int(row.completion_tokens),
        )
        for row in rows
    ]


def _cells(row: ReportRow) -> list[str]:
    return [row.key, *(str(getattr(row, name)) for name in COLUMNS)]


def _table(rows: list[ReportRow], by: ReportBy) -> str:
    total = ReportRow(
        key="TOTAL",
        **{name: sum(getattr(r, name) for r in rows) for name in COLUMNS},
    )
    lines = [[by, *COLUMNS], *(_cells(r) for r in rows), _cells(total)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for line in lines:
        first = line[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True))
        out.append("  ".join([first, *rest]))
    return "\n".join(out) + "\n"


def _csv(rows: list[ReportRow], by: ReportBy) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([by, *COLUMNS])
    writer.writerows(_cells(r) for r in rows)
    return buffer.getvalue()


def render(rows: list[ReportRow], fmt: ReportFormat, by: ReportBy) -> str:
    """Render a report as an aligned table (with a TOTAL line), CSV or JSON.

    CSV's first column is named after `by`; JSON is `{"by": by, "data": [ReportRow, …]}`.
    """
    if fmt == "table":
        return _table(rows, by)
    if fmt == "csv":
        return _csv(rows, by)
    if fmt == "json":
        return msgspec.json.encode({"by": by, "data": rows}).decode() + "\n"
    raise InvalidReport(
        f"cannot render a report as {fmt!r}; choose one of {', '.join(REPORT_FORMATS)}"
    )
