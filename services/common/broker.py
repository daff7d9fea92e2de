"""Broker factory and the one way every service publishes a message."""

from __future__ import annotations

import logging
import urllib.parse
from typing import TypeVar

import msgspec
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from faststream.exceptions import IncorrectState
from faststream.rabbit import RabbitBroker, RabbitExchange
from faststream.rabbit.message import RabbitMessage
from faststream.rabbit.schemas import Channel

from schemas.codec import encode
from schemas.messages import Message

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/msgpack"

PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    AMQPError,
    ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
    IncorrectState,
)
"""What `publish` raises when a message was not confirmed (no route, nack, timeout, no link)."""

T = TypeVar("T")


async def decode_or_reject(msg: RabbitMessage, decoder: msgspec.msgpack.Decoder[T]) -> T | None:
    """Decode a delivery; a poison one is rejected once (to the dead-letter exchange) -> None."""
    try:
        return decoder.decode(msg.body)
    except msgspec.DecodeError as exc:
        logger.warning(
            "rejecting undecodable message (type=%s, id=%s, %d bytes): %s",
            msg.raw_message.type,
            msg.message_id,
            len(msg.body),
            exc,
        )
        await msg.reject(requeue=False)
        return None


_USER_ATTR = "_first_amqp_user"


def amqp_user(url: str) -> str:
    """Return the RabbitMQ user an AMQP URL connects as (AMQP's default is guest)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).username or "guest")


def make_broker(url: str, *, prefetch: int = 64) -> RabbitBroker:
    """Return an unconnected broker whose consumers take at most `prefetch` unacked messages."""
    broker = RabbitBroker(
        url,
        default_channel=Channel(prefetch_count=prefetch, on_return_raises=True),
        logger=None,
    )
    setattr(broker, _USER_ATTR, amqp_user(url))  # stamped on every publish (see `publish`)
    return broker


async def publish(
    broker: RabbitBroker,
    message: Message,
    *,
    exchange: RabbitExchange,
    routing_key: str,
    timeout: float,
    message_id: str | None = None,
) -> None:
    """Publish persistently and wait (bounded) for the broker's confirm.

    The message carries the publisher's RabbitMQ user in its `user_id` property, which
    RabbitMQ checks against the connection's user: a consumer can trust who published it.
    Raises if no queue is bound (mandatory), the broker nacks, or the confirm times out.
    """
    await broker.publish(
        encode(message),
        exchange=exchange,
        routing_key=routing_key,
        persist=True,
        mandatory=True,
        timeout=timeout,
        content_type=CONTENT_TYPE,
        message_id=message_id,
        message_type=type(message).__name__,
        user_id=getattr(broker, _USER_ATTR, None),
    )


async def raw_body(msg: RabbitMessage) -> bytes:
    """A subscriber decoder that leaves the body alone: our handlers decode it themselves.

    Without it FastStream decodes by content type before the handler runs, so a message
    labelled JSON that is not JSON would never reach the handler to be dead-lettered.
    """
    body: bytes = msg.body
    return body


def current_message(broker: RabbitBroker) -> RabbitMessage:
    """Return the delivery being handled, read from FastStream's context directly.

    Handlers take no parameters and call this: a `msg: RabbitMessage` parameter is resolved
    by FastStream's dependency layer in a worker thread, once per message (seen with py-spy).
    """
    msg = broker.context.get_local("message")
    if not isinstance(msg, RabbitMessage):
        raise RuntimeError("current_message() called outside a RabbitMQ handler")
    return msg
