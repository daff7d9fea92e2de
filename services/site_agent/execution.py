"""Bring one delivered request to its Final record, exactly once across sites and redeliveries.

stream has a Final          -> nothing to run; re-publish its usage (the ledger dedupes)
claim held by another site  -> not ours; skip
records but no Final        -> an earlier attempt died mid-way: end with an error
cancelled or expired        -> Final(cancelled), nothing generated
otherwise                   -> forward to vLLM, watching for a cancel, renewing the claim
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import names
from schemas.codec import DecodeError
from schemas.messages import RunInference, UsageRecorded
from schemas.records import ErrorInfo, Final
from services.common import streams
from services.site_agent import errors
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

    async def execute(self, request: RunInference) -> UsageRecorded | None:
        """Bring the request's stream to a Final; return the usage to publish, None if not ours."""
        try:
            last = await streams.last_record(self._redis, request.request_id)
            started = last is not None
        except DecodeError:  # garbage at the end of the stream: records without a Final
            logger.warning("undecodable record at the end of the stream")
            last, started = None, True
        if isinstance(last, Final):
            logger.info("already finished (%s); re-publishing its usage", last.outcome)
            return usage_event(request, last)
        holder = await self._claim(request.request_id)
        if holder != self._settings.site_id:
            logger.info("claimed by site %s; skipping", holder)
            return None
        if started:
            return await self._end_failed(request, errors.generation_interrupted())
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

    async def _claim(self, request_id: str) -> str:
        """Take the request's claim if free; return who holds it."""
        key = names.claim_key(request_id)
        site_id = self._settings.site_id
        ttl = max(1, int(self._settings.claim_ttl_s))
        if await self._redis.set(key, site_id, nx=True, ex=ttl):
            return site_id
        holder = await self._redis.get(key)
        if holder is None:  # expired between SET and GET: try once more
            taken = await self._redis.set(key, site_id, nx=True, ex=ttl)
            return site_id if taken else "another site"
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
        return usage_event(request, final)

    async def _end_failed(self, request: RunInference, error: ErrorInfo) -> UsageRecorded:
        logger.warning("ending request: %s", error.code)
        final = await streams.fail(
            self._redis,
            request.request_id,
            error,
            site_id=self._settings.site_id,
            ttl_s=self._settings.stream_ttl_s,
        )
        return usage_event(request, final)
