"""The gateway's one multiplexed reader delivers each request's records, in order, to its reader."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from schemas.records import Chunk, Final, Usage
from services.common import streams
from services.common.ids import new_request_id
from services.common.redis import make_redis
from services.gateway.streams import StreamReader

BLOCK_MS = 20_000  # far longer than any wait below: a missed wake-up would fail the test


@pytest.fixture
async def reader(redis_url: str) -> AsyncIterator[tuple[StreamReader, Redis]]:
    commands = make_redis(redis_url)
    reader = StreamReader(redis_url, commands, BLOCK_MS)
    await reader.start()
    await asyncio.sleep(0.1)  # let the loop enter its blocking XREAD
    yield reader, commands
    await reader.stop()
    await commands.aclose()


def final() -> Final:
    return Final(
        outcome="completed", usage=Usage(completion_tokens=3), site_id="s", finished_at=0.0
    )


async def test_a_request_joining_while_the_reader_blocks_is_woken(
    reader: tuple[StreamReader, Redis],
) -> None:
    stream_reader, redis = reader
    request_id = new_request_id()
    sub = stream_reader.subscribe(request_id)
    await streams.append(redis, request_id, Chunk(data=b"1"), ttl_s=60)
    assert await sub.next(timeout=5) == Chunk(data=b"1")


async def test_records_arrive_in_order_and_the_final_ends_the_subscription(
    reader: tuple[StreamReader, Redis],
) -> None:
    stream_reader, redis = reader
    request_id = new_request_id()
    # Records written before the subscription are read too (from the stream's start).
    await streams.append(redis, request_id, Chunk(data=b"0"), ttl_s=60)
    sub = stream_reader.subscribe(request_id)
    for i in range(1, 20):
        await streams.append(redis, request_id, Chunk(data=str(i).encode()), ttl_s=60)
    await streams.append(redis, request_id, final(), ttl_s=60)
    got = [await sub.next(timeout=5) for _ in range(21)]
    assert got[:20] == [Chunk(data=str(i).encode()) for i in range(20)]
    assert got[20] == final()
    assert sub.key not in stream_reader._subs


async def test_many_concurrent_requests_each_get_only_their_own_records(
    reader: tuple[StreamReader, Redis],
) -> None:
    stream_reader, redis = reader
    ids = [new_request_id() for _ in range(50)]
    subs = [stream_reader.subscribe(r) for r in ids]

    async def write(request_id: str) -> None:
        for i in range(5):
            data = f"{request_id}:{i}".encode()
            await streams.append(redis, request_id, Chunk(data=data), ttl_s=60)
        await streams.append(redis, request_id, final(), ttl_s=60)

    await asyncio.gather(*(write(r) for r in ids))
    for request_id, sub in zip(ids, subs, strict=True):
        got = [await sub.next(timeout=5) for _ in range(6)]
        assert got[:5] == [Chunk(data=f"{request_id}:{i}".encode()) for i in range(5)]
        assert isinstance(got[5], Final)


async def test_next_times_out_when_nothing_comes(reader: tuple[StreamReader, Redis]) -> None:
    stream_reader, _ = reader
    sub = stream_reader.subscribe(new_request_id())
    with pytest.raises(TimeoutError):
        await sub.next(timeout=0.3)
    stream_reader.unsubscribe(sub)


async def test_requests_joining_during_one_blocked_read_share_one_wake(
    reader: tuple[StreamReader, Redis],
) -> None:
    stream_reader, redis = reader
    ids = [new_request_id() for _ in range(10)]
    subs = [stream_reader.subscribe(r) for r in ids]  # all join while the same read blocks
    for request_id in ids:
        await streams.append(redis, request_id, Chunk(data=request_id.encode()), ttl_s=60)
    for request_id, sub in zip(ids, subs, strict=True):
        assert await sub.next(timeout=5) == Chunk(data=request_id.encode())
    assert stream_reader._wakes == 1
    # A request that joins after the loop read again needs (and gets) a wake of its own.
    late = new_request_id()
    late_sub = stream_reader.subscribe(late)
    await streams.append(redis, late, Chunk(data=b"late"), ttl_s=60)
    assert await late_sub.next(timeout=5) == Chunk(data=b"late")
    assert stream_reader._wakes == 2
