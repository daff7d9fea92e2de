"""The router's series (routed, failed, queue wait, registry state) and its log context."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from faststream.rabbit import RabbitBroker
from prometheus_client import REGISTRY, generate_latest
from redis.asyncio import Redis

from schemas import names
from schemas.codec import encode
from schemas.records import Failure, Final, Usage
from services.common import topology
from services.common.broker import publish
from tests.common.helpers import capture_json
from tests.router.test_router import beat, heartbeat, running_router, submit, take
from tests.site_agent.helpers import make_request, read_stream, unique, wait_for


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def count(name: str, **labels: str) -> float:
    return sample(name, **labels) or 0.0


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
        routed = await take(channel, names.site_queue(site, "interactive"))
        assert routed.request_id == request.request_id
        await wait_for(
            lambda: (
                count("first_router_requests_routed_total", site=site, priority="interactive") == 1
            )
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


async def test_poison_and_dead_lettered_requests_are_counted_once_each(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, redis_client: Redis
) -> None:
    undecodable = count("first_router_requests_failed_total", reason="undecodable")
    dead = count("first_router_requests_failed_total", reason="dead_lettered")
    rejected = {"queue": names.ROUTER_REQUESTS_QUEUE, "reason": "rejected"}
    poison_deaths = count("first_router_dead_letters_total", **rejected)
    async with running_router(rabbit_url, redis_url):
        await broker.publish(
            b"\xc1garbage",
            exchange=topology.REQUESTS,
            routing_key=names.REQUEST_ROUTING_KEY,
            persist=True,
        )
        await wait_for(lambda: count("first_router_dead_letters_total", **rejected) > poison_deaths)
        assert count("first_router_requests_failed_total", reason="undecodable") == undecodable + 1
        assert count("first_router_requests_failed_total", reason="dead_lettered") == dead

        request = make_request(unique("model"))
        await publish(broker, request, exchange=topology.DEAD, routing_key="", timeout=5)
        failure, _final = await read_stream(redis_client, request.request_id)
        assert isinstance(failure, Failure)
        await wait_for(
            lambda: count("first_router_requests_failed_total", reason="dead_lettered") == dead + 1
        )

        # A dead letter whose request already finished is not a failed request.
        done = make_request(unique("model"))
        finished = Final(outcome="completed", usage=Usage(), site_id="s", finished_at=1.0)
        key = names.stream_key(done.request_id)
        await redis_client.xadd(key, {names.RECORD_FIELD: encode(finished)})
        unknown = count("first_router_dead_letters_total", queue="unknown", reason="unknown")
        await publish(broker, done, exchange=topology.DEAD, routing_key="", timeout=5)
        await wait_for(
            lambda: (
                count("first_router_dead_letters_total", queue="unknown", reason="unknown")
                == unknown + 1
            )
        )
        assert count("first_router_requests_failed_total", reason="dead_lettered") == dead + 1


async def test_the_ids_of_one_delivery_do_not_leak_into_the_logs_of_the_next(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, redis_client: Redis
) -> None:
    request = make_request(unique("unserved"))
    with capture_json() as logs:
        async with running_router(rabbit_url, redis_url, no_site_wait_s=0.2):
            await submit(broker, request)
            await read_stream(redis_client, request.request_id)
            await broker.publish(
                b"\xc1garbage",
                exchange=topology.REQUESTS,
                routing_key=names.REQUEST_ROUTING_KEY,
                persist=True,
            )
            await wait_for(lambda: any("rejecting" in line["msg"] for line in logs.lines()))
    no_site = [line for line in logs.lines() if line["msg"].startswith("no live site")]
    assert [(line["request_id"], line["user_id"]) for line in no_site] == [
        (request.request_id, request.user_id)
    ]
    (poison,) = [line for line in logs.lines() if "rejecting" in line["msg"]]
    assert "request_id" not in poison
    assert "user_id" not in poison
