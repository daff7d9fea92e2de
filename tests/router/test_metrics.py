"""The router's Prometheus series: what it routed and failed, the queue wait, the registry's state."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from faststream.rabbit import RabbitBroker
from prometheus_client import REGISTRY, generate_latest
from redis.asyncio import Redis

from schemas.records import Failure, Final
from services.common import topology
from services.common.broker import make_broker
from tests.router.test_router import beat, heartbeat, running_router, submit, take
from tests.site_agent.helpers import amqp, make_request, read_stream, unique, wait_for


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def count(name: str, **labels: str) -> float:
    return sample(name, **labels) or 0.0


@pytest.fixture
async def broker(rabbit_url: str) -> AsyncIterator[RabbitBroker]:
    broker = make_broker(rabbit_url)
    await broker.connect()
    await topology.declare_topology(broker)
    yield broker
    await broker.stop()


@pytest.fixture
async def channel(rabbit_url: str) -> AsyncIterator[Any]:
    async with amqp(rabbit_url) as channel:
        yield channel


async def test_a_routed_request_is_counted_by_site_and_priority_with_its_queue_wait(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any
) -> None:
    model, site = unique("model"), unique("site")
    await topology.declare_topology(broker, site_id=site)
    queued_s = 2.0
    request = msgspec.structs.replace(make_request(model), created_at=time.time() - queued_s)
    waits = count("first_router_queue_wait_seconds_count", priority="interactive")
    waited = count("first_router_queue_wait_seconds_sum", priority="interactive")
    async with running_router(rabbit_url, redis_url) as registry:
        await beat(broker, heartbeat(site, model))
        await wait_for(lambda: registry.get(site) is not None)
        await submit(broker, request)
        routed = await take(channel, f"first.site.{site}.interactive")
        assert routed.request_id == request.request_id
        await wait_for(
            lambda: count("first_router_requests_routed_total", site=site, priority="interactive")
            == 1
        )
        assert count("first_router_queue_wait_seconds_count", priority="interactive") == waits + 1
        wait = count("first_router_queue_wait_seconds_sum", priority="interactive") - waited
        assert queued_s <= wait < queued_s + 10

        # Scrape-time series, read from the registry of the running router.
        age = sample("first_router_heartbeat_age_seconds", site=site)
        assert age is not None
        assert 0 <= age < 5
        assert sample("first_router_in_flight", site=site) == 1  # no heartbeat since
        assert (sample("first_router_live_sites") or 0) >= 1
        text = generate_latest().decode()
        assert f'first_router_in_flight{{site="{site}"}} 1.0' in text
        await beat(broker, heartbeat(site, model))  # a newer heartbeat reflects the dispatch
        await wait_for(lambda: sample("first_router_in_flight", site=site) == 0)
    assert sample("first_router_heartbeat_age_seconds", site=site) is None  # router stopped


async def test_a_request_no_site_can_take_is_counted_as_failed_no_site(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, redis_client: Redis
) -> None:
    request = make_request(unique("unserved"))
    before = count("first_router_requests_failed_total", reason="no_site")
    routed = sum(
        s.value
        for metric in REGISTRY.collect()
        if metric.name == "first_router_requests_routed"
        for s in metric.samples
        if s.name.endswith("_total")
    )
    async with running_router(rabbit_url, redis_url, no_site_wait_s=0.5):
        await submit(broker, request)
        records = await read_stream(redis_client, request.request_id)
        assert isinstance(records[0], Failure)
        assert isinstance(records[-1], Final)
        await wait_for(
            lambda: count("first_router_requests_failed_total", reason="no_site") == before + 1
        )
    after = sum(
        s.value
        for metric in REGISTRY.collect()
        if metric.name == "first_router_requests_routed"
        for s in metric.samples
        if s.name.endswith("_total")
    )
    assert after == routed
