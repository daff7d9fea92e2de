"""Forward one request to a vLLM instance over HTTP and write its records to the request's stream.

Streaming: vLLM is always asked for usage in every chunk (`stream_options.include_usage` and
`continuous_usage_stats`). Each SSE `data:` payload becomes one `Chunk` record, in order, with
the cumulative usage beside it and the `usage` key taken out of the client's bytes (clients get
OpenAI's shape: usage only in the final usage-only chunk, and only if they asked for it). So a
stream that breaks off or is cancelled bills exactly the tokens of the chunks it delivered.

The body is read as the bytes arrive, and all the events of one read go to Redis in one
round trip: vLLM's role chunk and first token often come in one read, and time to first token
would otherwise pay two sequential writes.

Every request carries the instance's key (`Authorization: Bearer`): an instance this site
started answers nothing without it (services/site_agent/relay.py).

A backend that sends no usage at all (not vLLM) is billed by counting chunks with content as
completion tokens, prompt tokens 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

from schemas.messages import Endpoint, Outcome, RunInference
from schemas.records import Chunk, ErrorInfo, Failure, Record, Response, Usage
from services.common import streams
from services.site_agent import errors, metrics
from services.site_agent.backends import Pool, SessionOwner, backend_session
from services.site_agent.instance_keys import bearer
from services.site_agent.settings import Settings
from services.site_agent.sse import DONE, SSESplitter

logger = logging.getLogger(__name__)

PATHS: dict[Endpoint, str] = {
    "chat.completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
TRY_NEXT: tuple[type[aiohttp.ClientError], ...] = (
    aiohttp.ClientOSError,  # includes ClientConnectorError: not reachable at all
    aiohttp.ConnectionTimeoutError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientPayloadError,
)
"""How an instance that is down, or dies (or is killed) after taking a connection, shows: no
connection, or one reset or closed before the response or in the middle of its body. Before
anything reached the stream the request is tried on the next instance (vLLM's partial work is
lost, and unbilled); after, it ends with an error, since the client already has part of an
answer."""
CONNECTIONS = 1024
"""The forwarder's limit on open connections to vLLM, unless the broker's prefetch is larger."""


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None


class _Payload(msgspec.Struct):
    """The parts of a vLLM chunk or body the agent reads; everything else passes through."""

    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    object: str = ""
    error: dict[str, Any] | None = None


_payload_decoder = msgspec.json.Decoder(_Payload)


@dataclass
class Progress:
    """What a forward has delivered so far; read when it is cancelled or breaks off.

    It counts the records handed to the stream writer, which writes them even if the forward
    is cancelled while it waits (see `Forwarder._write`).
    """

    content_chunks: int = 0
    usage: Usage | None = None
    records_written: int = 0

    def usage_so_far(self) -> Usage:
        """Return vLLM's usage if it came, else the chunk count as completion tokens."""
        return self.usage or Usage(completion_tokens=self.content_chunks)


@dataclass(frozen=True)
class Result:
    """How a forward ended and what it delivered."""

    outcome: Outcome
    usage: Usage = field(default_factory=Usage)


@dataclass
class Batch:
    """The records that one read's events become, and whether they end the stream."""

    records: list[Record] = field(default_factory=list)
    done: bool = False
    """[DONE] came: the stream is complete."""
    error: ErrorInfo | None = None
    """vLLM sent an error event: the stream ends with it."""


def backend_body(request: RunInference) -> bytes:
    """Return the body to send vLLM: the client's, asking for usage when streaming.

    Raises InvalidBody if the client's body is not a JSON object.
    """
    try:
        body = msgspec.json.decode(request.body)
    except msgspec.DecodeError as exc:
        raise errors.InvalidBody(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise errors.InvalidBody("The request body must be a JSON object.")
    if is_streaming(request):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return msgspec.json.encode(body)


def is_streaming(request: RunInference) -> bool:
    """Tell whether the request is answered with SSE (embeddings never are)."""
    return request.stream and request.endpoint != "embeddings"


def content_of(payload: _Payload) -> bool:
    """Tell whether a chunk carries generated text."""
    for choice in payload.choices or ():
        if choice.text or (choice.delta is not None and choice.delta.content):
            return True
    return False


def take_events(events: Iterable[bytes], include_usage: bool, progress: Progress) -> Batch:
    """Turn events' data into Chunk records, counting their content and usage into `progress`.

    Stops at [DONE] or at an error event. vLLM's usage-only final chunk becomes a record only
    if the client asked for usage (`include_usage`).
    """
    batch = Batch()
    for data in events:
        if data == DONE:
            batch.done = True
            return batch
        try:
            payload = _payload_decoder.decode(data)
        except msgspec.DecodeError:
            payload = _Payload()
        if payload.error is not None or payload.object == "error":
            batch.error = errors.from_backend(None, data)
            return batch
        if content_of(payload):
            progress.content_chunks += 1
        if payload.usage is None:
            batch.records.append(Chunk(data=data))
            continue
        progress.usage = Usage(
            prompt_tokens=payload.usage.prompt_tokens,
            completion_tokens=payload.usage.completion_tokens,
        )
        if payload.choices:
            batch.records.append(Chunk(data=without_usage(data), usage=progress.usage))
        elif include_usage:  # vLLM's final usage-only chunk
            batch.records.append(Chunk(data=data, usage=progress.usage))
    return batch


def without_usage(data: bytes) -> bytes:
    """Return a chunk's JSON without its `usage` key (kept for the agent, not the client)."""
    chunk = msgspec.json.decode(data)
    if isinstance(chunk, dict):
        chunk.pop("usage", None)
    return msgspec.json.encode(chunk)


class Forwarder(SessionOwner):
    """Sends requests to a pool's instances and writes what comes back.

    Use it as `async with forwarder:` around its use: that opens its HTTP session to vLLM,
    which aiohttp binds to the running loop.
    """

    def __init__(self, writer: streams.StreamWriter, settings: Settings) -> None:
        self._writer = writer
        self._settings = settings
        connect = settings.backend_connect_timeout_s
        # `connect` bounds both the wait for a free connection of the pool and the TCP connect;
        # the pool is sized so that there is no such wait (see __aenter__). `sock_read` is the
        # longest gap between two reads of a stream; a non-streamed answer has `total` for the
        # whole response (vLLM sends nothing before it is complete).
        self._stream_timeout = aiohttp.ClientTimeout(
            connect=connect, sock_read=settings.backend_read_timeout_s
        )
        self._response_timeout = aiohttp.ClientTimeout(
            total=settings.backend_response_timeout_s, connect=connect
        )

    def _open_session(self) -> aiohttp.ClientSession:
        # One session: unlike httpx's pool, aiohttp's connector costs no more per request with
        # many connections (measured: the same CPU per stream with 1 or 16 sessions at 64-512
        # streams in flight). A request never waits for a connection, since the broker's
        # prefetch bounds the requests in flight; a connect timeout therefore always means
        # an instance that does not answer, never a busy pool.
        settings = self._settings
        limit = max(CONNECTIONS, settings.prefetch + settings.batch_prefetch)
        return backend_session(limit, self._stream_timeout)

    @contextlib.asynccontextmanager
    async def _post(
        self, url: str, key: str, body: bytes, timeout: aiohttp.ClientTimeout
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST `body`; on leaving, close the connection unless the response was read to its end.

        Closing is how vLLM learns to abort a generation nobody reads any more (a cancel, a
        timeout, an error event); and a connection with a response still coming must not go
        back to the pool. aiohttp would close it too; this does not depend on that.
        """
        if self._http is None:
            raise RuntimeError("Forwarder used outside `async with`")
        headers = JSON_HEADERS | bearer(key)
        async with self._http.post(url, data=body, headers=headers, timeout=timeout) as resp:
            try:
                yield resp
            finally:
                if not resp.content.is_eof():
                    resp.close()

    async def _write(self, request: RunInference, progress: Progress, *records: Record) -> None:
        # The expiry goes on with the first record (the Final renews it); chunks are plain XADDs.
        ttl_s = self._settings.stream_ttl_s if progress.records_written == 0 else None
        try:
            await self._writer.append(request.request_id, *records, ttl_s=ttl_s)
        except asyncio.CancelledError:
            # Cancelled (the client went away) while the records were in flight. The writer's
            # drainer writes them all the same, and `progress` counts them: wait until they
            # are in the stream, so that the Final the executor writes next comes after them
            # and bills exactly what the stream holds. An append of nothing resolves once
            # everything queued before it is written (one round trip at most, bounded by the
            # Redis client's socket timeout).
            await self._writer.append(request.request_id, ttl_s=None)
            raise
        progress.records_written += len(records)
        metrics.written(records)

    async def fail(self, request: RunInference, progress: Progress, error: ErrorInfo) -> Result:
        logger.info("request failed: %s %s", error.status, error.code)
        await self._write(request, progress, Failure(error=error))
        return Result("failed", progress.usage_so_far())

    async def forward(self, request: RunInference, pool: Pool, progress: Progress) -> Result:
        """Run `request` on the first instance that answers it; write its records.

        An instance that cannot be reached, or that breaks off before anything reached the
        stream (see TRY_NEXT), is marked down and the next one is tried.
        """
        try:
            body = backend_body(request)
        except errors.InvalidBody as exc:
            return await self.fail(request, progress, errors.invalid_body(str(exc)))
        streaming = is_streaming(request)
        for instance in pool.candidates():
            url = instance.url + PATHS[request.endpoint]
            try:
                with instance.busy():
                    if streaming:
                        return await self._stream(request, url, instance.key, body, progress)
                    return await self._respond(request, url, instance.key, body, progress)
            except TRY_NEXT as exc:
                if progress.records_written > 0:  # the client has tokens: it cannot start over
                    return await self.fail(request, progress, errors.backend_error(repr(exc)))
                logger.warning(
                    "instance %s failed before answering, trying the next: %r", instance.url, exc
                )
                instance.mark_down()
            except TimeoutError:  # after the connect: a read gap, or the whole response
                settings = self._settings
                limit = (
                    settings.backend_read_timeout_s
                    if streaming
                    else settings.backend_response_timeout_s
                )
                return await self.fail(request, progress, errors.backend_timeout(limit))
            except aiohttp.ClientError as exc:
                return await self.fail(request, progress, errors.backend_error(repr(exc)))
        return await self.fail(request, progress, errors.backend_unavailable(request.model))

    async def _respond(
        self, request: RunInference, url: str, key: str, body: bytes, progress: Progress
    ) -> Result:
        async with self._post(url, key, body, self._response_timeout) as response:
            status = response.status
            raw = await response.read()
        if status >= 400:
            return await self.fail(request, progress, errors.from_backend(status, raw))
        try:
            usage = _payload_decoder.decode(raw).usage
        except msgspec.DecodeError:
            usage = None
        if usage is not None:
            completion = 0 if request.endpoint == "embeddings" else usage.completion_tokens
            progress.usage = Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=completion)
        await self._write(request, progress, Response(status=status, body=raw))
        return Result("completed", progress.usage_so_far())

    async def _stream(
        self, request: RunInference, url: str, key: str, body: bytes, progress: Progress
    ) -> Result:
        async with self._post(url, key, body, self._stream_timeout) as response:
            if response.status >= 400:
                raw = await response.read()
                return await self.fail(request, progress, errors.from_backend(response.status, raw))
            splitter = SSESplitter()
            async for data in response.content.iter_any():
                result = await self._relay(request, splitter.feed(data), progress)
                if result is not None:
                    return result
            result = await self._relay(request, splitter.close(), progress)
            if result is not None:
                return result
        return await self.fail(
            request, progress, errors.backend_error("stream ended without [DONE]")
        )

    async def _relay(
        self, request: RunInference, events: list[bytes], progress: Progress
    ) -> Result | None:
        """Write the records of one read's events in one round trip; return how they end it."""
        if not events:
            return None
        # `take_events` counts into `progress` and `_write` queues the records with the writer
        # with no await in between: a cancel can only land once the records are queued, and
        # queued records are written (see `_write`). So the usage billed on a cancel is that
        # of the records in the stream, no more, no less. (If Redis fails instead, the error
        # propagates, the delivery is requeued and billed from what its stream holds.)
        batch = take_events(events, request.include_usage, progress)
        if batch.error is not None:
            logger.info("request failed: %s %s", batch.error.status, batch.error.code)
            batch.records.append(Failure(error=batch.error))
        if batch.records:
            await self._write(request, progress, *batch.records)
        if batch.error is not None:
            return Result("failed", progress.usage_so_far())
        if batch.done:
            return Result("completed", progress.usage_so_far())
        return None
