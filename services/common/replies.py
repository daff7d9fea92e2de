"""Reply queues: a request's stream folded into one `Reply`, sent where its producer asked.

The stream stays the source of truth (the gateway and `Producer.result` read it); a reply is
a copy made when the stream has its Final, by whoever wrote that Final (the site agent, or
the router when it refuses or dead-letters a request). It goes through `first.replies`, routed
by the name in `reply_to` (which the router checked belongs to the producer's own RabbitMQ
user, and which only that producer may bind), mandatory and confirmed — never through the
default exchange, which no service may write. A queue that does not exist (the producer deleted
it) is logged and skipped: nobody is waiting there, and retrying would not make it exist.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

from aio_pika.exceptions import DeliveryError
from faststream.rabbit import RabbitBroker
from redis.asyncio import Redis

from schemas import names
from schemas.codec import DecodeError, record_decoder
from schemas.records import AnyRecord, Chunk, ErrorInfo, Failure, Final, Reply, Response, Usage
from services.common import topology
from services.common.broker import publish

logger = logging.getLogger(__name__)


def fold(request_id: str, records: Iterable[AnyRecord]) -> Reply | None:
    """Return the Reply of a stream's records, None if they have no Final yet (pure)."""
    status, body, error = 0, b"", None
    chunks: list[bytes] = []
    for record in records:
        if isinstance(record, Response):
            status, body = record.status, record.body
        elif isinstance(record, Chunk):
            status = 200
            chunks.append(record.data)
        elif isinstance(record, Failure):
            status, error = record.error.status, record.error
        elif isinstance(record, Final):
            return Reply(
                request_id=request_id,
                status=status,
                outcome=record.outcome,
                usage=record.usage,
                body=body,
                chunks=tuple(chunks),
                error=error,
            )
    return None


def refusal(request_id: str, error: ErrorInfo) -> Reply:
    """Return the Reply of a request refused before it ran."""
    return Reply(
        request_id=request_id, status=error.status, outcome="failed", usage=Usage(), error=error
    )


def decode_entries(entries: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> list[AnyRecord]:
    """Decode stream entries to records, skipping any that are not records."""
    records: list[AnyRecord] = []
    for _entry_id, fields in entries:
        try:
            records.append(record_decoder.decode(fields[names.RECORD_FIELD]))
        except (KeyError, DecodeError):
            continue
    return records


async def read_reply(redis: Redis, request_id: str) -> Reply | None:
    """Read the request's whole stream and fold it (None if it has no Final)."""
    entries = cast(list[Any], await redis.xrange(names.stream_key(request_id), "-", "+"))
    return fold(request_id, decode_entries(entries))


async def send_reply(broker: RabbitBroker, reply_to: str, reply: Reply, timeout_s: float) -> bool:
    """Publish `reply` to the queue `reply_to` (confirmed); False if no such queue is bound.

    Raises what `services.common.broker.publish` raises for a broker that did not confirm.
    """
    try:
        await publish(
            broker,
            reply,
            exchange=topology.REPLIES,
            routing_key=names.reply_routing_key(reply_to),
            timeout=timeout_s,
            message_id=reply.request_id,
        )
    except DeliveryError as exc:
        if exc.frame is None or getattr(exc.frame, "reply_code", None) != 312:  # 312: NO_ROUTE
            raise
        logger.warning(
            "reply queue %s is not bound; reply of %s dropped", reply_to, reply.request_id
        )
        return False
    return True
