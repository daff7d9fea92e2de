"""The forwarder against a scripted backend and the real Redis: what one read becomes.

A `CountingWriter` (the real StreamWriter, recording the records of each `append`) shows how
records were grouped into round trips.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis

from schemas.records import Chunk, Failure, Record, Usage
from services.common.streams import StreamWriter
from services.site_agent.backends import Pool
from services.site_agent.forwarder import Forwarder, Progress, Result
from services.site_agent.settings import Settings
from tests.site_agent.helpers import make_request, stream_records, unique, wait_for
from tests.site_agent.scripted_backend import ScriptedBackend

MODEL = "scripted"


def event(payload: dict[str, Any], line_end: bytes = b"\n") -> bytes:
    return b"data: " + json.dumps(payload).encode() + line_end + line_end


def chunk(content: str | None, completion: int, finish: str | None = None) -> dict[str, Any]:
    delta = {"role": "assistant", "content": ""} if content is None else {"content": content}
    return {
        "id": "c-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": completion, "total_tokens": 5},
    }


USAGE_ONLY = {
    "id": "c-1",
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
}
DONE = b"data: [DONE]\n\n"


class CountingWriter(StreamWriter):
    """The real writer; it also keeps the records of each `append` call, in order."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.appends: list[tuple[Record, ...]] = []

    async def append(self, request_id: str, *records: Record, ttl_s: float | None) -> None:
        if records:
            self.appends.append(records)
        await super().append(request_id, *records, ttl_s=ttl_s)


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(site_id=unique("site"), redis_url=redis_url, backend_read_timeout_s=5.0)


@pytest.fixture
def writer(redis_client: Redis) -> CountingWriter:
    return CountingWriter(redis_client)


@pytest.fixture
async def forwarder(writer: CountingWriter, settings: Settings) -> AsyncIterator[Forwarder]:
    async with Forwarder(writer, settings) as forwarder:
        yield forwarder


async def run(
    forwarder: Forwarder, backend: ScriptedBackend, include_usage: bool = False
) -> tuple[str, Result, Progress]:
    request = make_request(MODEL, stream=True, include_usage=include_usage)
    progress = Progress()
    result = await forwarder.forward(request, Pool(MODEL, [backend.url]), progress)
    return request.request_id, result, progress


def data_of(records: Sequence[Record]) -> list[dict[str, Any]]:
    return [json.loads(r.data) for r in records if isinstance(r, Chunk)]


async def test_the_events_of_one_read_are_written_in_one_round_trip(
    forwarder: Forwarder, writer: CountingWriter, redis_client: Redis
) -> None:
    first_read = event(chunk(None, 0)) + event(chunk("Hel", 1)) + event(chunk("lo", 2))
    last_read = event(chunk("!", 3)) + event(chunk("", 4, "stop")) + event(USAGE_ONLY) + DONE
    async with ScriptedBackend([first_read, last_read]) as backend:
        request_id, result, progress = await run(forwarder, backend)

    assert [len(records) for records in writer.appends] == [3, 2]
    assert list(sum(writer.appends, ())) == await stream_records(redis_client, request_id)
    chunks = [r for records in writer.appends for r in records]
    assert all(isinstance(c, Chunk) for c in chunks)
    assert [c.usage for c in chunks if isinstance(c, Chunk)] == [
        Usage(prompt_tokens=5, completion_tokens=n) for n in range(5)
    ]
    payloads = data_of(chunks)
    assert all("usage" not in p for p in payloads)  # the client's bytes: OpenAI's shape
    assert [p["choices"][0]["delta"].get("content") for p in payloads] == ["", "Hel", "lo", "!", ""]
    assert result == Result("completed", Usage(prompt_tokens=5, completion_tokens=4))
    assert (progress.content_chunks, progress.records_written) == (3, 5)


async def test_the_usage_only_chunk_is_written_when_the_client_asked_for_it(
    forwarder: Forwarder, writer: CountingWriter
) -> None:
    read = event(chunk("Hi", 1)) + event(USAGE_ONLY) + DONE
    async with ScriptedBackend([read]) as backend:
        _, result, _ = await run(forwarder, backend, include_usage=True)
    (records,) = writer.appends
    assert [p["choices"] for p in data_of(records)][1] == []
    assert isinstance(records[1], Chunk)
    assert json.loads(records[1].data)["usage"]["completion_tokens"] == 4
    assert result.outcome == "completed"


async def test_events_split_across_reads_with_crlf_and_multi_line_data_are_reassembled(
    forwarder: Forwarder, writer: CountingWriter, redis_client: Redis
) -> None:
    multi_line = b'data: {"choices": [{"delta": {"content": "b"}}],\r\ndata: "object": "x"}\r\n\r\n'
    stream = event(chunk("a", 1), b"\r\n") + b": keep-alive\r\n\r\n" + multi_line + DONE
    cuts = [
        0,
        stream.index(b'"a"'),  # inside the first event
        stream.index(b"\r\n\r\n") + 3,  # between the CR and LF of its blank line
        stream.index(b'data: "object"'),  # between the data lines of the second
        len(stream),
    ]
    reads = [stream[start:end] for start, end in itertools.pairwise(cuts)]
    async with ScriptedBackend(reads) as backend:
        request_id, result, progress = await run(forwarder, backend)
    records = await stream_records(redis_client, request_id)
    assert [p["choices"][0]["delta"]["content"] for p in data_of(records)] == ["a", "b"]
    assert isinstance(records[1], Chunk)
    assert records[1].data == b'{"choices": [{"delta": {"content": "b"}}],\n"object": "x"}'
    assert [len(r) for r in writer.appends] == [1, 1]
    assert result == Result("completed", Usage(prompt_tokens=5, completion_tokens=1))
    assert progress.content_chunks == 2


async def test_an_error_event_mid_stream_goes_out_with_the_chunks_before_it_and_hangs_up(
    forwarder: Forwarder, writer: CountingWriter
) -> None:
    error = {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
    async with ScriptedBackend([event(chunk("a", 1)) + event(error), None]) as backend:
        _, result, _ = await run(forwarder, backend)
        await asyncio.wait_for(backend.closed.wait(), 1.0)
    ((first, failure),) = writer.appends
    assert isinstance(first, Chunk)
    assert isinstance(failure, Failure)
    assert (failure.error.status, failure.error.message) == (500, "engine died")
    assert result == Result("failed", Usage(prompt_tokens=5, completion_tokens=1))


async def test_cancelling_a_forward_closes_its_backend_connection(
    forwarder: Forwarder, writer: CountingWriter
) -> None:
    async with ScriptedBackend([event(chunk("a", 1)), None]) as backend:
        work = asyncio.create_task(run(forwarder, backend))
        await wait_for(lambda: writer.appends)
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await work
        await asyncio.wait_for(backend.closed.wait(), 1.0)  # vLLM sees the hang-up: it aborts


class CancelledWhileWriting(CountingWriter):
    """Cancels the forward once its first chunks are queued behind another stream's write."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.forward: asyncio.Task[Any] | None = None
        self.other: asyncio.Future[None] | None = None

    async def append(self, request_id: str, *records: Record, ttl_s: float | None) -> None:
        if self.forward is not None and records:
            forward, self.forward = self.forward, None
            # A big write of another stream occupies the writer: ours waits for the next one.
            busy = [Chunk(data=b"x" * 100)] * 2000
            self.other = asyncio.ensure_future(super().append(unique("other"), *busy, ttl_s=60))
            for _ in range(3):  # the other append queues, its drainer takes it and sends it
                await asyncio.sleep(0)
            forward.cancel()  # lands at the wait for our records, once they are queued
        await super().append(request_id, *records, ttl_s=ttl_s)


async def test_a_cancel_during_a_write_returns_once_what_progress_counts_is_in_the_stream(
    redis_client: Redis, settings: Settings
) -> None:
    writer = CancelledWhileWriting(redis_client)
    request = make_request(MODEL, stream=True)
    progress = Progress()
    read = event(chunk(None, 0)) + event(chunk("Hel", 1)) + event(chunk("lo", 2))
    async with ScriptedBackend([read, None]) as backend, Forwarder(writer, settings) as forwarder:
        work = asyncio.create_task(forwarder.forward(request, Pool(MODEL, [backend.url]), progress))
        writer.forward = work
        with pytest.raises(asyncio.CancelledError):
            await work
        # Read at once: the executor writes the Final now, and it must come after these.
        records = await stream_records(redis_client, request.request_id)
        assert writer.other is not None
        await writer.other
    assert len(records) == 3
    assert progress.content_chunks == 2
    assert progress.usage == Usage(prompt_tokens=5, completion_tokens=2)
