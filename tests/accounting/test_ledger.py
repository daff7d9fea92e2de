"""The ledger keeps exactly one row per request_id, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.codec import message_decoder
from services.accounting.errors import LedgerUnavailable
from services.accounting.ledger import (
    create_schema,
    get_usage,
    ping,
    record_batch,
    record_usage,
    usage_conflicts,
)
from services.common.db import make_engine
from tests.accounting.helpers import count_rows, make_usage


async def test_same_event_twice_makes_one_row(ledger: AsyncEngine) -> None:
    event = make_usage()

    assert await record_usage(ledger, event) is True
    assert await record_usage(ledger, event) is False

    assert await count_rows(ledger) == 1
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
    assert await count_rows(ledger) == 1


async def test_a_batch_writes_each_request_once_and_returns_the_new_ones(
    ledger: AsyncEngine,
) -> None:
    known = make_usage()
    await record_usage(ledger, known)
    first = make_usage(prompt_tokens=5)
    again = make_usage(request_id=first.request_id, prompt_tokens=500)
    other = make_usage()

    inserted = await record_batch(ledger, [known, first, again, other])

    assert inserted == {first.request_id, other.request_id}
    assert await count_rows(ledger) == 3
    row = await get_usage(ledger, first.request_id)
    assert row is not None
    assert row.prompt_tokens == 5


async def test_an_empty_batch_writes_nothing(ledger: AsyncEngine) -> None:
    assert await record_batch(ledger, []) == set()


async def test_a_row_the_database_cannot_hold_fails_its_batch_as_unavailable(
    ledger: AsyncEngine,
) -> None:
    good = make_usage()
    huge = make_usage(prompt_tokens=2**63)  # beyond SQLite's INTEGER and PostgreSQL's integer

    with pytest.raises(LedgerUnavailable, match="cannot record usage"):
        await record_batch(ledger, [good, huge])

    assert await get_usage(ledger, good.request_id) is None  # one transaction: nothing written


async def test_unknown_request_has_no_row(ledger: AsyncEngine) -> None:
    assert await get_usage(ledger, "no-such-request") is None


async def test_create_schema_twice_keeps_rows(ledger: AsyncEngine) -> None:
    await record_usage(ledger, make_usage())

    await create_schema(ledger)

    assert await count_rows(ledger) == 1


async def test_unreachable_database_is_reported_as_unavailable() -> None:
    engine = make_engine("postgresql+asyncpg://first:first@127.0.0.1:1/first")
    try:
        with pytest.raises(LedgerUnavailable, match="cannot record usage"):
            await record_usage(engine, make_usage())
        with pytest.raises(LedgerUnavailable, match="cannot reach the ledger"):
            await ping(engine)
    finally:
        await engine.dispose()


def conflicts_counted() -> float:
    return REGISTRY.get_sample_value("first_accounting_ledger_conflicts_total") or 0.0


async def parked(ledger: AsyncEngine, request_id: str) -> list[tuple[str, str, bytes]]:
    table = usage_conflicts
    query = sa.select(table.c.user_id, table.c.owner_user_id, table.c.event).where(
        table.c.request_id == request_id
    )
    async with ledger.connect() as conn:
        return [tuple(row) for row in (await conn.execute(query)).all()]


async def test_an_id_billed_to_one_user_is_refused_for_another_and_parked(
    ledger: AsyncEngine,
) -> None:
    """A usage event claiming someone else's request id bills nobody and is kept, loudly."""
    alice = make_usage()
    mallory = make_usage(
        request_id=alice.request_id, user_id="u-mallory", username="mallory", prompt_tokens=900
    )
    await record_usage(ledger, alice)
    counted = conflicts_counted()

    assert await record_batch(ledger, [mallory, alice]) == set()  # alice's: a redelivery

    row = await get_usage(ledger, alice.request_id)
    assert row is not None
    assert (row.user_id, row.prompt_tokens) == ("u-alice", alice.prompt_tokens)
    [(user_id, owner, event)] = await parked(ledger, alice.request_id)
    assert (user_id, owner) == ("u-mallory", "u-alice")
    assert message_decoder.decode(event) == mallory
    assert conflicts_counted() == counted + 1


async def test_a_redelivery_of_the_owners_own_event_parks_nothing(ledger: AsyncEngine) -> None:
    event = make_usage()
    await record_usage(ledger, event)
    counted = conflicts_counted()
    assert await record_usage(ledger, event) is False
    assert await parked(ledger, event.request_id) == []
    assert conflicts_counted() == counted
