"""The router against real RabbitMQ (session vhost) and Redis; the last test adds a site agent."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest
from faststream.rabbit import RabbitBroker
from redis.asyncio import Redis

from schemas import names
from schemas.codec import encode, heartbeat_decoder, reply_decoder, run_inference_decoder
from schemas.messages import ModelStatus, RunInference, SiteHeartbeat
from schemas.records import Failure, Final, Response, Usage
from services.access.settings import AccessSettings
from services.common import topology
from services.common.broker import publish
from services.router.app import create_app
from services.router.registry import Registry
from services.router.settings import Settings
from tests.site_agent.fake_backend import FakeBackend
from tests.site_agent.helpers import (
    agent_settings,
    make_request,
    queue_depth,
    read_stream,
    running_agent,
    stream_records,
    unique,
    wait_for,
)


@asynccontextmanager
async def running_router(
    rabbit_url: str, redis_url: str, **overrides: Any
) -> AsyncIterator[Registry]:
    options: dict[str, Any] = {"no_site_wait_s": 1.0, "sweep_interval_s": 0.5, **overrides}
    settings = Settings(rabbit_url=rabbit_url, redis_url=redis_url, **options)
    app = create_app(settings, AccessSettings())
    async with app.router.lifespan_context(app):
        registry: Registry = app.state.deps.registry
        yield registry


@pytest.fixture
async def router(rabbit_url: str, redis_url: str) -> AsyncIterator[Registry]:
    async with running_router(rabbit_url, redis_url) as registry:
        yield registry


def heartbeat(
    site_id: str, model: str, *, running: int = 0, age: float = 0.0, state: str = "hot"
) -> SiteHeartbeat:
    status = ModelStatus(
        model=model, state=state, instances=1, running=running, waiting=0, capacity=8
    )  # type: ignore[arg-type]
    return SiteHeartbeat(
        site_id=site_id, agent_id="a", sent_at=time.time() - age, interval_s=2.0, models=(status,)
    )


async def beat(broker: RabbitBroker, hb: SiteHeartbeat) -> None:
    await publish(broker, hb, exchange=topology.HEARTBEATS, routing_key="", timeout=5)


async def submit(
    broker: RabbitBroker, request: RunInference, routing_key: str = names.REQUEST_ROUTING_KEY
) -> None:
    await publish(broker, request, exchange=topology.REQUESTS, routing_key=routing_key, timeout=5)


async def take(channel: Any, queue_name: str, within_s: float = 10.0) -> RunInference:
    queue = await channel.declare_queue(queue_name, passive=True)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False, timeout=5)
        if message is not None:
            request: RunInference = run_inference_decoder.decode(message.body)
            return request
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing in {queue_name} within {within_s} s")


async def test_request_goes_to_the_live_hot_site_with_most_room_and_is_acked(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any
) -> None:
    model = unique("model")
    roomy, busy, cold = unique("roomy"), unique("busy"), unique("cold")
    for site in (roomy, busy, cold):
        await topology.declare_topology(broker, site_id=site)
    request = make_request(model)
    async with running_router(rabbit_url, redis_url) as registry:
        await beat(broker, heartbeat(busy, model, running=6))
        await beat(broker, heartbeat(roomy, model, running=1))
        await beat(broker, heartbeat(cold, model, state="cold"))
        await wait_for(lambda: all(registry.get(s) for s in (roomy, busy, cold)))
        await submit(broker, request)
        routed = await take(channel, names.site_queue(roomy, "interactive"))
        assert registry.sent() == {roomy: 1}
    assert routed == msgspec.structs.replace(request, site_id=roomy)
    for site in (busy, cold):
        assert await queue_depth(channel, names.site_queue(site, "interactive")) == 0
    # The router has stopped: an unacked request would be back in its queue.
    assert await queue_depth(channel, names.ROUTER_REQUESTS_QUEUE) == 0


@pytest.mark.parametrize(
    "routing_key",
    [names.REQUEST_ROUTING_KEY, names.BATCH_REQUEST_ROUTING_KEY],
    ids=["on-the-requests-queue", "on-the-batch-queue"],
)
async def test_batch_requests_go_to_the_sites_batch_queue(
    router: Registry, broker: RabbitBroker, channel: Any, routing_key: str
) -> None:
    model, site = unique("model"), unique("site")
    await topology.declare_topology(broker, site_id=site)
    await beat(broker, heartbeat(site, model))
    await wait_for(lambda: router.get(site))
    request = msgspec.structs.replace(make_request(model), priority="batch")
    await submit(broker, request, routing_key)
    routed = await take(channel, names.site_queue(site, "batch"))
    assert (routed.request_id, routed.site_id) == (request.request_id, site)


async def test_no_live_site_ends_the_stream_with_503_and_final(
    router: Registry, broker: RabbitBroker, redis_client: Redis
) -> None:
    model, stale = unique("model"), unique("stale")
    await beat(broker, heartbeat(stale, model, age=router.ttl_s + 1))
    request = make_request(model)
    started = time.monotonic()
    await submit(broker, request)
    failure, final = await read_stream(redis_client, request.request_id)
    assert time.monotonic() - started >= 0.9  # it waited no_site_wait_s for a site
    assert isinstance(failure, Failure)
    assert (failure.error.status, failure.error.type) == (503, "service_unavailable")
    assert failure.error.code == "no_site_available"
    assert model in failure.error.message
    assert isinstance(final, Final)
    assert (final.outcome, final.usage) == ("failed", Usage())
    assert await redis_client.ttl(names.stream_key(request.request_id)) > 0


async def test_a_site_that_comes_up_during_the_wait_gets_the_request(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any
) -> None:
    model, site = unique("model"), unique("late")
    await topology.declare_topology(broker, site_id=site)
    async with running_router(rabbit_url, redis_url, no_site_wait_s=5.0):
        request = make_request(model)
        await submit(broker, request)
        await asyncio.sleep(0.5)
        await beat(broker, heartbeat(site, model))
        routed = await take(channel, names.site_queue(site, "interactive"))
    assert routed.request_id == request.request_id


async def test_poison_request_is_dead_lettered_and_the_router_keeps_serving(
    router: Registry, broker: RabbitBroker, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services")
    await broker.publish(
        b"\xc1garbage",
        exchange=topology.REQUESTS,
        routing_key=names.REQUEST_ROUTING_KEY,
        persist=True,
        message_type="Mystery",
    )

    def dead_letter_logged() -> bool:
        return any(
            "dead letter: type=Mystery" in r.getMessage()
            and "reason=rejected" in r.getMessage()
            and f"queue={names.ROUTER_REQUESTS_QUEUE}" in r.getMessage()
            for r in caplog.records
        )

    await wait_for(dead_letter_logged)
    assert not any("garbage" in r.getMessage() for r in caplog.records)
    request = make_request(unique("model"))
    await submit(broker, request)
    failure, _ = await read_stream(redis_client, request.request_id)
    assert isinstance(failure, Failure)  # served (no site: 503), not stuck


async def test_dead_lettered_request_gets_an_error_unless_it_already_finished(
    router: Registry, broker: RabbitBroker, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services")
    request = make_request(unique("model"))
    await publish(broker, request, exchange=topology.DEAD, routing_key="", timeout=5)
    failure, final = await read_stream(redis_client, request.request_id)
    assert isinstance(failure, Failure)
    assert (failure.error.status, failure.error.code) == (502, "dead_lettered")
    assert isinstance(final, Final)
    assert final.outcome == "failed"

    done = make_request(unique("model"))
    key = names.stream_key(done.request_id)
    finished = Final(
        outcome="completed", usage=Usage(completion_tokens=3), site_id="s", finished_at=1.0
    )
    await redis_client.xadd(key, {names.RECORD_FIELD: encode(finished)})
    await publish(
        broker, done, exchange=topology.DEAD, routing_key="", timeout=5, message_id=done.request_id
    )
    await wait_for(
        lambda: any(
            f"id={done.request_id}" in r.getMessage()
            and "stream=already finished" in r.getMessage()
            for r in caplog.records
        )
    )
    assert await stream_records(redis_client, done.request_id) == [finished]


async def test_a_dead_lettered_request_with_a_reply_queue_is_answered_there(
    router: Registry, broker: RabbitBroker, channel: Any
) -> None:
    reply_to = names.reply_queue_prefix("guest") + unique("replies")
    queue = await channel.declare_queue(reply_to, auto_delete=True)
    request = msgspec.structs.replace(make_request(unique("model")), reply_to=reply_to)
    await publish(broker, request, exchange=topology.DEAD, routing_key="", timeout=5)
    message = None
    deadline = time.monotonic() + 5
    while message is None and time.monotonic() < deadline:
        message = await queue.get(fail=False, timeout=5)
        await asyncio.sleep(0.05)
    assert message is not None, "no reply within 5 s"
    reply = reply_decoder.decode(message.body)
    assert reply.request_id == request.request_id
    assert reply.error is not None
    assert (reply.status, reply.outcome, reply.error.code) == (502, "failed", "dead_lettered")


async def test_registry_mirror_drops_expired_sites(router: Registry, redis_client: Redis) -> None:
    gone = heartbeat(unique("gone"), "m", age=router.ttl_s + 5)
    await redis_client.hset(names.REGISTRY_KEY, gone.site_id, encode(gone))

    async def dropped() -> bool:
        return await redis_client.hget(names.REGISTRY_KEY, gone.site_id) is None

    await wait_for(dropped, within_s=2)


@pytest.fixture(scope="module")
def backend() -> Iterator[FakeBackend]:
    server = FakeBackend(unique("fake-model")).start()
    yield server
    server.stop()


async def test_heartbeats_reach_the_registry_and_redis_and_requests_flow_end_to_end(
    rabbit_url: str, redis_url: str, redis_client: Redis, broker: RabbitBroker, backend: FakeBackend
) -> None:
    agent = agent_settings(rabbit_url, redis_url, {backend.model: [backend.url]})
    site = agent.site_id
    async with running_router(rabbit_url, redis_url) as registry, running_agent(agent):
        await wait_for(lambda: registry.get(site))
        seen = registry.get(site)
        assert seen is not None
        assert seen.models[0].model == backend.model
        assert seen.models[0].state == "hot"
        mirrored = await redis_client.hget(names.REGISTRY_KEY, site)
        assert mirrored is not None
        assert heartbeat_decoder.decode(mirrored).site_id == site

        request = make_request(backend.model)
        await submit(broker, request)
        response, final = await read_stream(redis_client, request.request_id)
    assert isinstance(response, Response)
    assert isinstance(final, Final)
    assert (final.outcome, final.site_id) == ("completed", site)


async def test_ops_routes_report_ready_and_known_sites(
    rabbit_url: str, redis_url: str, broker: RabbitBroker
) -> None:
    model, site = unique("model"), unique("site")
    app = create_app(Settings(rabbit_url=rabbit_url, redis_url=redis_url), AccessSettings())
    async with app.router.lifespan_context(app):
        await beat(broker, heartbeat(site, model))
        await wait_for(lambda: app.state.deps.registry.get(site))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            ready = await client.get("/ready")
            sites = (await client.get("/sites")).json()
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"broker": "ok", "redis": "ok"}
    (listed,) = [s for s in sites["sites"] if s["site_id"] == site]
    assert listed["models"][0]["model"] == model
