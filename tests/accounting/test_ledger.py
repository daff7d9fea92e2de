"""The ledger keeps exactly one row per request_id, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import logging

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from services.accounting.errors import LedgerUnavailable
from services.accounting.ledger import (
    RetryPolicy,
    create_schema,
    get_usage,
    record_usage,
    record_with_retry,
    usage_ledger,
)
from services.common.db import make_engine
from tests.accounting.helpers import eventually, make_usage


async def _row_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(
            (await conn.execute(sa.select(sa.func.count()).select_from(usage_ledger))).scalar_one()
        )


async def test_same_event_twice_makes_one_row(ledger: AsyncEngine) -> None:
    event = make_usage()

    assert await record_usage(ledger, event) is True
    assert await record_usage(ledger, event) is False

    assert await _row_count(ledger) == 1
    row = await get_usage(ledger, event.request_id)
    assert row is not None
    assert (row.user_id, row.username, row.model, row.site_id) == (
        event.user_id,
        event.username,
        event.model,
        event.site_id,
    )
    assert (row.endpoint, row.priority, row.outcome) == (
        "chat.completions",
        "interactive",
        "completed",
    )
    assert (row.prompt_tokens, row.completion_tokens) == (11, 7)
    assert (row.created_at, row.finished_at) == (event.created_at, event.finished_at)
    assert row.recorded_at > 0


async def test_redelivery_with_other_numbers_keeps_the_first_row(ledger: AsyncEngine) -> None:
    first = make_usage(prompt_tokens=5, completion_tokens=3)
    again = make_usage(request_id=first.request_id, prompt_tokens=500, completion_tokens=300)

    await record_usage(ledger, first)
    assert await record_usage(ledger, again) is False

    row = await get_usage(ledger, first.request_id)
    assert row is not None
    assert (row.prompt_tokens, row.completion_tokens) == (5, 3)


async def test_concurrent_deliveries_of_one_event_insert_it_once(ledger: AsyncEngine) -> None:
    event = make_usage()

    inserted = await asyncio.gather(*(record_usage(ledger, event) for _ in range(8)))

    assert sorted(inserted) == [False] * 7 + [True]
    assert await _row_count(ledger) == 1


async def test_unknown_request_has_no_row(ledger: AsyncEngine) -> None:
    assert await get_usage(ledger, "no-such-request") is None


async def test_create_schema_twice_keeps_rows(ledger: AsyncEngine) -> None:
    await record_usage(ledger, make_usage())

    await create_schema(ledger)

    assert await _row_count(ledger) == 1


async def test_unreachable_database_is_reported_as_unavailable() -> None:
    engine = make_engine("postgresql+asyncpg://first:first@127.0.0.1:1/first")
    try:
        with pytest.raises(LedgerUnavailable, match="cannot record usage"):
            await record_usage(engine, make_usage())
    finally:
        await engine.dispose()


async def test_retry_gives_up_after_its_attempts(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)  # no schema: every write fails
    policy = RetryPolicy(attempts=3, backoff_s=0.01, backoff_max_s=0.02, timeout_s=5)
    try:
        with pytest.raises(LedgerUnavailable, match="gave up after 3 tries"):
            await record_with_retry(engine, make_usage(), policy)
    finally:
        await engine.dispose()


async def test_retry_records_once_the_database_is_back(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(sqlite_url)
    event = make_usage()
    policy = RetryPolicy(attempts=200, backoff_s=0.02, backoff_max_s=0.02, timeout_s=5)
    caplog.set_level(logging.WARNING, logger="services.accounting.ledger")
    try:
        write = asyncio.create_task(record_with_retry(engine, event, policy))

        async def failed_once() -> bool | None:
            return any("retrying" in r.getMessage() for r in caplog.records) or None

        await eventually(failed_once, timeout_s=10, what="a failed try")
        await create_schema(engine)

        assert await asyncio.wait_for(write, 10) is True
        assert await get_usage(engine, event.request_id) is not None
    finally:
        await engine.dispose()
