"""Heartbeats belong to their site and to our clock (issue 15, boundary 4).

A router on its own least-privilege user (as `first rabbit setup` configures it) and sites a,
b and c, each publishing with its own credential. A site credential must not speak for
another site, and a heartbeat dated in the future must not keep its site live past the TTL
after the router last heard from it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aio_pika.exceptions import ChannelClosed
from faststream.rabbit import RabbitBroker
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from schemas import names
from schemas.codec import encode
from schemas.messages import ModelStatus, SiteHeartbeat
from services.access.settings import AccessSettings
from services.common import topology
from services.common.broker import make_broker, publish
from services.router.app import create_app as create_router
from services.router.registry import Registry
from services.router.settings import Settings as RouterSettings
from tests.common.rabbit_users import Users, least_privilege_users
from tests.site_agent.helpers import unique, wait_for


@pytest.fixture(scope="module")
def deployment(
    new_rabbit_url: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Users]:
    workdir = tmp_path_factory.mktemp("heartbeats")
    with least_privilege_users(new_rabbit_url(), ["a", "b", "c"], workdir) as users:
        yield users


@asynccontextmanager
async def running_router(users: Users, redis_url: str, **overrides: Any) -> AsyncIterator[Registry]:
    env = users.service_env["router"]
    settings = RouterSettings(
        rabbit_url=env["FIRST_RABBIT_URL"],
        redis_url=redis_url,
        declare_topology=False,
        request_publishers=json.loads(env["FIRST_ROUTER_REQUEST_PUBLISHERS"]),
        site_user_prefix=env.get("FIRST_ROUTER_SITE_USER_PREFIX", ""),
        sweep_interval_s=0.2,
        **overrides,
    )
    app = create_router(settings, AccessSettings())
    async with app.router.lifespan_context(app):
        yield app.state.deps.registry


@asynccontextmanager
async def site_broker(users: Users, site: str) -> AsyncIterator[RabbitBroker]:
    """A connection with one site's credential, as its agent (or a thief) would use it."""
    broker = make_broker(users.urls[f"site {site}"])
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.stop()


def heartbeat(site_id: str, *, sent_at: float | None = None, agent_id: str = "a1") -> SiteHeartbeat:
    status = ModelStatus(
        model="m", state="hot", instances=1, running=0, waiting=0, capacity=8
    )  # a site with room attracts work
    return SiteHeartbeat(
        site_id=site_id,
        agent_id=agent_id,
        sent_at=time.time() if sent_at is None else sent_at,
        interval_s=0.3,
        models=(status,),
    )


async def beat(broker: RabbitBroker, hb: SiteHeartbeat) -> None:
    await publish(broker, hb, exchange=topology.HEARTBEATS, routing_key="", timeout=5)


def refused() -> float:
    labels = {"reason": "publisher"}
    return REGISTRY.get_sample_value("first_router_heartbeats_refused_total", labels) or 0.0


async def test_a_site_credential_cannot_speak_for_another_site(
    deployment: Users, redis_url: str, redis_client: Redis
) -> None:
    async with (
        running_router(deployment, redis_url) as registry,
        site_broker(deployment, "a") as thief,
        site_broker(deployment, "b") as site_b,
    ):
        await beat(site_b, heartbeat("b"))
        await wait_for(lambda: registry.get("b"))
        held = registry.get("b")
        mirrored = await redis_client.hget(names.REGISTRY_KEY, "b")
        count = refused()
        # b "gone" for good: dated far in the future, serving nothing.
        forged = SiteHeartbeat(site_id="b", agent_id="x", sent_at=time.time() + 1e9, interval_s=1)
        await beat(thief, forged)
        # Then a's own heartbeat, on the same connection: once the router holds it, it has
        # handled the forged one before it (one consumer, in order).
        marker = unique("marker")
        await beat(thief, heartbeat("a", agent_id=marker))
        await wait_for(lambda: (hb := registry.get("a")) is not None and hb.agent_id == marker)
        assert registry.get("b") == held
        assert await redis_client.hget(names.REGISTRY_KEY, "b") == mirrored
        assert refused() == count + 1
        # Nor can it claim to be b's user: RabbitMQ checks user_id against the connection.
        with pytest.raises(ChannelClosed, match="PRECONDITION_FAILED"):
            await thief.publish(
                encode(forged),
                exchange=topology.HEARTBEATS,
                routing_key="",
                user_id=f"{deployment.prefix}site-b",
                timeout=5,
            )


async def test_a_heartbeat_from_the_future_expires_a_ttl_after_it_was_received(
    deployment: Users, redis_url: str, redis_client: Redis
) -> None:
    ttl_s, skew_s = 1.5, 1.0
    quick = {"site_ttl_s": ttl_s, "heartbeat_skew_s": skew_s}
    async with (
        running_router(deployment, redis_url, **quick) as registry,
        site_broker(deployment, "c") as site_c,
    ):
        sent = time.time()
        await beat(site_c, heartbeat("c", sent_at=sent + 1e9))
        await wait_for(lambda: registry.get("c"))
        held = registry.get("c")
        assert held is not None
        # No heartbeat since: gone from the registry and its mirror a TTL (plus a sweep) later.
        await wait_for(lambda: registry.get("c") is None, within_s=ttl_s + 3)
        assert time.time() - held.received_at >= ttl_s
        assert sent <= held.received_at
        assert held.sent_at <= held.received_at + skew_s  # clamped to the router's clock

        async def unmirrored() -> bool:
            return await redis_client.hget(names.REGISTRY_KEY, "c") is None

        await wait_for(unmirrored, within_s=2)
