"""Writing a request's Redis stream: records in order, the expiry set on first and last write.

The reading side (one multiplexed XREAD loop) is the gateway's; this is the writers' side
(router for requests it cannot place, dead-letter consumer, site agent).
"""

from __future__ import annotations

import time
from typing import cast

from redis.asyncio import Redis

from schemas import names
from schemas.codec import DecodeError, encode, record_decoder
from schemas.records import AnyRecord, Chunk, ErrorInfo, Failure, Final, Record, Usage


async def append(redis: Redis, request_id: str, *records: Record, ttl_s: float | None) -> None:
    """XADD `records` in order (one entry each) and, unless `ttl_s` is None, set the expiry.

    One round trip either way. Writers set the expiry on a stream's first and last records
    only: a chunk in between is a single XADD (the hot path of streaming).
    """
    key = names.stream_key(request_id)
    if ttl_s is None and len(records) == 1:
        await redis.xadd(key, {names.RECORD_FIELD: encode(records[0])})
        return
    async with redis.pipeline(transaction=False) as pipe:
        for record in records:
            pipe.xadd(key, {names.RECORD_FIELD: encode(record)})
        if ttl_s is not None:
            pipe.expire(key, max(1, int(ttl_s)))
        await pipe.execute()


async def last_record(redis: Redis, request_id: str) -> AnyRecord | None:
    """Return the newest record of a request's stream, None if it has none.

    Raises `schemas.codec.DecodeError` if the newest entry is not a record.
    """
    key = names.stream_key(request_id)
    # The client does not decode responses: entries are (id, {field: value}) in bytes.
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await redis.xrevrange(key, "+", "-", count=1)
    )
    if not entries:
        return None
    _entry_id, fields = entries[0]
    record: AnyRecord = record_decoder.decode(fields[names.RECORD_FIELD])
    return record


async def delivered_usage(redis: Redis, request_id: str, scan: int = 16) -> Usage:
    """Return the cumulative usage of the last delivered chunk (zero if none says it).

    Only the newest `scan` entries are read: a usage-carrying chunk is always among them.
    """
    key = names.stream_key(request_id)
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await redis.xrevrange(key, "+", "-", count=scan)
    )
    for _entry_id, fields in entries:
        try:
            record = record_decoder.decode(fields[names.RECORD_FIELD])
        except (KeyError, DecodeError):
            continue
        if isinstance(record, Chunk) and record.usage is not None:
            return record.usage
    return Usage()


async def fail(
    redis: Redis,
    request_id: str,
    error: ErrorInfo,
    *,
    site_id: str,
    ttl_s: float,
    usage: Usage | None = None,
) -> Final:
    """End a request's stream with `error` and a failed Final billing `usage` (default none)."""
    final = Final(
        outcome="failed", usage=usage or Usage(), site_id=site_id, finished_at=time.time()
    )
    await append(redis, request_id, Failure(error=error), final, ttl_s=ttl_s)
    return final
