"""The inference path: admit a request, publish it, and answer from its Redis stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from faststream.rabbit import RabbitBroker
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas import names
from schemas.messages import Endpoint, RunInference
from schemas.records import AnyRecord, Chunk, ErrorInfo, Failure, Final
from schemas.records import Response as WholeResponse
from services.access.admission import Access, job_for, model_not_found
from services.access.errors import ApiError, PayloadTooLarge, Unavailable, UpstreamTimeout
from services.access.principal import Principal
from services.access.settings import CatalogueModel
from services.common import topology
from services.common.broker import publish
from services.common.ids import new_request_id
from services.common.logging import request_id_var
from services.gateway import metrics
from services.gateway.errors import error_body, error_response
from services.gateway.registry import RegistryView, serving_sites
from services.gateway.settings import Settings
from services.gateway.streams import StreamReader, Subscription

logger = logging.getLogger(__name__)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
CANCEL_TTL_S = 3600
_json = __import__("msgspec").json.Encoder()


@dataclass(frozen=True)
class Gateway:
    """Everything a request handler needs, built once by the app factory."""

    settings: Settings
    broker: RabbitBroker
    redis: Redis
    engine: AsyncEngine
    reader: StreamReader
    registry: RegistryView
    access: Access

    @property
    def catalogue(self) -> dict[str, CatalogueModel]:
        """The models by name (built once, with the process's Access)."""
        return self.access.catalogue


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing (413) anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"Request body of {declared} bytes exceeds the limit of {limit} bytes."
        )
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
    return bytes(body)


async def wait_for_site(gw: Gateway, entry: CatalogueModel) -> None:
    """Wait (bounded) for a live site serving the model; 503 with Retry-After if none comes."""
    deadline = time.monotonic() + gw.settings.no_site_wait_s
    while True:
        sites = await gw.registry.sites()
        if serving_sites(sites, entry.name, time.time(), gw.settings.site_ttl_s, entry.sites):
            return
        if time.monotonic() >= deadline:
            raise Unavailable(
                f"No site is serving `{entry.name}` right now; retry later.",
                code="no_site_available",
                headers={"retry-after": str(gw.settings.retry_after_s)},
            )
        await asyncio.sleep(0.25)


async def handle(
    gw: Gateway, request: Request, endpoint: Endpoint, principal: Principal
) -> Response:
    """Serve one OpenAI inference request end to end."""
    body = await read_body(request, gw.settings.max_body_bytes)
    parsed, entry = gw.access.check(endpoint, body, principal)
    await wait_for_site(gw, entry)
    await gw.access.quotas.admit(principal)  # last: a refused request counts against nothing
    now = time.time()
    job = job_for(
        principal,
        endpoint,
        parsed,
        body,
        entry,
        request_id=new_request_id(),
        priority="interactive",
        created_at=now,
        expires_at=now + gw.settings.first_record_timeout_s,
    )
    request_id_var.set(job.request_id)
    return await _run(gw, job)


async def _run(gw: Gateway, job: RunInference) -> Response:
    started = time.monotonic()
    sub = gw.reader.subscribe(job.request_id)
    try:
        await _publish(gw, job)
        metrics.IN_FLIGHT.inc()
        try:
            first = await _first_record(gw, job, sub)
        except BaseException:
            metrics.IN_FLIGHT.dec()
            raise
        metrics.FIRST_RECORD.labels(job.endpoint).observe(time.monotonic() - started)
    except BaseException:
        gw.reader.unsubscribe(sub)
        raise
    headers = {"x-request-id": job.request_id}
    if isinstance(first, Chunk) or (job.stream and isinstance(first, Final)):
        relay = _relay(gw, job, sub, first, started)
        return StreamingResponse(
            relay, media_type="text/event-stream", headers=SSE_HEADERS | headers
        )
    gw.reader.unsubscribe(sub)
    metrics.IN_FLIGHT.dec()
    metrics.LATENCY.labels(job.endpoint).observe(time.monotonic() - started)
    metrics.count_tokens(job.model, first)
    return _whole(first, headers)


async def _publish(gw: Gateway, job: RunInference) -> None:
    try:
        await publish(
            gw.broker,
            job,
            exchange=topology.REQUESTS,
            routing_key=names.request_routing_key(job.priority),
            timeout=gw.settings.publish_timeout_s,
            message_id=job.request_id,
        )
    except Exception as exc:
        logger.error("publish failed: %s: %s", type(exc).__name__, exc)
        raise Unavailable(
            "The request queue is unavailable; the request was not accepted. Retry later.",
            code="queue_unavailable",
            headers={"retry-after": "1"},
        ) from exc


async def _first_record(gw: Gateway, job: RunInference, sub: Subscription) -> AnyRecord:
    try:
        return await sub.next(gw.settings.first_record_timeout_s)
    except TimeoutError:
        await cancel(gw.redis, job.request_id)
        raise UpstreamTimeout(
            "The request was not started within "
            f"{gw.settings.first_record_timeout_s:g} s and has been cancelled.",
            code="timeout",
            headers={"x-request-id": job.request_id},  # it was published (and is billed)
        ) from None


def _whole(record: AnyRecord, headers: dict[str, str]) -> Response:
    if isinstance(record, WholeResponse):
        return Response(
            record.body, status_code=record.status, media_type="application/json", headers=headers
        )
    if isinstance(record, Failure):
        return error_response(record.error, headers)
    # A Final with nothing before it: the request was cancelled or ended empty.
    info = ErrorInfo(
        status=502,
        message="The backend ended the request without a response.",
        type="server_error",
        code="empty_response",
    )
    return error_response(info, headers)


def _sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def _relay(
    gw: Gateway, job: RunInference, sub: Subscription, first: AnyRecord, started: float
) -> AsyncIterator[bytes]:
    """Yield each record as its own SSE event; cancel the generation if the client leaves."""
    record = first
    finished = False
    try:
        while True:
            # Every record already queued goes out in one write: one ASGI send (and one
            # socket write) per batch instead of per event, which is the relay's main cost.
            events: list[bytes] = []
            while True:
                if isinstance(record, Chunk):
                    events.append(_sse(record.data))
                elif isinstance(record, Failure):
                    events.append(_sse(_json.encode(error_body(record.error))))
                elif isinstance(record, Final):
                    finished = True
                    metrics.count_tokens(job.model, record)
                    events.append(b"data: [DONE]\n\n")
                    break
                if sub.queue.empty():
                    break
                record = sub.queue.get_nowait()
            yield b"".join(events)
            if finished:
                return
            try:
                record = await sub.next(gw.settings.record_timeout_s)
            except TimeoutError:
                info = UpstreamTimeout(
                    f"No token arrived for {gw.settings.record_timeout_s:g} s.", code="timeout"
                ).info()
                yield _sse(_json.encode(error_body(info)))
                yield b"data: [DONE]\n\n"
                return
    finally:
        gw.reader.unsubscribe(sub)
        metrics.IN_FLIGHT.dec()
        metrics.LATENCY.labels(job.endpoint).observe(time.monotonic() - started)
        if not finished:
            await asyncio.shield(cancel(gw.redis, job.request_id))


async def cancel(redis: Redis, request_id: str) -> None:
    """Tell the site agent to stop generating: a key it checks, and a message it listens for."""
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(names.cancel_key(request_id), b"1", ex=CANCEL_TTL_S)
            pipe.publish(names.CANCEL_CHANNEL, request_id)
            await pipe.execute()
    except RedisError:
        logger.exception("could not publish the cancellation of %s", request_id)


__all__ = ["ApiError", "Gateway", "cancel", "handle", "model_not_found"]
