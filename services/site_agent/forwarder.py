"""Forward one request to a vLLM instance over HTTP and write its records to the request's stream.

Streaming: vLLM is always asked for usage in every chunk (`stream_options.include_usage` and
`continuous_usage_stats`). Each SSE `data:` payload becomes one `Chunk` record, in order, with
the cumulative usage beside it and the `usage` key taken out of the client's bytes (clients get
OpenAI's shape: usage only in the final usage-only chunk, and only if they asked for it). So a
stream that breaks off or is cancelled bills exactly the tokens of the chunks it delivered.

A backend that sends no usage at all (not vLLM) is billed by counting chunks with content as
completion tokens, prompt tokens 0.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
from redis.asyncio import Redis

from schemas.messages import Endpoint, Outcome, RunInference
from schemas.records import Chunk, ErrorInfo, Failure, Record, Response, Usage
from services.common import streams
from services.site_agent import errors, metrics
from services.site_agent.backends import Pool
from services.site_agent.settings import Settings

logger = logging.getLogger(__name__)

PATHS: dict[Endpoint, str] = {
    "chat.completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
DONE = b"[DONE]"


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
    """What a forward has delivered so far; read when it is cancelled or breaks off."""

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


async def sse_data(response: httpx.Response) -> AsyncIterator[bytes]:
    """Yield each SSE event's data (multi-line data joined by newlines), ending at [DONE]."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(" ") else value)
        elif not line and lines:
            data = "\n".join(lines).encode()
            lines = []
            yield data
            if data == DONE:
                return
    if lines:
        yield "\n".join(lines).encode()


def content_of(payload: _Payload) -> bool:
    """Tell whether a chunk carries generated text."""
    for choice in payload.choices or ():
        if choice.text or (choice.delta is not None and choice.delta.content):
            return True
    return False


class Forwarder:
    """Sends requests to a pool's instances and writes what comes back."""

    def __init__(
        self, clients: Sequence[httpx.AsyncClient], redis: Redis, settings: Settings
    ) -> None:
        # Several clients, used in turn: httpx's pool bookkeeping grows with the connections
        # of one client, and cost ~9 ms of CPU per request at 64 in flight on one client.
        self._clients = itertools.cycle(clients)
        self._writer = streams.StreamWriter(redis)
        self._settings = settings
        connect = settings.backend_connect_timeout_s
        self._stream_timeout = httpx.Timeout(
            connect=connect, read=settings.backend_read_timeout_s, write=30.0, pool=connect
        )
        self._response_timeout = httpx.Timeout(
            connect=connect, read=settings.backend_response_timeout_s, write=30.0, pool=connect
        )

    async def _write(self, request: RunInference, progress: Progress, *records: Record) -> None:
        # The expiry goes on with the first record (the Final renews it); chunks are plain XADDs.
        ttl_s = self._settings.stream_ttl_s if progress.records_written == 0 else None
        await self._writer.append(request.request_id, *records, ttl_s=ttl_s)
        progress.records_written += len(records)
        metrics.written(records)

    async def _fail(self, request: RunInference, progress: Progress, error: ErrorInfo) -> Result:
        logger.info("request failed: %s %s", error.status, error.code)
        await self._write(request, progress, Failure(error=error))
        return Result("failed", progress.usage_so_far())

    async def forward(self, request: RunInference, pool: Pool, progress: Progress) -> Result:
        """Run `request` on the first instance that accepts a connection; write its records."""
        try:
            body = backend_body(request)
        except errors.InvalidBody as exc:
            return await self._fail(request, progress, errors.invalid_body(str(exc)))
        for instance in pool.candidates():
            url = instance.url + PATHS[request.endpoint]
            try:
                with instance.busy():
                    if is_streaming(request):
                        return await self._stream(request, url, body, progress)
                    return await self._respond(request, url, body, progress)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                logger.warning("instance %s unreachable, trying the next: %r", instance.url, exc)
                instance.mark_down()
            except httpx.TimeoutException:
                limit = (
                    self._stream_timeout if is_streaming(request) else self._response_timeout
                ).read
                return await self._fail(request, progress, errors.backend_timeout(limit or 0.0))
            except httpx.HTTPError as exc:
                return await self._fail(request, progress, errors.backend_error(repr(exc)))
        return await self._fail(request, progress, errors.backend_unavailable(request.model))

    async def _respond(
        self, request: RunInference, url: str, body: bytes, progress: Progress
    ) -> Result:
        response = await next(self._clients).post(
            url, content=body, headers=JSON_HEADERS, timeout=self._response_timeout
        )
        if response.status_code >= 400:
            error = errors.from_backend(response.status_code, response.content)
            return await self._fail(request, progress, error)
        try:
            usage = _payload_decoder.decode(response.content).usage
        except msgspec.DecodeError:
            usage = None
        if usage is not None:
            completion = 0 if request.endpoint == "embeddings" else usage.completion_tokens
            progress.usage = Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=completion)
        await self._write(
            request, progress, Response(status=response.status_code, body=response.content)
        )
        return Result("completed", progress.usage_so_far())

    async def _stream(
        self, request: RunInference, url: str, body: bytes, progress: Progress
    ) -> Result:
        async with next(self._clients).stream(
            "POST", url, content=body, headers=JSON_HEADERS, timeout=self._stream_timeout
        ) as response:
            if response.status_code >= 400:
                raw = await response.aread()
                return await self._fail(
                    request, progress, errors.from_backend(response.status_code, raw)
                )
            async for data in sse_data(response):
                if data == DONE:
                    return Result("completed", progress.usage_so_far())
                error = await self._on_chunk(request, data, progress)
                if error is not None:
                    return await self._fail(request, progress, error)
        return await self._fail(
            request, progress, errors.backend_error("stream ended without [DONE]")
        )

    async def _on_chunk(
        self, request: RunInference, data: bytes, progress: Progress
    ) -> ErrorInfo | None:
        """Write one chunk (unless it is the usage-only chunk the client did not ask for)."""
        try:
            payload = _payload_decoder.decode(data)
        except msgspec.DecodeError:
            payload = _Payload()
        if payload.error is not None or payload.object == "error":
            return errors.from_backend(None, data)
        if content_of(payload):
            progress.content_chunks += 1
        if payload.usage is None:
            await self._write(request, progress, Chunk(data=data))
            return None
        progress.usage = Usage(
            prompt_tokens=payload.usage.prompt_tokens,
            completion_tokens=payload.usage.completion_tokens,
        )
        if not payload.choices:  # vLLM's final usage-only chunk
            if request.include_usage:
                await self._write(request, progress, Chunk(data=data, usage=progress.usage))
            return None
        await self._write(request, progress, Chunk(data=without_usage(data), usage=progress.usage))
        return None


def without_usage(data: bytes) -> bytes:
    """Return a chunk's JSON without its `usage` key (kept for the agent, not the client)."""
    chunk = msgspec.json.decode(data)
    if isinstance(chunk, dict):
        chunk.pop("usage", None)
    return msgspec.json.encode(chunk)
