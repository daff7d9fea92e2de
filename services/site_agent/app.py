"""The site agent's app: its site queues, the heartbeat, the cancel watcher and the ops routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import msgspec
from fastapi import FastAPI
from faststream import AckPolicy
from faststream.rabbit import RabbitBroker
from faststream.rabbit.schemas import Channel

from schemas import names
from services.common import streams, topology
from services.common.broker import current_message, make_broker, raw_body
from services.common.http import add_ops_routes
from services.common.redis import make_redis
from services.site_agent import metrics
from services.site_agent.backends import Backends
from services.site_agent.cancel import CancelWatcher
from services.site_agent.execution import Executor
from services.site_agent.forwarder import Forwarder
from services.site_agent.handlers import Deps, handle_request
from services.site_agent.heartbeat import Heartbeat
from services.site_agent.settings import Settings

logger = logging.getLogger(__name__)


def _subscribe(broker: RabbitBroker, deps: Deps) -> None:
    site_id = deps.settings.site_id
    interactive = topology.work_queue(names.site_queue(site_id, "interactive"), declare=False)
    batch = topology.work_queue(names.site_queue(site_id, "batch"), declare=False)

    @broker.subscriber(interactive, ack_policy=AckPolicy.MANUAL, decoder=raw_body)
    async def on_interactive() -> None:
        await handle_request(current_message(broker), deps)

    # Batch work has its own, smaller window so that it cannot crowd out interactive work.
    batch_channel = Channel(prefetch_count=deps.settings.batch_prefetch)

    @broker.subscriber(batch, channel=batch_channel, ack_policy=AckPolicy.MANUAL, decoder=raw_body)
    async def on_batch() -> None:
        await handle_request(current_message(broker), deps)


def create_app(settings: Settings) -> FastAPI:
    """Build the agent of `settings.site_id`; it connects only when the app starts."""
    broker = make_broker(settings.rabbit_url, prefetch=settings.prefetch)
    redis = make_redis(settings.redis_url)
    backends = Backends(settings.backends)
    cancels = CancelWatcher(redis, settings.cancel_poll_s)
    forwarder = Forwarder(streams.StreamWriter(redis), settings)
    executor = Executor(settings, redis, backends, forwarder, cancels)
    heartbeat = Heartbeat(settings, broker, backends)
    _subscribe(broker, Deps(settings=settings, broker=broker, executor=executor, redis=redis))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await broker.connect()
        await topology.prepare(
            broker,
            declare=settings.declare_topology,
            timeout_s=settings.publish_timeout_s,
            site_id=settings.site_id,
        )
        # The HTTP sessions to vLLM are opened here, in the running loop (aiohttp's rule), and
        # closed after the broker has stopped: requests in flight until then use them.
        async with forwarder, heartbeat:
            await heartbeat.probe()
            await broker.start()
            tasks = [
                asyncio.create_task(cancels.run(), name="cancel-watcher"),
                asyncio.create_task(heartbeat.run(), name="heartbeat"),
            ]
            logger.info("site %s serving %s", settings.site_id, ", ".join(settings.backends))
            metrics.BACKENDS.attach(backends)
            try:
                yield
            finally:
                metrics.BACKENDS.detach(backends)
                tasks[1].cancel()
                await broker.stop()  # waits (bounded) for requests in flight; they need the watcher
                tasks[0].cancel()
                await asyncio.wait(tasks)
                await redis.aclose()

    app = FastAPI(title=f"FIRST site agent ({settings.site_id})", lifespan=lifespan)
    app.state.settings = settings
    app.state.backends = backends
    app.state.heartbeat = heartbeat

    async def broker_ready() -> None:
        if not await broker.ping(timeout=1.0):
            raise ConnectionError("not connected to RabbitMQ")

    add_ops_routes(app, {"broker": broker_ready, "redis": redis.ping})

    @app.get("/status")
    async def status() -> object:
        """Show what the next heartbeat would say (models, instances, load)."""
        return msgspec.to_builtins(heartbeat.build(time.time()))

    return app
