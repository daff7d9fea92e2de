"""The consumer of `first.dead`: log each dead letter once, end a dead request's stream.

A dead letter is never requeued (the dead queue has no dead-letter exchange of its own, so a
requeue would loop). If the stream cannot be written, the error is logged and the message
acked all the same: the gateway's own wait bound then ends the client's request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from faststream.rabbit.message import RabbitMessage
from redis.exceptions import RedisError

from schemas import names
from schemas.codec import DecodeError, run_inference_decoder
from schemas.messages import RunInference
from schemas.records import Final
from services.common import replies, streams
from services.common.broker import PUBLISH_ERRORS, amqp_user
from services.common.logging import request_id_var, site_id_var, user_id_var
from services.router import errors, metrics
from services.router.handlers import Deps

logger = logging.getLogger(__name__)

ALREADY_FINISHED = "already finished"
ENDED = "ended with an error"
REPLY_ERRORS: tuple[type[BaseException], ...] = (RedisError, *PUBLISH_ERRORS)


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def death_of(headers: Mapping[str, Any]) -> tuple[str, str, int]:
    """Return (reason, queue, count) of the latest death in the `x-death` header."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        latest = deaths[0]
        count = latest.get("count", 1)
        return (
            _text(latest.get("reason", "unknown")),
            _text(latest.get("queue", "unknown")),
            count if isinstance(count, int) else 1,
        )
    return ("unknown", "unknown", 0)


async def handle_dead(msg: RabbitMessage, deps: Deps) -> None:
    """Log a dead letter once at WARNING (never its body), end its request's stream, ack."""
    reason, queue, count = death_of(msg.headers)
    refused = msg.headers.get(names.REASON_HEADER)
    try:
        request: RunInference | None = run_inference_decoder.decode(msg.body)
    except DecodeError:
        request = None
    stream = "not a request"
    if refused is not None:
        # Refused by a router, which already ended the stream if it was new: writing it here
        # could end a request that another user really made (the forger chose the id).
        reason, queue, count = _text(refused), "router", 1
        stream = "left to the router"
    elif request is not None and not is_ours(msg.raw_message.user_id, deps):
        # Not published by a gateway or a router (RabbitMQ validated user_id): a forgery, e.g.
        # a RunInference body sent to first.ingress. Its request id is the forger's choice.
        stream = f"left alone: published by {msg.raw_message.user_id or 'nobody named'}"
        request = None
    metrics.DEAD_LETTERS.labels(queue, reason).inc()
    if request is not None and refused is None:
        request_id_var.set(request.request_id)
        user_id_var.set(request.user_id)
        if request.site_id:
            site_id_var.set(request.site_id)
        stream = await _end_stream(deps, request, reason)
        if stream != ALREADY_FINISHED:
            metrics.FAILED.labels("dead_lettered").inc()
        if stream == ENDED and request.reply_to:
            stream += await _reply(deps, request)
    logger.warning(
        "dead letter: type=%s id=%s reason=%s queue=%s deaths=%d bytes=%d stream=%s",
        msg.raw_message.type,
        msg.message_id,
        reason,
        queue,
        count,
        len(msg.body),
        stream,
    )
    await msg.ack()


def is_ours(publisher: str | None, deps: Deps) -> bool:
    """Tell whether a dead RunInference was published by a gateway or by a router (this one's
    user), the only publishers of requests whose streams the router may end."""
    settings = deps.settings
    return publisher is not None and (
        publisher in settings.trusted_publishers() or publisher == amqp_user(settings.rabbit_url)
    )


async def _end_stream(deps: Deps, request: RunInference, reason: str) -> str:
    """End the request's stream with an error unless it has its Final; say what was done."""
    try:
        last = await streams.last_record(deps.redis, request.request_id)
    except DecodeError:
        last = None
    except RedisError as exc:
        return f"unreadable ({exc})"
    if isinstance(last, Final):
        return ALREADY_FINISHED
    try:
        await streams.fail(
            deps.redis,
            request.request_id,
            errors.dead_lettered(reason),
            site_id=request.site_id,
            ttl_s=deps.settings.stream_ttl_s,
        )
    except RedisError as exc:
        return f"not ended ({exc})"
    return ENDED


async def _reply(deps: Deps, request: RunInference) -> str:
    """Send the ended stream to the request's reply queue; say how that went."""
    try:
        reply = await replies.read_reply(deps.redis, request.request_id)
        if reply is None:
            return "; no reply: the stream has no Final"
        sent = await replies.send_reply(
            deps.broker, request.reply_to, reply, deps.settings.publish_timeout_s
        )
    except REPLY_ERRORS as exc:  # the ack goes ahead all the same: a dead letter never loops
        return f"; reply not sent ({exc!r})"
    return "; replied" if sent else "; reply queue gone"
