"""The producer API: for pipelines that publish many requests without going through HTTP.

    async with Producer(amqp_url, redis_url, credential) as producer:
        request_id = await producer.submit("chat.completions", {"model": ..., "messages": ...})
        result = await producer.result(request_id)

`submit` publishes an `IngressRequest` (persistent, mandatory, publisher-confirmed) to
`first.ingress` with the credential in a header; at most `window` publishes await their
confirm at once, which bounds the producer's memory and the broker's unconfirmed backlog.
Request ids are UUIDv7s made here (74 random bits): results are read from each request's
Redis stream, which only the holder of the id can find. The RabbitMQ user needs write
permission on `first.ingress` only; the Redis user read access to `first:stream:*` only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Self, cast

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from redis.asyncio import Redis

from schemas import names
from schemas.codec import DecodeError, encode, record_decoder
from schemas.messages import Endpoint, IngressRequest
from schemas.names import Priority
from schemas.records import AnyRecord, Chunk, ErrorInfo, Failure, Final, Response
from services.common.ids import new_request_id
from services.common.redis import make_redis


class ProducerError(Exception):
    """A request could not be published (no confirm, unroutable, broker gone)."""


@dataclass
class Result:
    """What one request produced: its body (or chunks) or its error, and how it ended."""

    request_id: str
    status: int = 0
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)
    error: ErrorInfo | None = None
    outcome: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def json(self) -> Any:
        """Return the response body as JSON (None if there is none)."""
        return msgspec.json.decode(self.body) if self.body else None


class Producer:
    """One AMQP connection (a confirm channel) and one Redis client."""

    def __init__(
        self,
        amqp_url: str,
        redis_url: str,
        credential: str,
        *,
        window: int = 256,
        confirm_timeout_s: float = 30.0,
    ) -> None:
        self._amqp_url = amqp_url
        self._credential = credential
        self._window = asyncio.Semaphore(window)
        self._confirm_timeout_s = confirm_timeout_s
        # The blocking reads of `result` need a socket timeout above their BLOCK, and each
        # awaited result holds a connection while it blocks: callers keep at most `window`
        # results awaited at once (as `first queue publish` does).
        self._redis: Redis = make_redis(redis_url, socket_timeout=10.0, max_connections=window + 8)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def __aenter__(self) -> Self:
        self._connection = await aio_pika.connect_robust(self._amqp_url, timeout=10)
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        # Passive: the producer's user may write to the exchange, not declare it.
        self._exchange = await self._channel.get_exchange(names.INGRESS_EXCHANGE, ensure=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()
        await self._redis.aclose()

    async def submit(
        self,
        endpoint: Endpoint,
        body: dict[str, Any] | bytes,
        *,
        request_id: str | None = None,
        priority: Priority = "interactive",
    ) -> str:
        """Publish one request and wait for the broker's confirm; return its request id."""
        if self._exchange is None:
            raise ProducerError("use `async with Producer(...)` first")
        request = IngressRequest(
            request_id=request_id or new_request_id(),
            endpoint=endpoint,
            body=body if isinstance(body, bytes) else msgspec.json.encode(body),
            priority=priority,
            created_at=time.time(),
        )
        message = aio_pika.Message(
            encode(request),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/msgpack",
            message_id=request.request_id,
            type="IngressRequest",
            headers={names.CREDENTIAL_HEADER: self._credential},
        )
        async with self._window:
            try:
                await self._exchange.publish(
                    message,
                    routing_key=names.INGRESS_ROUTING_KEY,
                    mandatory=True,
                    timeout=self._confirm_timeout_s,
                )
            except (aio_pika.exceptions.AMQPError, TimeoutError, OSError) as exc:
                raise ProducerError(f"request {request.request_id} not accepted: {exc!r}") from exc
        return request.request_id

    async def result(self, request_id: str, timeout_s: float = 600.0) -> Result:
        """Read the request's stream until its Final; raise TimeoutError after `timeout_s`."""
        result = Result(request_id=request_id)
        key, last = names.stream_key(request_id), "0-0"
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            block_ms = max(1, int(min(left, 5.0) * 1000))
            reply = await self._redis.xread({key: last}, count=256, block=block_ms)
            for _key, entries in cast(list[Any], reply or []):
                for entry_id, fields in entries:
                    last = entry_id
                    if _apply(result, fields):
                        return result
        raise TimeoutError(f"request {request_id} did not finish within {timeout_s:g} s")


def _apply(result: Result, fields: dict[bytes, bytes]) -> bool:
    """Fold one stream record into `result`; True at the Final."""
    try:
        record: AnyRecord = record_decoder.decode(fields[names.RECORD_FIELD])
    except (KeyError, DecodeError):
        return False
    if isinstance(record, Response):
        result.status, result.body = record.status, record.body
    elif isinstance(record, Chunk):
        result.status = 200
        result.chunks.append(record.data)
    elif isinstance(record, Failure):
        result.status, result.error = record.error.status, record.error
    elif isinstance(record, Final):
        result.outcome = record.outcome
        result.prompt_tokens = record.usage.prompt_tokens
        result.completion_tokens = record.usage.completion_tokens
        return True
    return False
