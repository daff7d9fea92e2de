"""Bring one delivered request to its Final record, exactly once across sites and redeliveries.

stream has a Final          -> nothing to run; re-publish its usage (the ledger dedupes)
claim held by another site  -> not ours; skip (that site's own delivery finishes it), unless
                               the router moved the request from that (dead) site: then as below
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
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import names
from schemas.codec import DecodeError, record_decoder
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
        groups=request.groups,
        finished_at=final.finished_at,
    )


# A delivery's look, atomic and in one round trip (EVALSHA): the newest record of the stream,
# the claim (set if free, then read: inside the script the holder is never missing), and the
# cancel flag. One command instead of a four-command pipeline: redis-py's per-command cost was
# ≈ 0.5 ms of the way to the first token.
LOOK_SCRIPT = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2])
return {last, redis.call('GET', KEYS[2]), redis.call('EXISTS', KEYS[3])}
"""


@dataclass(frozen=True)
class Look:
    """What a delivery finds before it runs anything."""

    last: AnyRecord | None
    started: bool
    holder: str
    cancelled: bool


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
        self._look_script = redis.register_script(LOOK_SCRIPT)

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
            look = await self._look(request.request_id, claimant)
            if isinstance(look.last, Final):
                logger.info("already finished (%s); re-publishing its usage", look.last.outcome)
                return usage_event(request, look.last)
            if look.holder == claimant:
                break
            holder_site = look.holder.split("/", 1)[0]
            if holder_site not in (self._settings.site_id, request.moved_from):
                logger.info("claimed by site %s; skipping", look.holder)
                return None
            if time.monotonic() > deadline:
                logger.warning("claim still held by %s; leaving the request to it", look.holder)
                return None
            await asyncio.sleep(self._settings.claim_poll_s)
        if look.started:
            usage = await streams.delivered_usage(self._redis, request.request_id)
            return await self._end_failed(request, errors.generation_interrupted(), usage)
        pool = self._backends.get(request.model)
        if pool is None:
            error = errors.model_not_served(request.model, self._settings.site_id)
            return await self._end_failed(request, error)
        with self._cancels.watch(request.request_id) as cancelled:
            # A cancel after the look is caught by the watcher (pub/sub, and its key polling).
            if request.expires_at <= time.time() or look.cancelled:
                logger.info("cancelled or expired before start; not generating")
                return await self._finish(request, Result("cancelled"))
            result = await self._run(request, pool, cancelled)
        return await self._finish(request, result)

    async def _look(self, request_id: str, claimant: str) -> Look:
        """In one command: the stream's newest record, the claim (taken if free), the cancel."""
        reply = await self._look_script(
            keys=[
                names.stream_key(request_id),
                names.claim_key(request_id),
                names.cancel_key(request_id),
            ],
            args=[claimant, max(1, int(self._settings.claim_ttl_s))],
        )
        entries, holder, cancelled = reply
        last: AnyRecord | None = None
        started = bool(entries)
        if entries:
            fields = entries[0][1]  # [field, value, field, value, ...]
            raw = dict(zip(fields[::2], fields[1::2], strict=True)).get(names.RECORD_FIELD)
            try:
                last = None if raw is None else record_decoder.decode(raw)
            except DecodeError:
                last = None
            if last is None:  # garbage at the end: records without a Final
                logger.warning("undecodable record at the end of the stream")
        holder_id = holder.decode() if isinstance(holder, bytes) else str(holder)
        return Look(last=last, started=started, holder=holder_id, cancelled=bool(cancelled))

    async def _run(self, request: RunInference, pool: Pool, cancelled: asyncio.Event) -> Result:
        """Forward, stopping within moments of a cancel; renew the claim while it runs."""
        progress = Progress()
        work = asyncio.create_task(self._serve(request, pool, progress))
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

    async def _serve(self, request: RunInference, pool: Pool, progress: Progress) -> Result:
        """Wait for a hot instance if the model is cold or starting (bounded), then forward."""
        if pool.config is not None and not pool.ready():
            limit = max(
                0.0, min(request.expires_at - time.time(), self._settings.cold_start_timeout_s)
            )
            logger.info("model %s is not hot; waiting up to %.0f s for it", request.model, limit)
            if not await pool.wait_ready(limit):
                error = errors.model_starting(request.model, limit, pool.last_error)
                return await self._forwarder.fail(request, progress, error)
        return await self._forwarder.forward(request, pool, progress)

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
