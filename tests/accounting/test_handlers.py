"""The usage consumer against a real RabbitMQ (the session's vhost) and a SQLite ledger."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from faststream.rabbit import RabbitBroker
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas import names
from schemas.messages import SiteHeartbeat, UsageRecorded
from services.accounting.app import create_app
from services.accounting.batcher import LedgerBatcher, RetryPolicy
from services.accounting.charges import PERIODS
from services.accounting.handlers import register_usage_subscriber
from services.accounting.ledger import LedgerEntry, create_schema, get_usage
from services.accounting.settings import Settings
from services.common import topology
from services.common.broker import make_broker, publish
from services.common.db import make_engine
from tests.accounting.helpers import eventually, make_usage

FAST_RETRY = RetryPolicy(attempts=2, backoff_s=0.2, backoff_max_s=0.2, timeout_s=5)


@asynccontextmanager
async def running_consumer(
    rabbit_url: str,
    engine: AsyncEngine,
    retry: RetryPolicy = FAST_RETRY,
    *,
    prefetch: int = 8,
    max_batch: int = 256,
) -> AsyncIterator[RabbitBroker]:
    """Declare the topology and run the usage subscriber; the broker also publishes."""
    broker = make_broker(rabbit_url, prefetch=prefetch)
    batcher = LedgerBatcher(engine, retry, max_batch=max_batch)
    register_usage_subscriber(broker, batcher)
    try:
        await broker.connect()
        await topology.declare_topology(broker)
        await broker.start()
        yield broker
    finally:
        await broker.stop()
        await batcher.aclose()


async def _send(broker: RabbitBroker, event: UsageRecorded | SiteHeartbeat) -> None:
    await publish(
        broker,
        event,
        exchange=topology.USAGE,
        routing_key=names.USAGE_ROUTING_KEY,
        timeout=10,
        message_id=getattr(event, "request_id", None),
    )


def _settled(result: str) -> float:
    value = REGISTRY.get_sample_value("first_accounting_usage_events_total", {"result": result})
    return value or 0.0


async def _send_poison(
    broker: RabbitBroker, garbage_id: str, heartbeat: SiteHeartbeat, heartbeat_id: str
) -> None:
    """Publish undecodable bytes, then a valid message of the wrong kind (an unknown tag here)."""
    await broker.publish(
        b"\xc1 not msgpack",
        exchange=topology.USAGE,
        routing_key=names.USAGE_ROUTING_KEY,
        persist=True,
        message_id=garbage_id,
    )
    await publish(
        broker,
        heartbeat,
        exchange=topology.USAGE,
        routing_key=names.USAGE_ROUTING_KEY,
        timeout=10,
        message_id=heartbeat_id,
    )


async def _row(engine: AsyncEngine, request_id: str) -> LedgerEntry:
    async def probe() -> LedgerEntry | None:
        return await get_usage(engine, request_id)

    return await eventually(probe, what=f"a ledger row for {request_id}")


async def _settled_at_least(result: str, count: float) -> None:
    async def probe() -> bool | None:
        return _settled(result) >= count or None

    await eventually(probe, what=f"{count} events settled as {result}")


def _dead_queue_path(rabbit_url: str) -> str:
    vhost = rabbit_url.rsplit("/", 1)[1]  # already percent-encoded by the fixture
    return f"/queues/{vhost}/{names.DEAD_QUEUE}"


async def _dead_count(api: httpx.Client, path: str) -> int:
    response = await asyncio.to_thread(api.get, path)
    response.raise_for_status()
    return int(response.json().get("messages", 0))


async def _peek_dead(api: httpx.Client, path: str) -> list[dict[str, Any]]:
    """Read (and requeue) the messages waiting in first.dead."""
    body = {"count": 1000, "ackmode": "ack_requeue_true", "encoding": "base64"}
    response = await asyncio.to_thread(api.post, f"{path}/get", json=body)
    response.raise_for_status()
    messages: list[dict[str, Any]] = response.json()
    return messages


async def test_event_delivered_twice_is_billed_once(
    rabbit_url: str, sqlite_ledger: AsyncEngine
) -> None:
    event = make_usage(prompt_tokens=123, completion_tokens=45, priority="batch")
    duplicates = _settled("duplicate")

    async with running_consumer(rabbit_url, sqlite_ledger) as broker:
        await _send(broker, event)
        await _send(broker, event)

        row = await _row(sqlite_ledger, event.request_id)
        await _settled_at_least("duplicate", duplicates + 1)

    assert (row.prompt_tokens, row.completion_tokens) == (123, 45)
    assert (row.user_id, row.model, row.site_id, row.priority) == (
        event.user_id,
        event.model,
        event.site_id,
        "batch",
    )
    assert (row.created_at, row.finished_at) == (event.created_at, event.finished_at)


async def test_poison_messages_are_dead_lettered_and_the_next_event_is_billed(
    rabbit_url: str, rabbit_api: httpx.Client, sqlite_ledger: AsyncEngine
) -> None:
    path = _dead_queue_path(rabbit_url)
    garbage_id = f"garbage-{secrets.token_hex(4)}"
    heartbeat = SiteHeartbeat(site_id="local", agent_id="a1", sent_at=1.0, interval_s=5.0)
    heartbeat_id = f"heartbeat-{secrets.token_hex(4)}"
    good = make_usage()
    rejected = _settled("rejected")

    async with running_consumer(rabbit_url, sqlite_ledger) as broker:
        dead_before = await _dead_count(rabbit_api, path)
        await _send_poison(broker, garbage_id, heartbeat, heartbeat_id)
        await _send(broker, good)

        row = await _row(sqlite_ledger, good.request_id)
        await _settled_at_least("rejected", rejected + 2)

    assert (row.prompt_tokens, row.completion_tokens) == (11, 7)

    async def dead_grew() -> int | None:  # the management API refreshes its counts every ~5 s
        count = await _dead_count(rabbit_api, path)
        return count if count >= dead_before + 2 else None

    await eventually(dead_grew, timeout_s=30, what="two more messages in first.dead")
    dead = {m["properties"].get("message_id"): m for m in await _peek_dead(rabbit_api, path)}
    for message_id in (garbage_id, heartbeat_id):
        death = dead[message_id]["properties"]["headers"]["x-death"][0]
        assert (death["queue"], death["reason"]) == (names.ACCOUNTING_USAGE_QUEUE, "rejected")


async def test_ledger_outage_requeues_the_event_until_it_is_recorded(
    rabbit_url: str, sqlite_url: str
) -> None:
    engine = make_engine(sqlite_url)  # no schema yet: every write fails like a database outage
    event = make_usage(completion_tokens=99)
    requeued = _settled("requeued")
    try:
        async with running_consumer(rabbit_url, engine) as broker:
            await _send(broker, event)
            await _settled_at_least("requeued", requeued + 1)
            await create_schema(engine)  # the database is back

            row = await _row(engine, event.request_id)
    finally:
        await engine.dispose()

    assert row.completion_tokens == 99


async def test_app_is_ready_and_bills_while_running(rabbit_url: str, sqlite_url: str) -> None:
    settings = Settings(rabbit_url=rabbit_url, database_url=sqlite_url)
    app = create_app(settings)
    event = make_usage()

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://accounting") as client:
            ready = await client.get("/ready")
        publisher = make_broker(rabbit_url)
        try:
            await publisher.connect()
            await _send(publisher, event)
        finally:
            await publisher.stop()
        engine = make_engine(sqlite_url)
        try:
            row = await _row(engine, event.request_id)
        finally:
            await engine.dispose()

    assert ready.status_code == 200, ready.text
    assert ready.json() == {"ready": True, "checks": {"broker": "ok", "database": "ok"}}
    assert row.request_id == event.request_id


async def test_each_new_ledger_row_is_charged_to_its_quotas_once(
    rabbit_url: str, sqlite_url: str, new_redis_url: Callable[[], str]
) -> None:
    redis_url = new_redis_url()
    settings = Settings(rabbit_url=rabbit_url, redis_url=redis_url, database_url=sqlite_url)
    app = create_app(settings)
    user = f"u-{secrets.token_hex(3)}"
    event = make_usage(user_id=user, groups=("lab",), prompt_tokens=30, completion_tokens=12)
    duplicate_before = _settled("duplicate")
    started = time.time()
    async with app.router.lifespan_context(app):
        publisher = make_broker(rabbit_url)
        try:
            await publisher.connect()
            await _send(publisher, event)
            await _send(publisher, event)  # a redelivery or re-publish: no second charge
            await _settled_at_least("duplicate", duplicate_before + 1)
        finally:
            await publisher.stop()
    now = time.time()
    async with Redis.from_url(redis_url) as redis:
        subjects: list[tuple[names.QuotaScope, str]] = [("user", user), ("group", "lab")]
        for scope, subject in subjects:
            for period in PERIODS:
                # The charge went to the window it was made in: the test may span two.
                keys = {
                    names.quota_key("tokens", scope, subject, period, t) for t in (started, now)
                }
                values = [int(v or 0) for v in await redis.mget(sorted(keys))]
                assert sum(values) == 42, keys


def test_settings_read_the_service_prefix_and_the_shared_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FIRST_ACCOUNTING_DATABASE_URL", "sqlite+aiosqlite:///ledger.db")
    monkeypatch.setenv("FIRST_ACCOUNTING_PORT", "9030")
    monkeypatch.setenv("FIRST_RABBIT_URL", "amqp://accounting:secret@mq:5672/first")

    settings = Settings()

    assert settings.database_url == "sqlite+aiosqlite:///ledger.db"
    assert (settings.host, settings.port, settings.prefetch) == ("127.0.0.1", 9030, 512)
    assert settings.max_batch == 256
    assert settings.rabbit_url == "amqp://accounting:secret@mq:5672/first"
