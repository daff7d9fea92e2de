"""The batch worker's process: `first batch-worker` (gateway settings, env FIRST_GATEWAY_*).

It consumes `first.batch.results` (the lines' replies) with manual acks — a reply is acked
only after its line's row is written, and a database error requeues it — and runs the worker's
rounds every `batch_poll_s`. Several workers on one database are safe for results (writes are
conditional on the line's state) but would publish the same batch twice over: run one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from faststream import AckPolicy
from faststream.rabbit import RabbitBroker
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from schemas import names
from schemas.codec import reply_decoder
from services.access.settings import AccessSettings
from services.common import topology
from services.common.broker import (
    PUBLISH_ERRORS,
    current_message,
    decode_or_reject,
    make_broker,
    raw_body,
)
from services.common.db import make_engine
from services.common.http import add_ops_routes, serve
from services.common.logging import configure_logging
from services.common.redis import make_redis
from services.gateway import batch_db
from services.gateway.batch_worker import BatchWorker
from services.gateway.filestore import DirectoryStore
from services.gateway.settings import Settings

logger = logging.getLogger(__name__)
ROUND_ERRORS: tuple[type[BaseException], ...] = (
    *PUBLISH_ERRORS,
    RedisError,
    SQLAlchemyError,
    TimeoutError,
)
"""What fails a round; the next round starts over from SQL."""


def _subscribe(broker: RabbitBroker, worker: BatchWorker) -> None:
    results = topology.work_queue(names.BATCH_RESULTS_QUEUE, declare=False)

    @broker.subscriber(results, ack_policy=AckPolicy.MANUAL, decoder=raw_body)
    async def on_result() -> None:
        msg = current_message(broker)
        reply = await decode_or_reject(msg, reply_decoder)
        if reply is None:
            return
        try:
            if not await worker.on_reply(reply):
                logger.debug("reply of %s: no open line (a duplicate)", reply.request_id)
        except SQLAlchemyError as exc:
            logger.warning("reply of %s not written, requeued: %s", reply.request_id, exc)
            await asyncio.sleep(1.0)
            await msg.nack(requeue=True)
            return
        await msg.ack()


async def run_rounds(worker: BatchWorker, interval_s: float) -> None:
    """Run the worker's rounds until cancelled; a failed round is logged and retried."""
    while True:
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the shutdown's cancel.
            async with asyncio.timeout(max(60.0, 10 * interval_s)):
                await worker.round()
        except ROUND_ERRORS as exc:
            logger.warning("batch round failed: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(interval_s)


def create_app(settings: Settings, access: AccessSettings) -> FastAPI:
    """Return the worker's app: its lifespan connects, consumes and runs the rounds."""
    broker = make_broker(settings.rabbit_url, prefetch=256)
    redis = make_redis(settings.redis_url)
    engine = make_engine(settings.database_url)
    worker = BatchWorker(
        settings, access, broker, redis, engine, DirectoryStore(settings.batch_dir)
    )
    _subscribe(broker, worker)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await batch_db.create_schema(engine)
        await broker.connect()
        await topology.prepare(
            broker, declare=settings.declare_topology, timeout_s=settings.publish_timeout_s
        )
        await broker.start()
        rounds = asyncio.create_task(run_rounds(worker, settings.batch_poll_s))
        try:
            yield
        finally:
            rounds.cancel()
            await asyncio.wait({rounds}, timeout=settings.publish_timeout_s)
            await broker.stop()
            await redis.aclose()
            await engine.dispose()

    app = FastAPI(title="FIRST batch worker", lifespan=lifespan)
    app.state.worker = worker

    async def broker_ready() -> None:
        if not await broker.ping(timeout=1.0):
            raise ConnectionError("not connected to RabbitMQ")

    async def db_ready() -> None:
        async with engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")

    add_ops_routes(app, {"broker": broker_ready, "redis": redis.ping, "database": db_ready})
    return app


def main() -> None:
    """Read settings, configure logging, run the worker until SIGTERM."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    serve(
        create_app(settings, AccessSettings()),
        settings.batch_worker_host,
        settings.batch_worker_port,
    )


if __name__ == "__main__":
    main()
