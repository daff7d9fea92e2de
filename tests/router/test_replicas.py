"""Two router replicas on one vhost share the backlog and never both route one request.

RabbitMQ delivers each message of `first.router.requests` to one consumer at a time, and a
replica acks a request only after its dispatch was confirmed, so a request is routed once. The
one exception is a replica that dies between the confirmed dispatch and the ack: the request is
redelivered and routed again. Its second copy then finds the first's claim
(`first:claim:<request_id>`, taken by the agent that runs it) and is acked and skipped, so it is
generated and billed once (tests/site_agent covers the claim; tests/faults the router kill).
"""

from __future__ import annotations

import asyncio
from typing import Any

from faststream.rabbit import RabbitBroker

from schemas import names
from schemas.codec import run_inference_decoder
from services.common import topology
from tests.router.test_router import beat, heartbeat, running_router, submit
from tests.site_agent.helpers import make_request, unique, wait_for

REQUESTS = 200


async def drain(channel: Any, queue_name: str) -> list[str]:
    """Take every message now in `queue_name`; return their request ids."""
    queue = await channel.declare_queue(queue_name, passive=True)
    ids = []
    while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
        ids.append(run_inference_decoder.decode(message.body).request_id)
    return ids


async def test_two_replicas_route_every_request_exactly_once_and_both_take_part(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any
) -> None:
    model = unique("model")
    sites = [unique("site-a"), unique("site-b")]
    for site in sites:
        await topology.declare_topology(broker, site_id=site)
    requests = [make_request(model) for _ in range(REQUESTS)]
    queues = [names.site_queue(site, "interactive") for site in sites]
    async with (
        running_router(rabbit_url, redis_url, prefetch=16) as first,
        running_router(rabbit_url, redis_url, prefetch=16) as second,
    ):
        replicas = (first, second)
        dispatched = [0, 0]
        for index, registry in enumerate(replicas):
            count = registry.record_sent

            def counted(site_id: str, index: int = index, count: Any = count) -> None:
                dispatched[index] += 1
                count(site_id)

            registry.record_sent = counted  # type: ignore[method-assign]

        async def keep_beating() -> None:  # the sites stay live (and unmoved) throughout
            while True:
                for site in sites:
                    await beat(broker, heartbeat(site, model))
                await asyncio.sleep(0.5)

        beating = asyncio.create_task(keep_beating())
        try:
            await wait_for(lambda: all(r.get(s) for r in replicas for s in sites))
            await asyncio.gather(*(submit(broker, request) for request in requests))

            # Taken as they arrive (a quorum queue's count in declare-ok can lag behind).
            routed: list[str] = []

            async def all_routed() -> bool:
                for queue in queues:
                    routed.extend(await drain(channel, queue))
                return len(routed) >= REQUESTS

            await wait_for(all_routed, within_s=30)
            await asyncio.sleep(0.5)  # a request routed twice would arrive by now
            await all_routed()
        finally:
            beating.cancel()
    assert len(routed) == REQUESTS
    assert set(routed) == {request.request_id for request in requests}
    assert sum(dispatched) == REQUESTS
    assert min(dispatched) > 0, f"one replica routed everything: {dispatched}"
    # Both stopped with nothing left unrouted or unacked.
    assert await drain(channel, names.ROUTER_REQUESTS_QUEUE) == []
