"""Keep every site's agent running on its cluster's Globus Compute endpoint, lease after lease.

A Globus Compute task lives at most the endpoint's walltime, so an agent runs as a *lease*: a
`ShellFunction` whose command is wrapped in `timeout`, so that it ends by itself before its
walltime. The supervisor submits the next lease `overlap_s` before the current one ends, and
resubmits when the site's heartbeats (the router's Redis mirror, `names.REGISTRY_KEY`) go stale
or the task ends early; repeated quick failures back off exponentially. Only the holder of a
Redis lock acts; a standby takes over when the lock expires, adopting the running leases it
finds in `names.supervisor_key("leases")` instead of starting them again.

The supervisor file and the lease command: services/site_agent/supervise_config.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import names
from schemas.codec import DecodeError, heartbeat_decoder
from services.common.redis_lock import RedisLock
from services.site_agent.supervise_config import SiteSpec, SupervisorConfig, lease_function

logger = logging.getLogger(__name__)

LEASE_END_RC: Final = 124
"""What `timeout` (and ShellFunction at its walltime) exits with when time ran out."""
KILLED_RC: Final = 128 + 9
"""What `timeout` exits with when the agent outlived SIGTERM by kill_after_s."""


# --- The decision ------------------------------------------------------------------------------

Reason = Literal["start", "renew", "stale", "ended", "failed"]
RECOVERIES: Final[frozenset[Reason]] = frozenset({"stale", "ended", "failed"})
"""Submits that replace a lease gone wrong (they count towards the backoff)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """The newest lease of a site."""

    started_at: float
    ended_at: float | None = None
    """When its task was seen finished (None while it runs, or when adopted: not watched)."""
    failed: bool = False


@dataclass(frozen=True, slots=True)
class SiteState:
    """What the supervisor knows of one site."""

    lease: Lease | None = None
    last_beat_at: float | None = None
    """`received_at` of the site's heartbeat in the registry mirror, the router's clock (None:
    none there); never `sent_at`, which a site could date in the future."""
    recoveries: tuple[float, ...] = ()
    """When recovery submits happened, oldest first (the last few only)."""

    def submitted(self, now: float, reason: Reason) -> SiteState:
        """Return the state after a new lease was submitted at `now`."""
        recoveries = (*self.recoveries, now)[-16:] if reason in RECOVERIES else self.recoveries
        return replace(self, lease=Lease(started_at=now), recoveries=recoveries)

    def ended(self, at: float, *, failed: bool) -> SiteState:
        """Return the state after the newest lease's task finished at `at`."""
        if self.lease is None:
            return self
        return replace(self, lease=replace(self.lease, ended_at=at, failed=failed))


@dataclass(frozen=True, slots=True)
class Submit:
    """Submit a new lease of the site."""

    site_id: str
    reason: Reason


@dataclass(frozen=True, slots=True)
class Keep:
    """Leave the site as it is, at the latest until `until`."""

    site_id: str
    why: Literal["running", "booting", "backoff"]
    until: float


Action = Submit | Keep


def backoff_s(spec: SiteSpec, failures: int) -> float:
    """Return the pause before a recovery that follows `failures` unhealthy ones."""
    if failures <= 0:
        return 0.0
    return float(min(spec.backoff_max_s, spec.backoff_s * 2 ** min(failures - 1, 30)))


def _recover(now: float, spec: SiteSpec, state: SiteState, reason: Reason) -> Action:
    # Recoveries since the site last beat are consecutive failures: a heartbeat proves the
    # previous lease worked, so a site that runs for hours and then crashes restarts at once.
    since = state.last_beat_at
    failures = sum(1 for t in state.recoveries if since is None or t > since)
    if failures:
        resume_at = state.recoveries[-1] + backoff_s(spec, failures)
        if now < resume_at:
            return Keep(spec.site_id, "backoff", resume_at)
    return Submit(spec.site_id, reason)


def decide_site(now: float, spec: SiteSpec, state: SiteState) -> Action:
    """Decide what one site needs at `now`."""
    lease = state.lease
    if lease is None:
        return Submit(spec.site_id, "start")
    if lease.ended_at is not None:
        return _recover(now, spec, state, "failed" if lease.failed else "ended")
    renew_at = lease.started_at + spec.lease_s - spec.overlap_s
    if now >= renew_at:
        return Submit(spec.site_id, "renew")
    booted_at = lease.started_at + spec.boot_grace_s
    if now < booted_at:
        return Keep(spec.site_id, "booting", min(booted_at, renew_at))
    if state.last_beat_at is None or now - state.last_beat_at > spec.stale_after_s:
        return _recover(now, spec, state, "stale")
    return Keep(spec.site_id, "running", renew_at)


def decide(now: float, specs: Sequence[SiteSpec], states: Mapping[str, SiteState]) -> list[Action]:
    """Decide what every configured site needs at `now` (a site never seen starts afresh)."""
    return [decide_site(now, s, states.get(s.site_id, SiteState())) for s in specs]


def lease_outcome(future: concurrent.futures.Future[Any]) -> tuple[bool, str]:
    """Return whether a finished lease failed, and what to log about it."""
    if future.cancelled():
        return True, "cancelled before it ran"
    error = future.exception(timeout=0)
    if error is not None:
        return True, f"task raised {type(error).__name__}: {error}"
    result = future.result(timeout=0)
    rc = getattr(result, "returncode", None)
    walltime = getattr(result, "exception_name", None) == "subprocess.TimeoutExpired"
    if rc == LEASE_END_RC and not walltime:
        return False, "lease ran out"
    if rc == 0:
        return False, "agent exited"
    stderr = str(getattr(result, "stderr", ""))[-500:]
    if rc == KILLED_RC:
        return True, f"the agent ignored SIGTERM and was killed; stderr: {stderr}"
    if walltime:
        return True, f"walltime reached, the agent may still run; stderr: {stderr}"
    return True, f"exit code {rc}; stderr: {stderr}"


# --- The loop -------------------------------------------------------------------------------------

ExecutorFactory = Callable[[str], concurrent.futures.Executor]
"""Endpoint id -> executor: `globus_compute_sdk.Executor` in production, a local one in tests."""


class Supervisor:
    """Reads heartbeats, decides, and submits leases while it holds the lock."""

    def __init__(
        self,
        config: SupervisorConfig,
        redis: Redis,
        executor_factory: ExecutorFactory,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._options = config.supervisor
        self._redis = redis
        self._factory = executor_factory
        self._clock = clock  # wall clock: heartbeats and lease records come from other hosts
        self.lock = RedisLock(redis, names.supervisor_key("lock"), self._options.lock_ttl_s)
        self._leases_key = names.supervisor_key("leases")
        # One function per site: the SDK registers a function once per executor and object.
        self._functions = {s.site_id: lease_function(s) for s in config.sites}
        self._executors: dict[str, concurrent.futures.Executor] = {}
        self._states: dict[str, SiteState] = {}
        self._newest: dict[str, concurrent.futures.Future[Any]] = {}
        self._older: list[tuple[str, concurrent.futures.Future[Any]]] = []

    async def run(self, stop: asyncio.Event) -> None:
        """Supervise (or stand by) every tick until `stop` is set; then give up the lock."""
        try:
            while not stop.is_set():
                await self.step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._options.tick_s)
        finally:
            await self.lock.release()
            for executor in self._executors.values():
                # Never wait: the leases keep serving until they run out, and the standby
                # adopts them. Only submits not yet sent are cancelled.
                executor.shutdown(wait=False, cancel_futures=True)

    async def step(self) -> None:
        """Hold the lock (adopting the leases when just taken), then look at every site once."""
        was_held = self.lock.valid()
        if not await self.lock.hold():
            if was_held:
                logger.warning("supervisor: lost the lock; standing by")
                self._states.clear()
                self._older.extend(self._newest.items())
                self._newest.clear()
            return
        try:
            if not was_held:
                await self._adopt()
            await self._tick(self._clock())
        except RedisError as exc:
            logger.warning("supervisor: Redis failed, skipping this tick: %s", exc)

    async def _adopt(self) -> None:
        raw = cast(dict[bytes, bytes], await self._redis.hgetall(self._leases_key))
        self._states = {}
        for spec in self._config.sites:
            value = raw.get(spec.site_id.encode())
            with contextlib.suppress(ValueError):  # an unreadable record: start afresh
                if value is not None:
                    lease = Lease(started_at=float(value))
                    self._states[spec.site_id] = SiteState(lease=lease)
        logger.info("supervisor: active; adopted the leases of %d sites", len(self._states))

    async def _beats(self) -> dict[str, float | None]:
        ids = [s.site_id for s in self._config.sites]
        raw = cast(list[bytes | None], await self._redis.hmget(names.REGISTRY_KEY, ids))
        beats: dict[str, float | None] = {}
        for site_id, value in zip(ids, raw, strict=True):
            try:
                beats[site_id] = heartbeat_decoder.decode(value).received_at if value else None
            except DecodeError:
                logger.warning("supervisor: undecodable heartbeat", extra={"site_id": site_id})
                beats[site_id] = None
        return beats

    def _observe_ends(self, now: float) -> None:
        for site_id, future in [(s, f) for s, f in self._newest.items() if f.done()]:
            failed, what = lease_outcome(future)
            del self._newest[site_id]
            state = self._states.get(site_id, SiteState())
            self._states[site_id] = state.ended(now, failed=failed)
            log = logger.warning if failed else logger.info
            log("supervisor: current lease ended: %s", what, extra={"site_id": site_id})
        for site_id, future in [(s, f) for s, f in self._older if f.done()]:
            self._older.remove((site_id, future))
            what = lease_outcome(future)[1]
            logger.info("supervisor: earlier lease ended: %s", what, extra={"site_id": site_id})

    async def _tick(self, now: float) -> None:
        beats = await self._beats()
        for site_id, received_at in beats.items():
            state = self._states.get(site_id, SiteState())
            self._states[site_id] = replace(state, last_beat_at=received_at)
        self._observe_ends(now)
        for action in decide(now, self._config.sites, self._states):
            # Extend the lock before each submit: a tick of slow submits may outlast its TTL.
            if isinstance(action, Submit) and await self.lock.hold():
                await self._submit(action, self._clock())

    async def _submit(self, action: Submit, now: float) -> None:
        spec = next(s for s in self._config.sites if s.site_id == action.site_id)
        context = {"site_id": spec.site_id}
        timeout = self._options.submit_timeout_s
        try:
            executor = self._executors.get(spec.endpoint_id)
            if executor is None:
                made = asyncio.to_thread(self._factory, spec.endpoint_id)
                executor = await asyncio.wait_for(made, timeout)
                self._executors[spec.endpoint_id] = executor
            submit = asyncio.to_thread(executor.submit, self._functions[spec.site_id])
            future: concurrent.futures.Future[Any] | None = await asyncio.wait_for(submit, timeout)
        except Exception as exc:  # noqa: BLE001 - the SDK raises many kinds; each is a failed lease
            logger.warning("supervisor: cannot submit (%s): %r", action.reason, exc, extra=context)
            # The SDK's executor shuts itself down after a failed registration: build a new one.
            dropped = self._executors.pop(spec.endpoint_id, None)
            if dropped is not None:
                dropped.shutdown(wait=False, cancel_futures=True)
            future = None
        # The lease it replaces (if any) runs on until its end; only the newest one is watched.
        previous = self._newest.pop(spec.site_id, None)
        if previous is not None:
            self._older.append((spec.site_id, previous))
        state = self._states.get(spec.site_id, SiteState()).submitted(now, action.reason)
        if future is None:
            self._states[spec.site_id] = state.ended(now, failed=True)
            return
        self._states[spec.site_id] = state
        self._newest[spec.site_id] = future
        await self._redis.hset(self._leases_key, spec.site_id, repr(now))
        logger.info("supervisor: lease submitted (%s)", action.reason, extra=context)
