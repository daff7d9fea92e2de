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
from schemas.codec import control_decoder
from services.common import streams, topology
from services.common.broker import current_message, decode_or_reject, make_broker, raw_body
from services.common.http import add_ops_routes
from services.common.redis import make_redis
from services.site_agent import metrics
from services.site_agent.backends import Backends
from services.site_agent.cancel import CancelWatcher
from services.site_agent.execution import Executor
from services.site_agent.forwarder import Forwarder
from services.site_agent.handlers import Deps, handle_request, reject_if_forged
from services.site_agent.heartbeat import Heartbeat
from services.site_agent.instance_keys import read_key
from services.site_agent.instances import InstanceManager
from services.site_agent.launchers import make_launcher
from services.site_agent.settings import Settings
from services.site_agent.siteconfig import SiteConfig, load_site_config

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


def _subscribe_control(
    broker: RabbitBroker, settings: Settings, manager: InstanceManager | None
) -> None:
    control = topology.work_queue(names.site_control_queue(settings.site_id), declare=False)

    @broker.subscriber(control, ack_policy=AckPolicy.MANUAL, decoder=raw_body)
    async def on_control() -> None:
        msg = current_message(broker)
        if await reject_if_forged(msg, settings, "control"):
            return
        command = await decode_or_reject(msg, control_decoder)
        if command is None:
            return
        if manager is None:
            logger.info(
                "%s for %s ignored: no site file, nothing to start",
                type(command).__name__,
                command.model,
            )
        else:
            manager.control(command)
        await msg.ack()


def with_site_file(settings: Settings) -> tuple[Settings, SiteConfig | None]:
    """Read the site file, if any; its site id (and heartbeat interval) win over the env."""
    if settings.config_file is None:
        return settings, None
    site = load_site_config(settings.config_file)
    update: dict[str, object] = {"site_id": site.site_id}
    if site.heartbeat_interval_s is not None:
        update["heartbeat_interval_s"] = site.heartbeat_interval_s
    return settings.model_copy(update=update), site


def site_keys(site: SiteConfig | None) -> dict[str, str]:
    """Read the keys of the site file's `urls` instances (KeyFileError if one is unreadable)."""
    if site is None:
        return {}
    models = site.models.items()
    return {m: read_key(c.api_key_file) for m, c in models if c.api_key_file is not None}


def create_app(settings: Settings) -> FastAPI:
    """Build the agent of `settings.site_id`; it connects only when the app starts."""
    settings, site = with_site_file(settings)
    broker = make_broker(settings.rabbit_url, prefetch=settings.prefetch)
    redis = make_redis(settings.redis_url)
    backends = Backends(
        settings.backends,
        site.models if site is not None else None,
        env_keys={m: read_key(path) for m, path in settings.backend_key_files.items()},
        site_keys=site_keys(site),
    )
    manager = None
    if site is not None:
        launcher = make_launcher(site.launcher, site.state_dir)
        manager = InstanceManager(
            backends,
            launcher,
            interval_s=settings.lifecycle_interval_s,
            probe_timeout_s=settings.probe_timeout_s,
        )
    cancels = CancelWatcher(redis, settings.cancel_poll_s)
    forwarder = Forwarder(streams.StreamWriter(redis), settings)
    executor = Executor(settings, redis, backends, forwarder, cancels)
    heartbeat = Heartbeat(settings, broker, backends)
    deps = Deps(
        settings=settings,
        broker=broker,
        executor=executor,
        redis=redis,
        finished=heartbeat.nudge,
    )
    _subscribe(broker, deps)
    _subscribe_control(broker, settings, manager)

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
            if manager is not None:
                await manager.recover()
            await heartbeat.probe()
            await broker.start()
            tasks = [
                asyncio.create_task(cancels.run(), name="cancel-watcher"),
                asyncio.create_task(heartbeat.run(), name="heartbeat"),
            ]
            if manager is not None:
                tasks.append(asyncio.create_task(manager.run(), name="instance-manager"))
            logger.info("site %s serving %s", settings.site_id, ", ".join(backends.pools))
            metrics.BACKENDS.attach(backends)
            try:
                yield
            finally:
                metrics.BACKENDS.detach(backends)
                for task in tasks[1:]:
                    task.cancel()  # instances outlive the agent: its successor adopts them
                await broker.stop()  # waits (bounded) for requests in flight; they need the watcher
                tasks[0].cancel()
                await asyncio.wait(tasks)
                await redis.aclose()

    app = FastAPI(title=f"FIRST site agent ({settings.site_id})", lifespan=lifespan)
    app.state.settings = settings
    app.state.backends = backends
    app.state.heartbeat = heartbeat
    app.state.manager = manager

    async def broker_ready() -> None:
        if not await broker.ping(timeout=1.0):
            raise ConnectionError("not connected to RabbitMQ")

    add_ops_routes(app, {"broker": broker_ready, "redis": redis.ping})

    @app.get("/status")
    async def status() -> object:
        """Show what the next heartbeat would say (models, instances, load)."""
        return msgspec.to_builtins(heartbeat.build(time.time()))

    return app
