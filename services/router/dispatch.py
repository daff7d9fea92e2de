"""Credit-based dispatch of batch lines: they wait here until a site has a free slot for them.

A batch line's delivery is held unacked (RabbitMQ keeps it: a crash of the router redelivers
it, nothing lives only in memory) and published to a site only when the site has credit
(services/router/credit.py) — so a site never holds more batch work than it has free slots
for beyond its interactive reserve. Which line goes next is the fair share's choice
(services/router/fairness.py): the head line of the least served user among those whose line
can go now. A round runs on every kept heartbeat (the agents beat again shortly after a
request finishes, so a freed slot is refilled within ~100 ms), on every new line, and every
`dispatch_tick_s` (expiry, model starts).

Interactive requests do not pass here: they are routed at once (handlers.route), and count
against the sites' credit through the registry's `sent`.

Two router replicas each dispatch only the lines they hold, from the same heartbeats, without
seeing each other's dispatches until the next heartbeat: between two heartbeats a site may get
up to its credit from each replica. The overcommit is bounded by one heartbeat (the extra lines
wait in the site's batch queue, behind its interactive queue) and the fair share is each
replica's own.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

from faststream.rabbit.message import RabbitMessage
from redis.exceptions import RedisError

from schemas.codec import DecodeError, usage_decoder
from schemas.messages import RunInference
from services.common import replies, streams
from services.common.broker import PUBLISH_ERRORS
from services.router import errors, metrics
from services.router.credit import reserve_share, with_credit
from services.router.fairness import Estimate, VirtualTokenCounter, estimate
from services.router.handlers import Deps, dispatch, start_model
from services.router.policy import StartOn, choose_site, choose_start_site

logger = logging.getLogger(__name__)

END_ERRORS: tuple[type[BaseException], ...] = (RedisError, *PUBLISH_ERRORS)


@dataclass
class Held:
    """One batch line waiting for credit, with its (still unacked) delivery."""

    msg: RabbitMessage
    request: RunInference
    guess: Estimate
    held_since: float


def in_age_order(queue: deque[Held], held: Held) -> None:
    """Put `held` into its user's `queue`, oldest request first.

    Deliveries are handled concurrently (aio-pika runs one task per delivery) and each waits
    on Redis (the request id's reservation) before it is held, so lines may arrive here out of
    the order they were published in; their ids are time-sortable UUIDv7s, so the id is the
    age. Nearly always it goes last.
    """
    key = held.request.request_id
    if not queue or queue[-1].request.request_id <= key:
        queue.append(held)
        return
    index = bisect.bisect_right([h.request.request_id for h in queue], key)
    queue.insert(index, held)


class Dispatcher:
    """The batch lines this replica holds, per user, and the rounds that dispatch them."""

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self._queues: dict[str, deque[Held]] = {}
        self._ids: dict[str, Held] = {}
        self.vtc = VirtualTokenCounter(deps.settings.prompt_token_weight)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        deps.registry.add_listener(self._wake.set)

    def held(self) -> int:
        """Return how many lines wait here."""
        return len(self._ids)

    def held_by_user(self) -> dict[str, int]:
        """Return, per user, how many lines wait here."""
        return {user: len(queue) for user, queue in self._queues.items() if queue}

    async def hold(self, msg: RabbitMessage, _deps: Deps, request: RunInference) -> None:
        """Keep one admitted batch line (unacked) until a site has credit for it."""
        already = self._ids.get(request.request_id)
        if already is not None:
            # Redelivered (our channel broke and came back): the old delivery cannot be acked
            # any more; the new one stands for the same line, in the same place.
            already.msg = msg
            return
        waiting = [user for user, queue in self._queues.items() if queue]
        queue = self._queues.setdefault(request.user_id, deque())
        if not queue:
            self.vtc.arrive(request.user_id, waiting)
        held = Held(msg, request, estimate(request), time.time())
        in_age_order(queue, held)
        self._ids[request.request_id] = held
        self._wake.set()

    async def run(self) -> None:
        """Dispatch rounds until cancelled: on a wake-up, or every `dispatch_tick_s`."""
        tick = self._deps.settings.dispatch_tick_s
        while True:
            with contextlib.suppress(TimeoutError):  # a tick: expiry and starts
                await asyncio.wait_for(self._wake.wait(), tick)
            self._wake.clear()
            try:
                await self.round()
            except END_ERRORS as exc:  # the broker or Redis is away: the next round retries
                logger.warning("dispatch round failed: %r", exc)
                await asyncio.sleep(self._deps.settings.retry_delay_s)

    async def round(self) -> int:
        """End expired lines, then dispatch while some site has credit; return how many went."""
        async with self._lock:
            await self._expire(time.time())
            sent = 0
            while (choice := self._next(time.time())) is not None:
                held, site_id = choice
                if not await self._send(held, site_id):
                    break
                sent += 1
            return sent

    def _next(self, now: float) -> tuple[Held, str] | None:
        """Return the next line to send and where: the least served user's oldest line that
        some site has credit for (another user's line goes first if none of hers can go now).

        A user's lines for a model no site can take now do not block her other models: each
        model is looked at once per call, for its oldest line (lines of one model and user
        are alike to the sites)."""
        deps = self._deps
        registry = deps.registry
        sites, sent = registry.sites(), registry.sent()
        share = reserve_share(
            deps.settings.interactive_reserve,
            registry.last_interactive,
            now,
            deps.settings.reserve_idle_s,
        )
        users = [user for user, queue in self._queues.items() if queue]
        for user in sorted(users, key=lambda u: (self.vtc.counter(u), u)):
            looked: set[tuple[str, tuple[str, ...]]] = set()
            for held in self._queues[user]:
                request = held.request
                kind = (request.model, request.allowed_sites)
                if kind in looked:
                    continue
                looked.add(kind)
                open_sites = with_credit(request, sites, now, registry.ttl_s, sent, share)
                site_id = choose_site(
                    request,
                    open_sites,
                    now,
                    registry.ttl_s,
                    sent,
                    policy=deps.settings.policy,
                    state=deps.policy,
                )
                if site_id is not None:
                    return held, site_id
        return None

    async def _send(self, held: Held, site_id: str) -> bool:
        """Publish `held` to `site_id`, ack it and charge its user; False if not confirmed."""
        request = held.request
        try:
            await dispatch(self._deps, request, site_id)
        except PUBLISH_ERRORS as exc:
            logger.warning("dispatch of %s to %s failed: %r", request.request_id, site_id, exc)
            return False
        self._drop(held)
        self.vtc.charge(request.request_id, request.user_id, held.guess)
        await self._ack(held)
        queued_s = max(0.0, time.time() - request.created_at)
        metrics.ROUTED.labels(site_id, request.priority).inc()
        metrics.QUEUE_WAIT.labels(request.priority).observe(queued_s)
        logger.debug(
            "batch line %s of %s to %s after %.3f s (counter %.0f)",
            request.request_id,
            request.user_id,
            site_id,
            queued_s,
            self.vtc.counter(request.user_id),
        )
        return True

    async def _ack(self, held: Held) -> None:
        try:
            await held.msg.ack()
        except PUBLISH_ERRORS as exc:
            # The channel broke after the line went out: RabbitMQ redelivers it, and the site's
            # claim on the request id makes the second copy a no-op.
            logger.warning("ack of %s failed: %r", held.request.request_id, exc)

    def _drop(self, held: Held) -> None:
        self._ids.pop(held.request.request_id, None)
        queue = self._queues.get(held.request.user_id)
        if queue is not None:
            queue.remove(held)
            if not queue:
                del self._queues[held.request.user_id]

    async def _expire(self, now: float) -> None:
        """End the lines whose `expires_at` passed; ask for model starts no site has hot."""
        asked: set[str] = set()
        for held in list(self._ids.values()):
            request = held.request
            if request.expires_at <= now:
                await self._end(held, now - held.held_since)
                continue
            if request.model in asked:
                continue
            asked.add(request.model)
            await self._start_if_cold(request, now)

    async def _start_if_cold(self, request: RunInference, now: float) -> None:
        deps = self._deps
        registry = deps.registry
        sites = registry.sites()
        if choose_site(request, sites, now, registry.ttl_s, policy="first") is not None:
            return
        decision = choose_start_site(request, sites, now, registry.ttl_s, state=deps.policy)
        if isinstance(decision, StartOn):
            await start_model(deps, decision.site_id, request.model)

    async def _end(self, held: Held, waited_s: float) -> None:
        """End an expired line's stream with a 503 (and its reply), then ack it.

        Raises what Redis or the broker raise: the line stays held, the next round retries.
        """
        request = held.request
        deps = self._deps
        error = errors.no_site_available(request.model, waited_s)
        await streams.fail(
            deps.redis, request.request_id, error, site_id="", ttl_s=deps.settings.stream_ttl_s
        )
        if request.reply_to:
            reply = replies.refusal(request.request_id, error)
            await replies.send_reply(
                deps.broker, request.reply_to, reply, deps.settings.publish_timeout_s
            )
        self._drop(held)
        await self._ack(held)
        metrics.FAILED.labels("no_site").inc()
        logger.info("batch line %s expired after %.1f s held", request.request_id, waited_s)

    def observe_usage(self, body: bytes) -> None:
        """Correct the fair share's estimate of one request from its UsageRecorded."""
        try:
            usage = usage_decoder.decode(body)
        except DecodeError as exc:
            logger.warning("ignoring undecodable usage (%d bytes): %s", len(body), exc)
            return
        self.vtc.correct(usage.request_id, usage.prompt_tokens, usage.completion_tokens)
