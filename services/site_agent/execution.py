"""Bring one delivered request to its Final record, exactly once across sites and redeliveries.

stream has a Final          -> nothing to run; re-publish its usage (the ledger dedupes)
claim held by another site  -> not ours; skip (that site's own delivery finishes it)
claim held by another agent -> a duplicate delivery, or an agent of this site that died: wait
  of this site                 until the stream has its Final or the claim expires (the holder
                               renews it every third of its TTL while it runs), then look again
records but no Final        -> an earlier attempt died mid-way: end with an error, billing the
                               usage of the last delivered chunk
cancelled or expired        -> Final(cancelled), nothing generated
otherwise                   -> forward to vLLM, watching for a cancel, renewing the claim
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import names
from schemas.codec import DecodeError
from schemas.messages import RunInference, UsageRecorded
from schemas.records import AnyRecord, ErrorInfo, Final, Usage
from services.common import streams
from services.site_agent import errors, metrics
from services.site_agent.backends import Backends, Pool
from services.site_agent.cancel import CancelWatcher
from services.site_agent.forwarder import Forwarder, Progress, Result
from services.site_agent.settings import Settings

logger = logging.getLogger(__name__)


def usage_event(request: RunInference, final: Final) -> UsageRecorded:
    """Return the usage event of a request from its Final record."""
    return UsageRecorded(
        request_id=request.request_id,
        user_id=request.user_id,
        username=request.username,
        model=request.model,
        site_id=final.site_id,
        endpoint=request.endpoint,
        priority=request.priority,
        prompt_tokens=final.usage.prompt_tokens,
        completion_tokens=final.usage.completion_tokens,
        outcome=final.outcome,
        created_at=request.created_at,
        finished_at=final.finished_at,
    )


class Executor:
    """Runs requests on this site's backends; Redis errors propagate to the handler."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        backends: Backends,
        forwarder: Forwarder,
        cancels: CancelWatcher,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._backends = backends
        self._forwarder = forwarder
        self._cancels = cancels

    def _claimant(self) -> str:
        """Return a claim value unique to one attempt: `<site_id>/<agent_id>/<nonce>`.

        Unique per attempt, not per agent, so that a duplicate delivery to this same agent
        waits for the attempt that holds the claim instead of generating again.
        """
        return f"{self._settings.site_id}/{self._settings.agent_id}/{secrets.token_hex(4)}"

    async def execute(self, request: RunInference) -> UsageRecorded | None:
        """Bring the request's stream to a Final; return the usage to publish, None if not ours."""
        settings = self._settings
        deadline = time.monotonic() + 2 * settings.claim_ttl_s + settings.backend_response_timeout_s
        claimant = self._claimant()
        while True:
            last, started = await self._last_record(request)
            if isinstance(last, Final):
                logger.info("already finished (%s); re-publishing its usage", last.outcome)
                return usage_event(request, last)
            holder = await self._claim(request.request_id, claimant)
            if holder == claimant:
                break
            if holder.split("/", 1)[0] != self._settings.site_id:
                logger.info("claimed by site %s; skipping", holder)
                return None
            if time.monotonic() > deadline:
                logger.warning("claim still held by %s; leaving the request to it", holder)
                return None
            await asyncio.sleep(self._settings.claim_poll_s)
        if started:
            usage = await streams.delivered_usage(self._redis, request.request_id)
            return await self._end_failed(request, errors.generation_interrupted(), usage)
        pool = self._backends.get(request.model)
        if pool is None:
            error = errors.model_not_served(request.model, self._settings.site_id)
            return await self._end_failed(request, error)
        with self._cancels.watch(request.request_id) as cancelled:
            if request.expires_at <= time.time() or await self._cancels.is_cancelled(
                request.request_id
            ):
                logger.info("cancelled or expired before start; not generating")
                return await self._finish(request, Result("cancelled"))
            result = await self._run(request, pool, cancelled)
        return await self._finish(request, result)

    async def _last_record(self, request: RunInference) -> tuple[AnyRecord | None, bool]:
        """Return the stream's newest record and whether the stream has any record."""
        try:
            last = await streams.last_record(self._redis, request.request_id)
        except DecodeError:  # garbage at the end of the stream: records without a Final
            logger.warning("undecodable record at the end of the stream")
            return None, True
        return last, last is not None

    async def _claim(self, request_id: str, claimant: str) -> str:
        """Take the request's claim if free; return who holds it."""
        key = names.claim_key(request_id)
        ttl = max(1, int(self._settings.claim_ttl_s))
        if await self._redis.set(key, claimant, nx=True, ex=ttl):
            return claimant
        holder = await self._redis.get(key)
        if holder is None:  # expired between SET and GET: look again next round
            return f"{self._settings.site_id}/?"
        return holder.decode() if isinstance(holder, bytes) else str(holder)

    async def _run(self, request: RunInference, pool: Pool, cancelled: asyncio.Event) -> Result:
        """Forward, stopping within moments of a cancel; renew the claim while it runs."""
        progress = Progress()
        work = asyncio.create_task(self._forwarder.forward(request, pool, progress))
        stop = asyncio.create_task(cancelled.wait())
        renew_every = max(1.0, self._settings.claim_ttl_s / 3)
        try:
            while True:
                done, _ = await asyncio.wait(
                    {work, stop}, timeout=renew_every, return_when=asyncio.FIRST_COMPLETED
                )
                if work in done:
                    return work.result()
                if stop in done:
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
                    logger.info("cancelled after %d chunks", progress.content_chunks)
                    return Result("cancelled", progress.usage_so_far())
                await self._renew_claim(request.request_id)
        finally:
            for task in (work, stop):
                task.cancel()
            await asyncio.wait({work, stop})

    async def _renew_claim(self, request_id: str) -> None:
        try:
            await self._redis.expire(
                names.claim_key(request_id), max(1, int(self._settings.claim_ttl_s))
            )
        except RedisError as exc:  # the request goes on; the next renewal may succeed
            logger.warning("cannot renew the claim: %s", exc)

    async def _finish(self, request: RunInference, result: Result) -> UsageRecorded:
        final = Final(
            outcome=result.outcome,
            usage=result.usage,
            site_id=self._settings.site_id,
            finished_at=time.time(),
        )
        await streams.append(
            self._redis, request.request_id, final, ttl_s=self._settings.stream_ttl_s
        )
        metrics.finished(request, final)
        return usage_event(request, final)

    async def _end_failed(
        self, request: RunInference, error: ErrorInfo, usage: Usage | None = None
    ) -> UsageRecorded:
        logger.warning("ending request: %s", error.code)
        final = await streams.fail(
            self._redis,
            request.request_id,
            error,
            site_id=self._settings.site_id,
            ttl_s=self._settings.stream_ttl_s,
            usage=usage,
        )
        metrics.finished(request, final)
        return usage_event(request, final)
