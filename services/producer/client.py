"""The producer API: for pipelines that publish many requests without going through HTTP.

    async with Producer(amqp_url, redis_url, credential) as producer:
        request_id = await producer.submit("chat.completions", {"model": ..., "messages": ...})
        result = await producer.result(request_id)

`submit` publishes an `IngressRequest` (persistent, mandatory, publisher-confirmed) to
`first.ingress` with the credential in a header; at most `window` publishes await their
confirm at once, which bounds the producer's memory and the broker's unconfirmed backlog.
Request ids are UUIDv7s made here (services.common.ids: 62 random bits).

Results come one of two ways:
- from each request's Redis stream, which only the holder of the id can find (the Redis user
  needs read access to `first:stream:*` only); or
- with `reply_queue="name"`, from a queue of the producer's own, `first.reply.<its RabbitMQ
  user>.name` (declared here, durable, bound to `first.replies` by its own name): every
  request's `Reply` arrives there, refusals included, and no Redis is needed at all. Replies
  come at least once; the first per request id counts. The RabbitMQ user needs write
  permission on `first.ingress`, configure, write and read on its `first.reply.<user>.*`
  queues, read on `first.replies`, and topic permission to bind only keys under its own
  prefix (`first rabbit setup --producer NAME` grants all of it).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Self, cast

import aio_pika
import msgspec
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from redis.asyncio import Redis

from schemas import names
from schemas.codec import DecodeError, encode, reply_decoder
from schemas.messages import Endpoint, IngressRequest
from schemas.names import Priority
from schemas.records import AnyRecord, Final, Reply
from services.common.broker import amqp_user
from services.common.ids import new_request_id
from services.common.redis import make_redis
from services.common.redis_access import acl_for
from services.common.replies import decode_entries, fold


class ProducerError(Exception):
    """A request could not be published (no confirm, unroutable, broker gone)."""


READER_ACL: tuple[str, ...] = acl_for("producer", "reader").rules(db=None)
"""The Redis ACL rules of a producer's user (after `ACL SETUSER <name> >password`): it may
read request streams and nothing else — no other key, no channel, no write. `first redis setup
--producer NAME` makes such a user (limited to its database too)."""

Result = Reply
"""What one request produced: its body (or chunks) or its error, how it ended, its usage."""


class Producer:
    """One AMQP connection (a confirm channel) and one Redis client."""

    def __init__(
        self,
        amqp_url: str,
        redis_url: str | None,
        credential: str,
        *,
        window: int = 256,
        confirm_timeout_s: float = 30.0,
        reply_queue: str | None = None,
    ) -> None:
        self._amqp_url = amqp_url
        self._user = amqp_user(amqp_url)
        self._credential = credential
        self._window = asyncio.Semaphore(window)
        self._prefetch = window
        self._confirm_timeout_s = confirm_timeout_s
        self.reply_to = names.reply_queue_prefix(self._user) + reply_queue if reply_queue else ""
        """The full name of this producer's reply queue ("" without one)."""
        self._replies: dict[str, asyncio.Future[Reply]] = {}
        # The blocking reads of `result` need a socket timeout above their BLOCK, and each
        # awaited result holds a connection while it blocks: callers keep at most `window`
        # results awaited at once (as `first queue publish` does).
        self._redis: Redis | None = None
        if redis_url is not None:
            self._redis = make_redis(redis_url, socket_timeout=10.0, max_connections=window + 8)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def __aenter__(self) -> Self:
        self._connection = await aio_pika.connect_robust(self._amqp_url, timeout=10)
        try:
            await self._open(self._connection)
        except BaseException:
            await self.__aexit__()  # a refused bind must not leave the connection behind
            raise
        return self

    async def _open(self, connection: AbstractRobustConnection) -> None:
        """Open the channel, find the ingress exchange, bind and consume the reply queue."""
        self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # Passive: the producer's user may write to the exchange, not declare it.
        self._exchange = await self._channel.get_exchange(names.INGRESS_EXCHANGE, ensure=False)
        if self.reply_to:
            await self._channel.set_qos(prefetch_count=self._prefetch)
            queue = await self._channel.declare_queue(
                self.reply_to, durable=True, arguments={"x-queue-type": "quorum"}, timeout=10
            )
            # Replies reach it through first.replies by its name (the default exchange is
            # closed to every service); only this producer may bind keys under its prefix.
            replies = await self._channel.get_exchange(names.REPLIES_EXCHANGE, ensure=False)
            key = names.reply_routing_key(self.reply_to)
            await queue.bind(replies, routing_key=key, timeout=10)
            await queue.consume(self._on_reply, timeout=10)

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()
        if self._redis is not None:
            await self._redis.aclose()

    def _waiter(self, request_id: str) -> asyncio.Future[Reply]:
        future = self._replies.get(request_id)
        if future is None:
            future = self._replies[request_id] = asyncio.get_running_loop().create_future()
        return future

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        """Hand a reply to whoever awaits it (or keep it until they do); drop duplicates."""
        try:
            reply = reply_decoder.decode(message.body)
        except DecodeError:
            await message.reject()  # not a reply: the queue has no dead-letter exchange
            return
        future = self._waiter(reply.request_id)
        if not future.done():
            future.set_result(reply)
        await message.ack()

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
            reply_to=self.reply_to,
        )
        message = aio_pika.Message(
            encode(request),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/msgpack",
            message_id=request.request_id,
            type="IngressRequest",
            headers={names.CREDENTIAL_HEADER: self._credential},
            user_id=self._user,  # RabbitMQ checks it; the router trusts it for reply_to
        )
        if self.reply_to:
            self._waiter(request.request_id)  # a reply may come before `result` is called
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
        """Wait for the request's result; raise TimeoutError after `timeout_s`.

        With a reply queue it is the request's Reply; otherwise its stream, read to the Final.
        """
        if self.reply_to:
            try:
                return await asyncio.wait_for(asyncio.shield(self._waiter(request_id)), timeout_s)
            except TimeoutError:
                raise TimeoutError(f"no reply for {request_id} within {timeout_s:g} s") from None
            finally:
                future = self._replies.get(request_id)
                if future is not None and future.done():
                    del self._replies[request_id]
        if self._redis is None:
            raise ProducerError("no Redis URL and no reply queue: nowhere to read results from")
        key, last = names.stream_key(request_id), "0-0"
        records: list[AnyRecord] = []
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            block_ms = max(1, int(min(left, 5.0) * 1000))
            reply = await self._redis.xread({key: last}, count=256, block=block_ms)
            for _key, entries in cast(list[Any], reply or []):
                last = entries[-1][0]
                records.extend(decode_entries(entries))
            folded = (
                fold(request_id, records) if records and isinstance(records[-1], Final) else None
            )
            if folded is not None:
                return folded
        raise TimeoutError(f"request {request_id} did not finish within {timeout_s:g} s")
