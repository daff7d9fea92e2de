"""One multiplexed Redis reader per gateway process for every in-flight request's stream.

A single XREAD BLOCK loop reads all subscribed `first:stream:<id>` keys and fans records out
to per-request asyncio queues. A request that joins while the loop is blocked wakes it by
XADDing to this reader's own wake stream, which the loop always reads too (by id, so a wake
is never missed).

The wake is off the request's path: `subscribe` registers the request and returns at once,
and one background XADD wakes the loop for every request that joined during the same blocked
read. A subscription reads its stream from the beginning (`0-0`), so no record can be missed
whenever the loop picks it up; the wake only decides how soon. The request meanwhile
publishes its job, and its first record is at least two broker hops (≈ 4 ms) away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import names
from schemas.codec import DecodeError, record_decoder
from schemas.records import AnyRecord, ErrorInfo, Failure, Final, Usage
from services.common.ids import new_request_id
from services.common.redis import make_redis

logger = logging.getLogger(__name__)

WAKE_MAXLEN = 100
WAKE_TTL_S = 3600
READ_COUNT = 256
STOP_TIMEOUT_S = 3.0
STREAM_UNAVAILABLE = ErrorInfo(
    status=503,
    message="The stream store (Redis) is unreachable; the request's outcome is unknown. "
    "It is billed at most once, for what its site delivered.",
    type="service_unavailable",
    code="stream_unavailable",
)


class Subscription:
    """The records of one request, in order, as the reader delivers them."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.key = names.stream_key(request_id)
        self.last_id = "0-0"
        self.queue: asyncio.Queue[AnyRecord] = asyncio.Queue()

    async def next(self, timeout: float) -> AnyRecord:
        """Return the next record; raise TimeoutError after `timeout` seconds without one."""
        if not self.queue.empty():  # the common case under load: no timer to arm
            return self.queue.get_nowait()
        return await asyncio.wait_for(self.queue.get(), timeout)


class StreamReader:
    """Owns the blocking connection and the read loop."""

    def __init__(
        self, redis_url: str, commands: Redis, block_ms: int, give_up_s: float = 3.0
    ) -> None:
        # The blocking client's socket timeout must exceed BLOCK (redis-py's default is 5 s).
        self._blocking = make_redis(
            redis_url, socket_timeout=block_ms / 1000 + 5, max_connections=2
        )
        self._commands = commands
        self._block_ms = block_ms
        self._give_up_s = give_up_s
        self._wakes = 0
        self._reads = 0  # XREADs issued; a wake is needed once per read that a join missed
        self._woken_read = -1  # the read that the last wake interrupts
        self._waking: set[asyncio.Task[None]] = set()
        self._wake_key = names.wake_key(new_request_id())
        self._wake_last = f"{int(time.time() * 1000)}-0"
        self._subs: dict[str, Subscription] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Start the read loop."""
        self._task = asyncio.create_task(self._run(), name="stream-reader")

    async def stop(self) -> None:
        """Stop the loop and close the blocking connection.

        The loop is woken and left to return from its read, not cancelled inside it: over TLS
        (rediss://) redis-py can hang on a read cancelled mid-way. Cancelling stays the
        fallback, after a bound.
        """
        if self._task is not None:
            self._stopping = True
            await self._wake()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_TIMEOUT_S)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(self._task, STOP_TIMEOUT_S)
        await self._blocking.aclose()

    def subscribe(self, request_id: str) -> Subscription:
        """Follow one request's stream until `unsubscribe` (or its Final record)."""
        sub = Subscription(request_id)
        self._subs[sub.key] = sub
        if self._woken_read != self._reads:  # the blocked read does not list this key yet
            self._woken_read = self._reads
            task = asyncio.create_task(self._wake(), name="stream-reader-wake")
            self._waking.add(task)
            task.add_done_callback(self._waking.discard)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop following a request's stream."""
        self._subs.pop(sub.key, None)

    async def _wake(self) -> None:
        # One command (retried by redis-py on a stale connection); the key's expiry is renewed
        # every WAKE_MAXLEN wakes only. If Redis fails here the read loop fails too, and
        # handles it (retries, then ends every request); the loop's own BLOCK timeout bounds
        # how late a lost wake makes it look at the new stream.
        try:
            await self._commands.xadd(
                self._wake_key, {b"w": b"1"}, maxlen=WAKE_MAXLEN, approximate=True
            )
            self._wakes += 1
            if self._wakes % WAKE_MAXLEN == 1:
                await self._commands.expire(self._wake_key, WAKE_TTL_S)
        except RedisError as exc:
            logger.warning("stream reader: wake failed (%s); the next read picks it up", exc)

    def _fail_all(self) -> None:
        """End every followed request with a clear error: their records cannot be read."""
        if not self._subs:
            return
        logger.error(
            "stream reader: Redis unreachable; ending %d in-flight requests", len(self._subs)
        )
        final = Final(outcome="failed", usage=Usage(), site_id="", finished_at=time.time())
        for sub in self._subs.values():
            sub.queue.put_nowait(Failure(error=STREAM_UNAVAILABLE))
            sub.queue.put_nowait(final)
        self._subs.clear()

    async def _run(self) -> None:
        backoff, failing_since = 0.1, 0.0
        while not self._stopping:
            streams = {self._wake_key: self._wake_last}
            streams.update({key: sub.last_id for key, sub in self._subs.items()})
            self._reads += 1
            try:
                response: Any = await self._blocking.xread(
                    streams,  # type: ignore[arg-type]
                    count=READ_COUNT,
                    block=self._block_ms,
                )
            except RedisError as exc:
                failing_since = failing_since or time.monotonic()
                logger.warning(
                    "stream reader: Redis read failed (%s); retrying in %.1fs", exc, backoff
                )
                if time.monotonic() - failing_since >= self._give_up_s:
                    self._fail_all()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff, failing_since = 0.1, 0.0
            for key, entries in response or []:
                self._deliver(key.decode() if isinstance(key, bytes) else key, entries)

    def _deliver(self, key: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        if key == self._wake_key:
            self._wake_last = entries[-1][0].decode()
            return
        sub = self._subs.get(key)
        if sub is None:
            return
        for entry_id, fields in entries:
            sub.last_id = entry_id.decode()
            try:
                record = record_decoder.decode(fields[names.RECORD_FIELD])
            except (KeyError, DecodeError):
                logger.warning("stream reader: undecodable record %s in %s", sub.last_id, key)
                continue
            sub.queue.put_nowait(record)
            if isinstance(record, Final):
                self._subs.pop(key, None)
                return
