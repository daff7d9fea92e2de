"""Thin adapter from a site queue delivery to the executor, the usage publish and the ack."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from faststream.rabbit import RabbitBroker
from faststream.rabbit.message import RabbitMessage
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import names
from schemas.codec import run_inference_decoder
from services.common import replies, topology
from services.common.broker import PUBLISH_ERRORS, decode_or_reject, publish
from services.common.logging import request_id_var, site_id_var, user_id_var
from services.site_agent import metrics
from services.site_agent.execution import Executor
from services.site_agent.settings import Settings

logger = logging.getLogger(__name__)

RETRYABLE: tuple[type[BaseException], ...] = (RedisError, *PUBLISH_ERRORS)
"""Failures to record an outcome that a later delivery may get past."""


@dataclass(frozen=True)
class Deps:
    """What the handler uses; built once by `create_app`."""

    settings: Settings
    broker: RabbitBroker
    executor: Executor
    redis: Redis
    finished: Callable[[], None] = lambda: None
    """Called when a request leaves its slot (the heartbeat's nudge: routers refill it)."""


async def handle_request(msg: RabbitMessage, deps: Deps) -> None:
    """Run one RunInference to its Final, publish its usage (and its reply, if asked), then ack.

    Redis or broker trouble requeues (after a pause; the queue's delivery limit bounds it);
    an unexpected error dead-letters the request, whose stream the dead-letter consumer ends.
    """
    if await reject_if_forged(msg, deps.settings, "work"):
        return
    request = await decode_or_reject(msg, run_inference_decoder)
    if request is None:
        return
    request_id_var.set(request.request_id)
    user_id_var.set(request.user_id)
    site_id_var.set(deps.settings.site_id)
    try:
        with metrics.track(request):
            try:
                usage = await deps.executor.execute(request)
            finally:
                deps.finished()
            if usage is not None:
                await publish(
                    deps.broker,
                    usage,
                    exchange=topology.USAGE,
                    routing_key=names.USAGE_ROUTING_KEY,
                    timeout=deps.settings.publish_timeout_s,
                    message_id=request.request_id,
                )
                if request.reply_to:
                    await _reply(deps, request.request_id, request.reply_to)
    except RETRYABLE as exc:
        logger.warning("cannot record the outcome, requeueing: %r", exc)
        await asyncio.sleep(deps.settings.retry_delay_s)
        await msg.nack(requeue=True)
        return
    except Exception:
        logger.exception("unexpected failure; dead-lettering the request")
        await msg.reject(requeue=False)
        return
    await msg.ack()
    if usage is not None:
        logger.info(
            "%s %s: %d prompt + %d completion tokens billed",
            request.model,
            usage.outcome,
            usage.prompt_tokens,
            usage.completion_tokens,
        )


def is_from_router(publisher: str | None, settings: Settings) -> bool:
    """Tell whether a delivery's publisher (its `user_id`, which RabbitMQ validated against the
    publishing connection's user) is one of the routers this agent takes orders from."""
    return publisher is not None and publisher in settings.trusted_routers()


async def reject_if_forged(msg: RabbitMessage, settings: Settings, kind: str) -> bool:
    """Dead-letter a work or control message that no router published; say if it did.

    It is never run and its stream is never written: its request id is the forger's choice,
    and may be another user's live request. (The router's dead-letter consumer leaves the
    streams of requests that no gateway or router published alone, too.)
    """
    publisher = msg.raw_message.user_id
    if is_from_router(publisher, settings):
        return False
    logger.warning(
        "rejecting a %s message (type=%s, id=%s) from %s: not a router",
        kind,
        msg.raw_message.type,
        msg.message_id,
        publisher or "an unnamed publisher",
    )
    metrics.FORGED.labels(kind).inc()
    await msg.reject(requeue=False)
    return True


async def _reply(deps: Deps, request_id: str, reply_to: str) -> None:
    """Send the finished stream to the producer's reply queue (before the ack: at least once)."""
    reply = await replies.read_reply(deps.redis, request_id)
    if reply is None:  # the stream expired or was trimmed: nothing left to fold
        logger.warning("no finished stream to reply with")
        return
    await replies.send_reply(deps.broker, reply_to, reply, deps.settings.publish_timeout_s)
