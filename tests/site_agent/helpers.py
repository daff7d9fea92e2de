"""Helpers for the router and site agent tests: requests, stream reading, queue taps."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
from faststream.rabbit import RabbitBroker
from redis.asyncio import Redis

from schemas import names
from schemas.codec import message_decoder, record_decoder
from schemas.messages import AnyMessage, Endpoint, RunInference
from schemas.records import AnyRecord, Final
from services.common import topology
from services.common.broker import publish
from services.common.ids import new_request_id
from services.site_agent.app import create_app
from services.site_agent.settings import Settings


def agent_settings(rabbit_url: str, redis_url: str, backends: dict[str, list[str]]) -> Settings:
    """Settings of an agent with a fresh site id, fast heartbeats and short bounds."""
    return Settings(
        site_id=unique("site"),
        rabbit_url=rabbit_url,
        redis_url=redis_url,
        backends=backends,
        heartbeat_interval_s=0.3,
        backend_read_timeout_s=5.0,
        cancel_poll_s=0.5,
        retry_delay_s=0.1,
    )


@asynccontextmanager
async def running_agent(settings: Settings) -> AsyncIterator[Settings]:
    """Run a site agent app (lifespan only, no HTTP server) for the block."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield settings


async def send_to_site(broker: RabbitBroker, site_id: str, request: RunInference) -> None:
    """Publish a request straight to a site's queue, as the router would."""
    key = names.site_routing_key(site_id, request.priority)
    await publish(broker, request, exchange=topology.SITES, routing_key=key, timeout=5)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def make_request(
    model: str,
    *,
    endpoint: Endpoint = "chat.completions",
    stream: bool = False,
    include_usage: bool = False,
    body: dict[str, Any] | None = None,
    expires_in: float = 60.0,
) -> RunInference:
    if body is None:
        if endpoint == "embeddings":
            body = {"model": model, "input": "hello"}
        elif endpoint == "completions":
            body = {"model": model, "prompt": "hello", "max_tokens": 8}
        else:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body = {**body, "stream": True}
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    now = time.time()
    return RunInference(
        request_id=new_request_id(),
        user_id="u-1",
        username="alice",
        model=model,
        endpoint=endpoint,
        stream=stream,
        include_usage=include_usage,
        body=json.dumps(body).encode(),
        created_at=now,
        expires_at=now + expires_in,
    )


async def read_stream(redis: Redis, request_id: str, within_s: float = 10.0) -> list[AnyRecord]:
    """Read a request's records from the start until its Final; fail after `within_s`."""
    key = names.stream_key(request_id)
    last = "0-0"
    records: list[AnyRecord] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        got = await redis.xread({key: last}, block=200, count=100)
        for _key, entries in got:
            for entry_id, fields in entries:
                last = entry_id
                records.append(record_decoder.decode(fields[names.RECORD_FIELD]))
                if isinstance(records[-1], Final):
                    return records
    raise AssertionError(f"no Final within {within_s} s; got {records!r}")


async def stream_records(redis: Redis, request_id: str) -> list[AnyRecord]:
    """Return what a request's stream holds now."""
    entries = await redis.xrange(names.stream_key(request_id))
    return [record_decoder.decode(fields[names.RECORD_FIELD]) for _, fields in entries]


async def wait_for(predicate: Any, within_s: float = 10.0, every: float = 0.05) -> None:
    """Wait until `predicate()` (sync or async) is true; fail after `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met within {within_s} s")


class Tap:
    """An exclusive queue bound to an exchange, to see what gets published there."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    async def get_raw(self, within_s: float = 10.0) -> Any:
        """Return the next delivery (an aio-pika message) as it came."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            message = await self.queue.get(no_ack=True, fail=False, timeout=5)
            if message is not None:
                return message
            await asyncio.sleep(0.05)
        raise AssertionError(f"nothing published within {within_s} s")

    async def get(self, within_s: float = 10.0) -> tuple[AnyMessage, Any]:
        """Return the next message, decoded, and its delivery."""
        message = await self.get_raw(within_s)
        return message_decoder.decode(message.body), message

    async def get_for(self, request_id: str, within_s: float = 10.0) -> AnyMessage:
        """Return the next message about `request_id`, skipping others'."""
        deadline = time.monotonic() + within_s
        while True:
            message, _raw = await self.get(max(0.1, deadline - time.monotonic()))
            if getattr(message, "request_id", None) == request_id:
                return message

    async def empty(self) -> bool:
        return await self.queue.get(no_ack=True, fail=False, timeout=5) is None


@asynccontextmanager
async def amqp(url: str) -> AsyncIterator[Any]:
    """A plain aio-pika channel on the test vhost."""
    connection = await aio_pika.connect_robust(url, timeout=10)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


async def tap(channel: Any, exchange: str, routing_key: str = "#") -> Tap:
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key=routing_key)
    return Tap(queue)


async def queue_depth(channel: Any, name: str) -> int:
    """Return the ready messages of an existing queue (unacked ones are not counted)."""
    queue = await channel.declare_queue(name, passive=True)
    count: int = queue.declaration_result.message_count
    return count
