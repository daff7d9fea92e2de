"""Credit-based dispatch of batch lines, against real RabbitMQ and Redis with fake heartbeats."""

from __future__ import annotations

import json
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
from faststream.rabbit import RabbitBroker
from redis.asyncio import Redis

from schemas import names
from schemas.codec import reply_decoder
from schemas.messages import ModelStatus, RunInference, SiteHeartbeat
from schemas.records import Failure
from services.access.settings import AccessSettings
from services.common import topology
from services.common.broker import publish
from services.router.app import create_app
from services.router.dispatch import Dispatcher, Held, in_age_order
from services.router.fairness import estimate
from services.router.registry import Registry
from services.router.settings import Settings
from tests.router.test_router import beat, submit, take
from tests.site_agent.helpers import make_request, queue_depth, read_stream, unique, wait_for


@pytest.fixture(scope="module")
def rabbit_url(new_rabbit_url: Callable[[], str]) -> str:
    """A vhost of this module's own: no other module's router consumes its batch queue, and
    no other test's leftover lines reach its routers."""
    return new_rabbit_url()


@asynccontextmanager
async def running(
    rabbit_url: str, redis_url: str, reserve_idle_s: float = 0.0
) -> AsyncIterator[tuple[Registry, Dispatcher]]:
    """A router; by default it never lends the reserve (reserve_idle_s=0)."""
    settings = Settings(
        rabbit_url=rabbit_url,
        redis_url=redis_url,
        no_site_wait_s=1.0,
        dispatch_tick_s=0.2,
        reserve_idle_s=reserve_idle_s,
    )
    app = create_app(settings, AccessSettings())
    async with app.router.lifespan_context(app):
        yield app.state.deps.registry, app.state.dispatcher


def heartbeat(site_id: str, model: str, *, running: int = 0, capacity: int = 8) -> SiteHeartbeat:
    status = ModelStatus(
        model=model, state="hot", instances=1, running=running, waiting=0, capacity=capacity
    )
    return SiteHeartbeat(
        site_id=site_id,
        agent_id="a",
        sent_at=time.time(),
        interval_s=2.0,
        models=(status,),
        received_at=time.time(),
    )


def batch_line(model: str, user: str = "u-1", prompt: str = "hi", **kw: Any) -> RunInference:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16}
    request = make_request(model, body=body, **kw)
    return msgspec.structs.replace(request, priority="batch", user_id=user)


async def submit_batch(broker: RabbitBroker, request: RunInference) -> None:
    await publish(
        broker,
        request,
        exchange=topology.REQUESTS,
        routing_key=names.BATCH_REQUEST_ROUTING_KEY,
        timeout=5,
    )


async def drain(channel: Any, queue_name: str, within_s: float = 1.0) -> list[RunInference]:
    """Take every line in `queue_name` until it stays empty for `within_s`."""
    got = []
    while True:
        try:
            got.append(await take(channel, queue_name, within_s))
        except AssertionError:
            return got


async def test_batch_lines_wait_unacked_until_a_site_has_credit_beyond_the_reserve(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any
) -> None:
    model, site = unique("model"), unique("site")
    await topology.declare_topology(broker, site_id=site)
    site_batch = names.site_queue(site, "batch")
    lines = [batch_line(model, expires_in=30) for _ in range(3)]
    async with running(rabbit_url, redis_url) as (registry, dispatcher):
        await beat(broker, heartbeat(site, model, running=6))  # 8 - 6 - reserve 2: no credit
        await wait_for(lambda: registry.get(site))
        for line in lines:
            await submit_batch(broker, line)
        await wait_for(lambda: dispatcher.held() == 3)
        assert await drain(channel, site_batch, 0.5) == []
        assert await queue_depth(channel, names.ROUTER_BATCH_QUEUE) == 0  # unacked, not ready
        await beat(broker, heartbeat(site, model, running=4))  # credit 2
        first = await drain(channel, site_batch)
        assert [r.request_id for r in first] == [r.request_id for r in lines[:2]]
        assert dispatcher.held() == 1
        await beat(broker, heartbeat(site, model, running=0))
        rest = await drain(channel, site_batch)
        assert [r.request_id for r in rest] == [lines[2].request_id]
        assert dispatcher.held() == 0
    assert await queue_depth(channel, names.ROUTER_BATCH_QUEUE) == 0  # all acked


async def test_held_lines_stay_in_rabbitmq_when_the_router_stops(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any
) -> None:
    model, site = unique("model"), unique("site")
    await topology.declare_topology(broker, site_id=site)
    # Long enough that the router cannot expire it however slow its start on a loaded machine.
    line = batch_line(model, expires_in=60)
    async with running(rabbit_url, redis_url) as (registry, dispatcher):
        await beat(broker, heartbeat(site, model, running=8))
        await wait_for(lambda: registry.get(site))
        await submit_batch(broker, line)
        await wait_for(lambda: dispatcher.held() == 1)
    await wait_for(lambda: queue_depth(channel, names.ROUTER_BATCH_QUEUE), within_s=5)
    # Take it back out, so no later test's router inherits it.
    assert (await take(channel, names.ROUTER_BATCH_QUEUE)).request_id == line.request_id


async def test_interactive_requests_go_at_once_and_take_the_batch_credit(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any
) -> None:
    model, site = unique("model"), unique("site")
    await topology.declare_topology(broker, site_id=site)
    async with running(rabbit_url, redis_url) as (registry, dispatcher):
        await beat(broker, heartbeat(site, model, running=4))  # credit 2
        await wait_for(lambda: registry.get(site))
        interactive = [make_request(model) for _ in range(2)]
        for request in interactive:
            await submit(broker, request)
        for _ in interactive:
            await take(channel, names.site_queue(site, "interactive"))
        await wait_for(lambda: registry.sent().get(site) == 2)
        line = batch_line(model, expires_in=30)
        await submit_batch(broker, line)
        await wait_for(lambda: dispatcher.held() == 1)
        assert await drain(channel, names.site_queue(site, "batch"), 0.5) == []
        # The reserve is the batch's limit, not the interactive one's: a full site still
        # gets interactive work at once (it waits there, ahead of batch work).
        await beat(broker, heartbeat(site, model, running=8))
        late = make_request(model)
        await submit(broker, late)
        routed = await take(channel, names.site_queue(site, "interactive"))
        assert routed.request_id == late.request_id
        await beat(broker, heartbeat(site, model, running=0))
        taken = await drain(channel, names.site_queue(site, "batch"))
        assert [r.request_id for r in taken] == [line.request_id]


async def test_two_users_lines_interleave_by_tokens_not_by_request_count(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any
) -> None:
    model, site = unique("model"), unique("site")
    await topology.declare_topology(broker, site_id=site)
    longs = [batch_line(model, "a-long", "word " * 800, expires_in=30) for _ in range(6)]
    shorts = [batch_line(model, "b-short", "hi", expires_in=30) for _ in range(6)]
    async with running(rabbit_url, redis_url) as (registry, dispatcher):
        await beat(broker, heartbeat(site, model, running=8))
        await wait_for(lambda: registry.get(site))
        for line in longs + shorts:  # the long prompts' user floods first
            await submit_batch(broker, line)
        await wait_for(lambda: dispatcher.held() == 12)
        await beat(broker, heartbeat(site, model, running=0))  # credit 6
        first = await drain(channel, names.site_queue(site, "batch"))
        users = [r.user_id for r in first]
        assert len(users) == 6
        # One long line (~1000 tokens) is worth many short ones (~30 tokens).
        assert users.count("a-long") == 1, users
        await beat(broker, heartbeat(site, model, running=0, capacity=40))
        rest = await drain(channel, names.site_queue(site, "batch"))
        assert len(rest) == 6
        assert dispatcher.held() == 0


async def test_an_expired_line_ends_with_a_503_and_a_reply(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any, redis_client: Redis
) -> None:
    model = unique("model")
    replies = await channel.declare_queue(unique("replies"), auto_delete=True)
    await replies.bind(names.REPLIES_EXCHANGE, routing_key=names.reply_routing_key(replies.name))
    line = msgspec.structs.replace(batch_line(model, expires_in=1.5), reply_to=replies.name)
    async with running(rabbit_url, redis_url):
        started = time.monotonic()
        await submit_batch(broker, line)
        failure, _final = await read_stream(redis_client, line.request_id)
        # It waited for its own expiry, past no_site_wait_s (1 s).
        assert time.monotonic() - started >= 1.2
        assert isinstance(failure, Failure)
        assert failure.error.code == "no_site_available"
        got: list[Any] = []

        async def replied() -> bool:  # the reply follows the stream's failure
            message = await replies.get(no_ack=True, fail=False, timeout=5)
            if message is not None:
                got.append(message)
            return bool(got)

        await wait_for(replied, within_s=5)
        message = got[0]
    reply = reply_decoder.decode(message.body)
    assert (reply.request_id, reply.status, reply.outcome) == (line.request_id, 503, "failed")
    assert json.loads(line.body)["max_tokens"] == 16


async def test_a_line_no_site_can_take_does_not_hold_back_the_users_other_models(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any
) -> None:
    served, unserved, site = unique("model"), unique("nowhere"), unique("site")
    await topology.declare_topology(broker, site_id=site)
    stuck = batch_line(unserved, user="u-hol", expires_in=30)
    line = batch_line(served, user="u-hol", expires_in=30)
    async with running(rabbit_url, redis_url) as (registry, dispatcher):
        await beat(broker, heartbeat(site, served))
        await wait_for(lambda: registry.get(site))
        await submit_batch(broker, stuck)  # first in her queue: no site serves its model
        await submit_batch(broker, line)
        taken = await drain(channel, names.site_queue(site, "batch"))
        assert [r.request_id for r in taken] == [line.request_id]
        assert dispatcher.held_by_user() == {"u-hol": 1}


async def test_the_reserve_is_lent_to_a_batch_alone_and_taken_back_by_interactive_work(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any
) -> None:
    model, site = unique("model"), unique("site")
    await topology.declare_topology(broker, site_id=site)
    site_batch = names.site_queue(site, "batch")
    async with running(rabbit_url, redis_url, reserve_idle_s=30.0) as (registry, dispatcher):
        await beat(broker, heartbeat(site, model, running=6))  # credit 2 with the reserve lent
        await wait_for(lambda: registry.get(site))
        lent = [batch_line(model, expires_in=30) for _ in range(2)]
        for line in lent:
            await submit_batch(broker, line)
        taken = await drain(channel, site_batch)
        assert [r.request_id for r in taken] == [r.request_id for r in lent]
        await submit(broker, make_request(model))  # someone waits for an answer now
        await take(channel, names.site_queue(site, "interactive"))
        await beat(broker, heartbeat(site, model, running=6))  # 8 - 6 - reserve 2: none
        kept = batch_line(model, expires_in=30)
        await submit_batch(broker, kept)
        await wait_for(lambda: dispatcher.held() == 1)
        assert await drain(channel, site_batch, 0.5) == []
        await beat(broker, heartbeat(site, model, running=5))
        assert [r.request_id for r in await drain(channel, site_batch)] == [kept.request_id]


async def test_the_router_holds_batch_lines_up_to_its_batch_prefetch_not_the_default_one(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, channel: Any
) -> None:
    # The batch consumer has a channel of its own (prefetch 512); the default channel's is 64.
    # FastStream once consumed it on the default channel, because the topology's declare had
    # cached the queue there: the router saw only 64 lines, in FIFO order, and its fair share
    # chose among whatever RabbitMQ had delivered.
    model = unique("model")
    lines = [batch_line(model, expires_in=60) for _ in range(100)]
    async with running(rabbit_url, redis_url) as (_registry, dispatcher):
        for line in lines:
            await submit_batch(broker, line)
        await wait_for(lambda: dispatcher.held() >= 100)  # with earlier tests' leftovers, more
    taken = {r.request_id for r in await drain(channel, names.ROUTER_BATCH_QUEUE)}
    assert taken >= {line.request_id for line in lines}  # none lost; none left for later tests


def test_a_users_lines_are_held_oldest_first_whatever_order_they_arrive_in() -> None:
    """Deliveries are handled concurrently, so lines can reach the dispatcher out of order."""
    lines = [batch_line("m") for _ in range(8)]  # ids in the order they were made
    arrivals = lines[:]
    random.Random(7).shuffle(arrivals)
    queue: deque[Held] = deque()
    for line in arrivals:
        in_age_order(queue, Held(msg=None, request=line, guess=estimate(line), held_since=0.0))  # type: ignore[arg-type]
    assert [h.request.request_id for h in queue] == [line.request_id for line in lines]
