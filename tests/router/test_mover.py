"""Work waiting in a dead site's queues moves to a live site (real RabbitMQ and Redis)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from faststream.rabbit import RabbitBroker

from schemas import names
from schemas.codec import run_inference_decoder
from services.common import topology
from tests.router.test_router import beat, heartbeat, running_router
from tests.site_agent.helpers import make_request, send_to_site, unique, wait_for


async def keep_beating(broker: RabbitBroker, site_id: str, model: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await beat(broker, heartbeat(site_id, model))
        await asyncio.sleep(0.2)


async def test_requests_waiting_at_a_site_whose_heartbeats_stopped_move_to_a_live_site(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any
) -> None:
    model = unique("model")
    dead, live = unique("dead"), unique("live")
    for site_id in (dead, live):
        await topology.declare_topology(broker, site_id=site_id)
    requests = [make_request(model) for _ in range(3)]
    batch = make_request(model)
    batch = batch.__class__(
        **{**{f: getattr(batch, f) for f in batch.__struct_fields__}, "priority": "batch"}
    )
    live_queues = {p: await channel.get_queue(names.site_queue(live, p)) for p in names.PRIORITIES}
    async with running_router(
        rabbit_url, redis_url, site_ttl_s=2.0, sweep_interval_s=0.2
    ) as registry:
        await beat(broker, heartbeat(dead, model))
        stop = asyncio.Event()
        beating = asyncio.create_task(keep_beating(broker, live, model, stop))
        try:
            for request in [*requests, batch]:
                await send_to_site(broker, dead, request)  # as if routed before it died
            deadline = time.monotonic() + 15
            moved: dict[str, Any] = {}
            while len(moved) < 4 and time.monotonic() < deadline:
                for priority, queue in live_queues.items():
                    message = await queue.get(no_ack=True, fail=False, timeout=5)
                    if message is not None:
                        got = run_inference_decoder.decode(message.body)
                        moved[got.request_id] = (priority, got)
                await asyncio.sleep(0.05)
            assert registry.get(dead) is None
        finally:
            stop.set()
            await beating
    assert set(moved) == {r.request_id for r in [*requests, batch]}
    for priority, request in moved.values():
        assert (request.moved_from, request.site_id) == (dead, live)
        assert priority == request.priority
    assert moved[batch.request_id][0] == "batch"
    for priority in names.PRIORITIES:
        queue = await channel.declare_queue(names.site_queue(dead, priority), passive=True)
        assert queue.declaration_result.message_count == 0


async def test_requests_stay_at_a_dead_site_while_no_live_site_serves_their_model(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any
) -> None:
    model = unique("model")
    dead = unique("dead")
    await topology.declare_topology(broker, site_id=dead)
    request = make_request(model)
    async with running_router(
        rabbit_url, redis_url, site_ttl_s=2.0, sweep_interval_s=0.2
    ) as registry:
        await beat(broker, heartbeat(dead, model))
        await send_to_site(broker, dead, request)
        await wait_for(lambda: registry.get(dead) is None, within_s=5)
        await asyncio.sleep(1.0)  # a few mover rounds
    queue = await channel.declare_queue(names.site_queue(dead, "interactive"), passive=True)
    assert queue.declaration_result.message_count == 1
