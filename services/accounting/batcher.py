"""Write-combining for the ledger: usage events that arrive together share one transaction.

Each caller of `LedgerBatcher.record` waits until the transaction that holds its event's
row (or found it already there) has committed, so that its delivery can then be acked. A
lone event is written at once; the events that arrive while a transaction is in flight make
up the next one, up to `max_batch`. At light load a batch is one event and adds no wait; at
saturation one transaction's cost is shared by many events (services/common/streams.py's
StreamWriter does the same for Redis).

When the database does not take a batch:

    no answer in time, or `SELECT 1` fails too   an outage: the whole batch is tried again
                                                 per RetryPolicy, then every event fails
    refused while the database answers           the batch is halved until the event at
                                                 fault is alone: the others are written in
                                                 the same try, it alone is retried, then fails
                                                 (requeued; past the delivery limit, first.dead)
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.messages import UsageRecorded
from services.accounting.errors import LedgerUnavailable
from services.accounting.ledger import ping, record_batch
from services.accounting.metrics import LEDGER_BATCH

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0
"""Bound on waiting for a cancelled write to roll back when the batcher closes."""


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How long one try of a ledger write may take, how often it is made, the pauses between."""

    attempts: int = 8
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    timeout_s: float = 10.0


def first_writes(events: Sequence[UsageRecorded], inserted: set[str]) -> list[bool]:
    """Tell, per event of a batch, whether it made its row.

    `inserted` holds the request_ids the batch's INSERT returned. An event made its row if
    its request_id is there and no earlier event of the batch had it; every other event is a
    duplicate, of a row already in the ledger or of an earlier event in the same batch.
    """
    seen: set[str] = set()
    flags = []
    for event in events:
        flags.append(event.request_id in inserted and event.request_id not in seen)
        seen.add(event.request_id)
    return flags


class _Waiter(NamedTuple):
    event: UsageRecorded
    done: asyncio.Future[bool]


def _fail(waiters: Sequence[_Waiter], message: str) -> None:
    for waiter in waiters:
        if not waiter.done.done():  # a cancelled handler's future is done already
            waiter.done.set_exception(LedgerUnavailable(message))


class LedgerBatcher:
    """Writes usage events to the ledger, one transaction for all the events waiting."""

    def __init__(
        self,
        engine: AsyncEngine,
        retry: RetryPolicy,
        *,
        max_batch: int,
        on_new: Callable[[Sequence[UsageRecorded]], Awaitable[None]] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._on_new = on_new
        self._engine = engine
        self._retry = retry
        self._max_batch = max_batch
        self._pending: list[_Waiter] = []
        self._drainer: asyncio.Task[None] | None = None

    async def record(self, event: UsageRecorded) -> bool:
        """Write the event's row unless its request_id has one; return whether it was new.

        Raises LedgerUnavailable once its batch failed every try of the RetryPolicy. The wait
        is bounded by that policy: `attempts` tries of at most `timeout_s` with pauses of at
        most `backoff_max_s`, for its own batch and each batch ahead of it (with prefetch at
        twice `max_batch`, at most two).
        """
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(_Waiter(event, done))
        if self._drainer is None or self._drainer.done():
            # A context of its own: the drainer outlives the handler that starts it, and its
            # log lines must not carry that one handler's request_id.
            self._drainer = asyncio.create_task(
                self._drain(), name="ledger-batcher", context=contextvars.Context()
            )
        return await done

    async def aclose(self) -> None:
        """Stop writing; events not yet written fail with LedgerUnavailable (so are not acked)."""
        if self._drainer is not None:
            self._drainer.cancel()
            await asyncio.wait([self._drainer], timeout=STOP_TIMEOUT_S)

    async def _drain(self) -> None:
        batch: list[_Waiter] = []
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._write(batch)
        except asyncio.CancelledError:
            self._fail_waiting(batch, "the ledger writer stopped")
            raise
        except Exception:
            # A bug, not the database (its errors are LedgerUnavailable): say so, and let the
            # events go back to the queue; the next event starts a new writer.
            logger.exception("ledger writer failed")
            self._fail_waiting(batch, "the ledger writer failed")

    def _fail_waiting(self, batch: list[_Waiter], message: str) -> None:
        """Fail the batch in hand and every pending event: no handler may wait in vain."""
        waiting, self._pending = [*batch, *self._pending], []
        _fail(waiting, message)

    async def _write(self, batch: list[_Waiter]) -> None:
        """Write a batch, trying again per the RetryPolicy; every waiter is settled on return."""
        policy = self._retry
        pause = policy.backoff_s
        for attempt in range(1, policy.attempts + 1):
            reason = await self._try(batch)
            batch = [waiter for waiter in batch if not waiter.done.done()]
            if reason is None or not batch:
                return
            if attempt == policy.attempts:
                _fail(batch, f"gave up after {attempt} tries: {reason}")
                return
            logger.warning(
                "ledger write of %d events failed (try %d of %d), retrying in %.2fs: %s",
                len(batch),
                attempt,
                policy.attempts,
                pause,
                reason,
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, policy.backoff_max_s)
        _fail(batch, "no try was allowed (attempts < 1)")

    async def _try(self, batch: list[_Waiter]) -> str | None:
        """Try a batch once; return why some of it was not written, None if all of it was."""
        try:
            async with asyncio.timeout(self._retry.timeout_s):
                return await self._write_isolating(batch, probe=True)
        except TimeoutError:
            return f"no answer within {self._retry.timeout_s}s"

    async def _write_isolating(self, batch: list[_Waiter], *, probe: bool) -> str | None:
        events = [waiter.event for waiter in batch]
        try:
            inserted = await record_batch(self._engine, events)
        except LedgerUnavailable as exc:
            if len(batch) == 1:
                return str(exc)
            if probe:
                try:
                    await ping(self._engine)
                except LedgerUnavailable:
                    return str(exc)  # an outage: the whole batch waits for the next try
            # The database answers, yet refused the batch: one event may be at fault (say, a
            # token count beyond the column's range). Halve until it is alone, so that it
            # does not send the others back to the queue with it.
            middle = len(batch) // 2
            first = await self._write_isolating(batch[:middle], probe=False)
            second = await self._write_isolating(batch[middle:], probe=False)
            return first or second
        LEDGER_BATCH.observe(len(batch))
        flags = first_writes(events, inserted)
        await self._new_rows([e for e, new in zip(events, flags, strict=True) if new])
        for waiter, new in zip(batch, flags, strict=True):
            if not waiter.done.done():
                waiter.done.set_result(new)
        return None

    async def _new_rows(self, events: list[UsageRecorded]) -> None:
        """Hand the events that made their row to `on_new` (the quota charge), once each.

        After the commit and before the acks: a crash in between redelivers them as
        duplicates, which are never handed on again (under-charged, never twice). Its failure
        is logged, not raised: the ledger rows stand whatever happens to the counters.
        """
        if not events or self._on_new is None:
            return
        try:
            await self._on_new(events)
        except Exception as exc:  # noqa: BLE001 - logged: the rows are written and stay so
            logger.warning("%d new ledger rows not charged to quotas: %r", len(events), exc)
