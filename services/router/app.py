"""The router's app: broker subscribers, the site registry and the ops routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator

import msgspec
from fastapi import FastAPI
from faststream import AckPolicy
from faststream.rabbit import RabbitBroker, RabbitQueue
from faststream.rabbit.schemas import Channel
from redis.exceptions import RedisError

from schemas import names
from services.access import apikeys
from services.access.admission import build_access
from services.access.settings import AccessSettings
from services.common import topology
from services.common.broker import PUBLISH_ERRORS, current_message, make_broker, raw_body
from services.common.db import make_engine
from services.common.http import add_ops_routes
from services.common.redis import make_redis
from services.router import metrics
from services.router.deadletter import handle_dead
from services.router.dispatch import Dispatcher
from services.router.handlers import Deps, handle_heartbeat, handle_ingress, handle_request
from services.router.mover import Mover
from services.router.policy import PolicyState
from services.router.registry import Registry
from services.router.settings import Settings

logger = logging.getLogger(__name__)


def heartbeat_queue(instance_id: str) -> RabbitQueue:
    """Return this replica's own queue on the heartbeats fanout (gone when it disconnects)."""
    return RabbitQueue(
        names.heartbeat_queue(instance_id), durable=False, exclusive=True, auto_delete=True
    )


def _subscribe(broker: RabbitBroker, deps: Deps, dispatcher: Dispatcher) -> None:
    requests = topology.work_queue(names.ROUTER_REQUESTS_QUEUE, declare=False)

    @broker.subscriber(requests, ack_policy=AckPolicy.MANUAL, decoder=raw_body)
    async def on_request() -> None:
        await handle_request(current_message(broker), deps)

    # Batch lines come on their own queue and channel: the router's window of interactive
    # deliveries never fills up with them. They are held there, unacked, until a site has
    # credit for them (services/router/dispatch.py); the window bounds how many.
    batch = topology.work_queue(names.ROUTER_BATCH_QUEUE, declare=False)
    batch_channel = Channel(prefetch_count=deps.settings.batch_prefetch)

    @broker.subscriber(batch, channel=batch_channel, ack_policy=AckPolicy.MANUAL, decoder=raw_body)
    async def on_batch() -> None:
        await handle_request(current_message(broker), deps, dispatcher.hold)

    usage = topology.router_usage_queue(deps.settings.instance_id)

    @broker.subscriber(
        usage, topology.USAGE_EXISTING, ack_policy=AckPolicy.ACK_FIRST, decoder=raw_body
    )
    async def on_usage() -> None:
        dispatcher.observe_usage(current_message(broker).body)

    ingress = topology.work_queue(names.ROUTER_INGRESS_QUEUE, declare=False)

    @broker.subscriber(ingress, ack_policy=AckPolicy.MANUAL, decoder=raw_body)
    async def on_ingress() -> None:
        await handle_ingress(current_message(broker), deps)

    dead = RabbitQueue(names.DEAD_QUEUE, declare=False)

    @broker.subscriber(dead, ack_policy=AckPolicy.MANUAL, decoder=raw_body)
    async def on_dead() -> None:
        await handle_dead(current_message(broker), deps)

    beats = heartbeat_queue(deps.settings.instance_id)

    @broker.subscriber(
        beats, topology.HEARTBEATS_EXISTING, ack_policy=AckPolicy.ACK_FIRST, decoder=raw_body
    )
    async def on_heartbeat() -> None:
        await handle_heartbeat(current_message(broker), deps)


def create_app(settings: Settings, access: AccessSettings) -> FastAPI:
    """Build the router; it connects only when the app starts.

    `access` is what admits a direct producer's request (services/access: API keys' database,
    Globus Auth, the catalogue and its policies, the limits): the same settings the gateway
    admits with, handed in by the caller, never read here from another component's environment.
    """
    broker = make_broker(settings.rabbit_url, prefetch=settings.prefetch)
    redis = make_redis(settings.redis_url)
    registry = Registry(redis, settings.site_ttl_s, skew_s=settings.heartbeat_skew_s)
    engine = make_engine(access.database_url)
    deps = Deps(
        settings=settings,
        broker=broker,
        redis=redis,
        registry=registry,
        access=build_access(access, redis, engine),
        policy=PolicyState(rng=random.Random(settings.policy_seed)),  # noqa: S311 - not secret
    )
    dispatcher = Dispatcher(deps)
    _subscribe(broker, deps, dispatcher)
    mover = Mover(deps)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await apikeys.create_schema(engine)  # ingress credentials are checked against it
        await broker.connect()
        await topology.prepare(
            broker, declare=settings.declare_topology, timeout_s=settings.publish_timeout_s
        )
        try:
            logger.info("registry: %d live sites loaded from Redis", await registry.load())
        except RedisError as exc:
            logger.warning("registry: cannot load the Redis mirror: %s", exc)
        await broker.start()
        sweeper = asyncio.create_task(
            registry.run_sweeper(settings.sweep_interval_s, mover.sites_gone)
        )
        moving = asyncio.create_task(run_mover(mover, settings.sweep_interval_s))
        dispatching = asyncio.create_task(dispatcher.run())
        metrics.SITES.attach(registry)
        try:
            yield
        finally:
            metrics.SITES.detach(registry)
            mover.stopping = True
            tasks = {sweeper, moving, dispatching}
            for task in tasks:
                task.cancel()
            # Bounded: a task stuck in a network call must not hold the shutdown.
            await asyncio.wait(tasks, timeout=settings.publish_timeout_s)
            await mover.close()
            await broker.stop()
            await redis.aclose()
            await engine.dispose()

    app = FastAPI(title="FIRST router", lifespan=lifespan)
    app.state.deps = deps
    app.state.dispatcher = dispatcher

    async def broker_ready() -> None:
        if not await broker.ping(timeout=1.0):
            raise ConnectionError("not connected to RabbitMQ")

    add_ops_routes(app, {"broker": broker_ready, "redis": redis.ping})

    @app.get("/sites")
    async def sites() -> dict[str, object]:
        """List the sites this replica knows, with their models and load."""
        return {
            "ttl_s": registry.ttl_s,
            "sites": msgspec.to_builtins(registry.sites()),
            "sent": registry.sent(),
            "batch_held": dispatcher.held_by_user(),
        }

    return app


MOVER_ERRORS: tuple[type[BaseException], ...] = (*PUBLISH_ERRORS, RedisError)


async def run_mover(mover: Mover, interval_s: float) -> None:
    """Empty dead sites' queues every `interval_s` until stopped (failures: next round).

    It ends on `mover.stopping`, not on the cancel alone: a cancel that lands while
    aio_pika.connect is inside its wait_for can be swallowed (Python 3.11), and a mover left
    running after its router made a new connection every round — with a user deleted since,
    each a refused login whose half-made connection a collector later finalised in another
    thread ("coroutine 'Connection.close' was never awaited")."""
    while not mover.stopping:
        await asyncio.sleep(interval_s)
        if mover.stopping:
            return
        try:
            await mover.round()
        except MOVER_ERRORS as exc:
            logger.warning("moving work off dead sites failed: %r", exc)
