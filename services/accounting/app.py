"""The accounting app: the usage consumer plus /health, /ready and /metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from schemas import names
from schemas.messages import UsageRecorded
from services.accounting.batcher import LedgerBatcher, RetryPolicy
from services.accounting.charges import charge
from services.accounting.handlers import register_usage_subscriber
from services.accounting.ledger import create_schema, ping
from services.accounting.settings import Settings
from services.common import topology
from services.common.broker import make_broker
from services.common.db import make_engine
from services.common.http import add_ops_routes
from services.common.redis import make_redis

logger = logging.getLogger(__name__)

BROKER_PING_TIMEOUT_S = 1.0


class BrokerDown(RuntimeError):
    """The broker connection is not up (reported by /ready)."""


def create_app(settings: Settings) -> FastAPI:
    """Return the app; its lifespan creates the ledger schema and runs the usage consumer."""
    engine = make_engine(settings.database_url)
    broker = make_broker(settings.rabbit_url, prefetch=settings.prefetch)
    retry = RetryPolicy(
        attempts=settings.db_retry_attempts,
        backoff_s=settings.db_retry_backoff_s,
        backoff_max_s=settings.db_retry_backoff_max_s,
        timeout_s=settings.db_timeout_s,
    )
    redis = make_redis(settings.redis_url)

    async def charge_quotas(events: Sequence[UsageRecorded]) -> None:
        await charge(redis, events, time.time())

    batcher = LedgerBatcher(engine, retry, max_batch=settings.max_batch, on_new=charge_quotas)
    register_usage_subscriber(broker, batcher)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            await create_schema(engine)
            await broker.connect()
            await topology.prepare(
                broker, declare=settings.declare_topology, timeout_s=settings.publish_timeout_s
            )
            await broker.start()
            logger.info(
                "consuming %s into %s",
                names.ACCOUNTING_USAGE_QUEUE,
                engine.url.render_as_string(hide_password=True),
            )
            yield
        finally:
            await broker.stop()
            await batcher.aclose()
            await engine.dispose()
            await redis.aclose()

    async def broker_ready() -> None:
        if not await broker.ping(timeout=BROKER_PING_TIMEOUT_S):
            raise BrokerDown("not connected to RabbitMQ")

    async def database_ready() -> None:
        await ping(engine)

    app = FastAPI(title="FIRST accounting", lifespan=lifespan)
    add_ops_routes(app, {"broker": broker_ready, "database": database_ready})
    return app
