"""Bursts through a real RabbitMQ: shared transactions, duplicates, poison and an outage."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx
from faststream.rabbit import RabbitBroker
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas import names
from schemas.messages import SiteHeartbeat, UsageRecorded
from services.accounting.batcher import RetryPolicy
from services.accounting.ledger import create_schema, record_usage
from services.common.db import make_engine
from tests.accounting.helpers import Batches, count_rows, eventually, make_usage
from tests.accounting.test_handlers import (
    _dead_queue_path,
    _peek_dead,
    _send,
    _send_poison,
    _settled,
    _settled_at_least,
    running_consumer,
)
from tests.site_agent.helpers import queue_depth

QUEUE = names.ACCOUNTING_USAGE_QUEUE


async def _queue_empty_before(channel: Any) -> None:
    # The events are queued before the consumer starts, so that they reach it at once.
    assert await queue_depth(channel, QUEUE) == 0, "events left over from an earlier test"


async def _publish_all(broker: RabbitBroker, events: list[UsageRecorded]) -> None:
    await asyncio.gather(*(_send(broker, event) for event in events))


async def _all_acked(channel: Any) -> bool:
    # After the consumer stopped, an unacked delivery would be back in the queue; give the
    # broker a moment to requeue it.
    await asyncio.sleep(0.5)
    return await queue_depth(channel, QUEUE) == 0


async def test_a_burst_is_written_in_shared_transactions_one_row_per_event(
    rabbit_url: str, broker: RabbitBroker, channel: Any, ledger: AsyncEngine
) -> None:
    events = [make_usage() for _ in range(200)]
    await _queue_empty_before(channel)
    recorded = _settled("recorded")
    batches = Batches()

    await _publish_all(broker, events)
    async with running_consumer(rabbit_url, ledger, prefetch=64, max_batch=16):
        await _settled_at_least("recorded", recorded + len(events))

    transactions, written = batches.since()
    assert written == len(events)
    assert transactions < len(events) / 2, "events did not share transactions"
    assert batches.within(16) == transactions, "a transaction held more than max_batch"
    assert _settled("recorded") - recorded == len(events)
    assert await count_rows(ledger, (e.request_id for e in events)) == len(events)
    assert await _all_acked(channel)


async def test_duplicates_in_a_burst_are_written_once_and_all_acked(
    rabbit_url: str, broker: RabbitBroker, channel: Any, ledger: AsyncEngine
) -> None:
    known = make_usage()  # already in the ledger: a re-publish
    await record_usage(ledger, known)
    twice = make_usage()  # its copies arrive in the same burst
    others = [make_usage() for _ in range(20)]
    burst = [known, twice, twice, *others, known, twice]
    await _queue_empty_before(channel)
    recorded, duplicates = _settled("recorded"), _settled("duplicate")

    await _publish_all(broker, burst)
    async with running_consumer(rabbit_url, ledger, prefetch=64):
        await _settled_at_least("duplicate", duplicates + 4)
        await _settled_at_least("recorded", recorded + 21)

    assert (_settled("recorded") - recorded, _settled("duplicate") - duplicates) == (21, 4)
    ids = {e.request_id for e in burst}
    assert await count_rows(ledger, ids) == len(ids) == 22
    assert await _all_acked(channel)


async def test_poison_inside_a_burst_is_dead_lettered_and_the_others_written(
    rabbit_url: str,
    broker: RabbitBroker,
    channel: Any,
    rabbit_api: httpx.Client,
    ledger: AsyncEngine,
) -> None:
    before, after = [make_usage() for _ in range(20)], [make_usage() for _ in range(20)]
    garbage_id = f"garbage-{secrets.token_hex(4)}"
    heartbeat_id = f"heartbeat-{secrets.token_hex(4)}"
    heartbeat = SiteHeartbeat(site_id="local", agent_id="a1", sent_at=1.0, interval_s=5.0)
    await _queue_empty_before(channel)
    recorded, rejected = _settled("recorded"), _settled("rejected")

    await _publish_all(broker, before)
    await _send_poison(broker, garbage_id, heartbeat, heartbeat_id)
    await _publish_all(broker, after)
    async with running_consumer(rabbit_url, ledger, prefetch=64):
        await _settled_at_least("recorded", recorded + 40)
        await _settled_at_least("rejected", rejected + 2)

    assert await count_rows(ledger, (e.request_id for e in before + after)) == 40
    assert await _all_acked(channel)
    path = _dead_queue_path(rabbit_url)

    async def dead_lettered() -> bool | None:
        ids = {m["properties"].get("message_id") for m in await _peek_dead(rabbit_api, path)}
        return {garbage_id, heartbeat_id} <= ids or None

    await eventually(dead_lettered, what="both poison messages in first.dead")


async def test_a_burst_during_an_outage_is_requeued_and_written_once_the_database_is_back(
    rabbit_url: str, broker: RabbitBroker, channel: Any, sqlite_url: str
) -> None:
    engine = make_engine(sqlite_url)  # no schema yet: every write fails like a database outage
    events = [make_usage() for _ in range(10)]
    # Slow enough that no event nears the queue's delivery limit before the schema is made.
    retry = RetryPolicy(attempts=2, backoff_s=0.5, backoff_max_s=0.5, timeout_s=5)
    await _queue_empty_before(channel)
    requeued, recorded = _settled("requeued"), _settled("recorded")
    try:
        await _publish_all(broker, events)
        async with running_consumer(rabbit_url, engine, retry, prefetch=64):
            await _settled_at_least("requeued", requeued + len(events))
            await create_schema(engine)  # the database is back
            await _settled_at_least("recorded", recorded + len(events))

        assert _settled("recorded") - recorded == len(events)
        assert await count_rows(engine) == len(events)
        assert await _all_acked(channel)
    finally:
        await engine.dispose()
