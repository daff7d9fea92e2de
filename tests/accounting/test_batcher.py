"""Waiting events share transactions, one row per request_id; a refused event fails alone."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.accounting.batcher import LedgerBatcher, RetryPolicy, first_writes
from services.accounting.errors import LedgerUnavailable
from services.accounting.ledger import create_schema, get_usage, record_usage
from services.common.db import make_engine
from tests.accounting.helpers import Batches, count_rows, eventually, make_usage

FAST = RetryPolicy(attempts=2, backoff_s=0.01, backoff_max_s=0.01, timeout_s=5)


def test_the_first_new_event_of_a_request_made_its_row_the_others_are_duplicates() -> None:
    known, new, other = make_usage(), make_usage(), make_usage()
    again = make_usage(request_id=new.request_id)
    inserted = {new.request_id, other.request_id}

    assert first_writes([known, new, again, other], inserted) == [False, True, False, True]


def test_a_request_id_the_insert_did_not_return_is_a_duplicate_every_time() -> None:
    event = make_usage()

    assert first_writes([event, event], set()) == [False, False]


async def test_events_waiting_together_share_one_transaction(ledger: AsyncEngine) -> None:
    known = make_usage()
    await record_usage(ledger, known)
    new, other = make_usage(prompt_tokens=5), make_usage()
    again = make_usage(request_id=new.request_id, prompt_tokens=500)
    batcher = LedgerBatcher(ledger, FAST, max_batch=256)
    batches = Batches()
    try:
        # gather() starts all four before the writer task it spawns gets to run.
        results = await asyncio.gather(*(batcher.record(e) for e in (known, new, again, other)))
    finally:
        await batcher.aclose()

    assert results == [False, True, False, True]
    assert batches.since() == (1, 4)
    assert await count_rows(ledger) == 3
    row = await get_usage(ledger, new.request_id)
    assert row is not None
    assert row.prompt_tokens == 5


async def test_a_lone_event_is_written_in_a_transaction_of_its_own(ledger: AsyncEngine) -> None:
    batcher = LedgerBatcher(ledger, FAST, max_batch=256)
    batches = Batches()
    try:
        assert await batcher.record(make_usage()) is True
    finally:
        await batcher.aclose()

    assert batches.since() == (1, 1)


async def test_max_batch_caps_the_events_of_one_transaction(ledger: AsyncEngine) -> None:
    batcher = LedgerBatcher(ledger, FAST, max_batch=3)
    batches = Batches()
    try:
        results = await asyncio.gather(*(batcher.record(make_usage()) for _ in range(7)))
    finally:
        await batcher.aclose()

    assert results == [True] * 7
    assert batches.since() == (3, 7)  # 3 + 3 + 1
    assert await count_rows(ledger) == 7


async def test_an_event_the_database_refuses_does_not_fail_the_others(ledger: AsyncEngine) -> None:
    good = [make_usage() for _ in range(5)]
    bad = make_usage(prompt_tokens=2**63)  # beyond the column on both databases
    batcher = LedgerBatcher(ledger, FAST, max_batch=256)
    try:
        results = await asyncio.gather(
            *(batcher.record(e) for e in (*good[:2], bad, *good[2:])), return_exceptions=True
        )
    finally:
        await batcher.aclose()

    assert results[:2] + results[3:] == [True] * 5
    assert isinstance(results[2], LedgerUnavailable)
    assert "gave up after 2 tries" in str(results[2])
    assert await count_rows(ledger) == 5


async def test_retry_gives_up_after_its_attempts(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)  # no schema: every write fails
    policy = RetryPolicy(attempts=3, backoff_s=0.01, backoff_max_s=0.02, timeout_s=5)
    batcher = LedgerBatcher(engine, policy, max_batch=256)
    try:
        results = await asyncio.gather(
            *(batcher.record(make_usage()) for _ in range(3)), return_exceptions=True
        )
    finally:
        await batcher.aclose()
        await engine.dispose()

    assert all(isinstance(r, LedgerUnavailable) for r in results), results
    assert all("gave up after 3 tries" in str(r) for r in results)


async def test_retry_records_once_the_database_is_back(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(sqlite_url)
    events = [make_usage() for _ in range(3)]
    policy = RetryPolicy(attempts=200, backoff_s=0.02, backoff_max_s=0.02, timeout_s=5)
    caplog.set_level(logging.WARNING, logger="services.accounting.batcher")
    batcher = LedgerBatcher(engine, policy, max_batch=256)
    try:
        writes = asyncio.gather(*(batcher.record(e) for e in events))

        async def failed_once() -> bool | None:
            return any("retrying" in r.getMessage() for r in caplog.records) or None

        await eventually(failed_once, timeout_s=10, what="a failed try")
        await create_schema(engine)

        assert await asyncio.wait_for(writes, 10) == [True] * 3
        assert await count_rows(engine) == 3
    finally:
        await batcher.aclose()
        await engine.dispose()


async def test_closing_fails_the_events_still_waiting(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)  # no schema: the write keeps failing and retrying
    policy = RetryPolicy(attempts=1000, backoff_s=0.05, backoff_max_s=0.05, timeout_s=5)
    batcher = LedgerBatcher(engine, policy, max_batch=256)
    try:
        writes = asyncio.gather(
            *(batcher.record(make_usage()) for _ in range(3)), return_exceptions=True
        )
        await asyncio.sleep(0.2)

        await batcher.aclose()

        results = await asyncio.wait_for(writes, 5)
    finally:
        await engine.dispose()

    assert [str(r) for r in results] == ["the ledger writer stopped"] * 3


def test_a_batch_holds_one_event_at_least(sqlite_url: str) -> None:
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        LedgerBatcher(make_engine(sqlite_url), FAST, max_batch=0)
