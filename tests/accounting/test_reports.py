"""Reports sum the ledger by user, model, site, UTC day and kind, and render as table, CSV, JSON."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from typer.testing import CliRunner

from services.accounting.cli import usage_app
from services.accounting.errors import InvalidReport
from services.accounting.ledger import create_schema, record_usage
from services.accounting.reports import ReportBy, ReportRow, render, usage_report
from services.common.db import is_sqlite, make_engine, normalise_url
from tests.accounting.helpers import make_usage


def _epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


# Alice's first request finishes one second before midnight UTC, her second at midnight.
EVENTS = (
    make_usage(
        user_id="u-alice",
        model="model-a",
        site_id="site-1",
        priority="interactive",
        prompt_tokens=10,
        completion_tokens=5,
        finished_at=_epoch("2024-03-01T23:59:59"),
    ),
    make_usage(
        user_id="u-alice",
        model="model-b",
        site_id="site-2",
        priority="batch",
        prompt_tokens=20,
        completion_tokens=7,
        finished_at=_epoch("2024-03-02T00:00:00"),
    ),
    make_usage(
        user_id="u-bob",
        model="model-a",
        site_id="site-2",
        priority="interactive",
        prompt_tokens=3,
        completion_tokens=4,
        outcome="cancelled",
        finished_at=_epoch("2024-03-02T12:00:00"),
    ),
)


def _row(key: str, requests: int, prompt: int, completion: int) -> ReportRow:
    return ReportRow(
        key=key,
        requests=requests,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
    )


@pytest.fixture
async def filled(ledger: AsyncEngine) -> AsyncEngine:
    for event in EVENTS:
        await record_usage(ledger, event)
    return ledger


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        ("user", [_row("u-alice", 2, 30, 12), _row("u-bob", 1, 3, 4)]),
        ("model", [_row("model-a", 2, 13, 9), _row("model-b", 1, 20, 7)]),
        ("site", [_row("site-1", 1, 10, 5), _row("site-2", 2, 23, 11)]),
        ("day", [_row("2024-03-01", 1, 10, 5), _row("2024-03-02", 2, 23, 11)]),
        ("kind", [_row("batch", 1, 20, 7), _row("interactive", 2, 13, 9)]),
    ],
)
async def test_report_sums_each_group(
    filled: AsyncEngine, by: ReportBy, expected: list[ReportRow]
) -> None:
    assert await usage_report(filled, by) == expected


async def test_day_is_the_utc_date_whatever_the_sessions_time_zone(database_url: str) -> None:
    if is_sqlite(database_url):
        engine = make_engine(database_url)  # strftime(…, 'unixepoch') is UTC by definition
    else:
        zone = {"server_settings": {"timezone": "Pacific/Auckland"}}
        engine = create_async_engine(normalise_url(database_url), connect_args=zone)
    try:
        await create_schema(engine)
        for event in EVENTS:
            await record_usage(engine, event)

        rows = await usage_report(engine, "day")
    finally:
        await engine.dispose()

    assert [(r.key, r.requests) for r in rows] == [("2024-03-01", 1), ("2024-03-02", 2)]


async def test_since_keeps_requests_finished_from_that_utc_day(filled: AsyncEngine) -> None:
    rows = await usage_report(filled, "user", since=dt.date(2024, 3, 2))

    assert rows == [_row("u-alice", 1, 20, 7), _row("u-bob", 1, 3, 4)]


async def test_user_filter_keeps_one_users_requests(filled: AsyncEngine) -> None:
    rows = await usage_report(filled, "model", user_id="u-bob")

    assert rows == [_row("model-a", 1, 3, 4)]


async def test_empty_ledger_reports_no_rows(ledger: AsyncEngine) -> None:
    assert await usage_report(ledger, "day") == []


async def test_unknown_grouping_is_invalid(ledger: AsyncEngine) -> None:
    with pytest.raises(InvalidReport, match="cannot group usage by 'planet'"):
        await usage_report(ledger, "planet")  # type: ignore[arg-type]


ROWS = [_row("u-alice", 2, 30, 12), _row("u-bob", 1, 3, 4)]


def test_table_aligns_columns_and_adds_a_total() -> None:
    assert render(ROWS, "table", "user") == (
        "user     requests  prompt_tokens  completion_tokens  total_tokens\n"
        "u-alice         2             30                 12            42\n"
        "u-bob           1              3                  4             7\n"
        "TOTAL           3             33                 16            49\n"
    )


def test_table_of_no_rows_has_header_and_zero_total() -> None:
    assert render([], "table", "day").splitlines() == [
        "day    requests  prompt_tokens  completion_tokens  total_tokens",
        "TOTAL         0              0                  0             0",
    ]


def test_csv_names_its_key_column_after_the_grouping() -> None:
    parsed = list(csv.reader(io.StringIO(render(ROWS, "csv", "user"))))

    assert parsed == [
        ["user", "requests", "prompt_tokens", "completion_tokens", "total_tokens"],
        ["u-alice", "2", "30", "12", "42"],
        ["u-bob", "1", "3", "4", "7"],
    ]


def test_json_lists_rows_under_data() -> None:
    assert json.loads(render(ROWS, "json", "kind")) == {
        "by": "kind",
        "data": [
            {
                "key": "u-alice",
                "requests": 2,
                "prompt_tokens": 30,
                "completion_tokens": 12,
                "total_tokens": 42,
            },
            {
                "key": "u-bob",
                "requests": 1,
                "prompt_tokens": 3,
                "completion_tokens": 4,
                "total_tokens": 7,
            },
        ],
    }


def test_unknown_format_is_invalid() -> None:
    with pytest.raises(InvalidReport, match="cannot render a report as 'xml'"):
        render(ROWS, "xml", "user")  # type: ignore[arg-type]


async def _fill_sqlite(url: str) -> None:
    engine = make_engine(url)
    try:
        await create_schema(engine)
        for event in EVENTS:
            await record_usage(engine, event)
    finally:
        await engine.dispose()


async def test_cli_prints_the_report_of_the_given_database(sqlite_url: str) -> None:
    await _fill_sqlite(sqlite_url)
    args = ["report", "--by", "day", "--since", "2024-03-02", "--format", "csv"]

    result = await asyncio.to_thread(
        CliRunner().invoke, usage_app, [*args, "--database-url", sqlite_url]
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "day,requests,prompt_tokens,completion_tokens,total_tokens",
        "2024-03-02,2,23,11,34",
    ]


async def test_cli_reads_the_database_url_from_the_environment(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _fill_sqlite(sqlite_url)
    monkeypatch.setenv("FIRST_ACCOUNTING_DATABASE_URL", sqlite_url)

    result = await asyncio.to_thread(
        CliRunner().invoke, usage_app, ["report", "--by", "kind", "--format", "json"]
    )

    assert result.exit_code == 0, result.output
    assert [row["key"] for row in json.loads(result.stdout)["data"]] == ["batch", "interactive"]


async def test_cli_reports_an_unreachable_database_as_an_error() -> None:
    url = "postgresql+asyncpg://first:first@127.0.0.1:1/first"

    result = await asyncio.to_thread(
        CliRunner().invoke, usage_app, ["report", "--database-url", url]
    )

    assert result.exit_code == 1
    assert "error: cannot read the ledger" in result.stderr
