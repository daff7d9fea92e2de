"""What the site should do with one model's instances now: a pure decision, no I/O.

The instance manager (services/site_agent/instances.py) looks at each model's pool every tick,
calls `plan`, and carries out the actions through the launcher:

- a started instance becomes hot once it answers `/health` and lists the model in `/v1/models`;
  one that is not healthy within `start_timeout_s`, or whose process or job died, is stopped
  (and replaced if it is still needed);
- the pool keeps `min_hot` instances, and at least one while requests wait for the model or a
  router asked to start it (`StartModel`, until `wanted_until`);
- it scales up, one instance at a time and up to `max_instances`, while waiting requests per
  hot instance exceed `scale_up_waiting`;
- an instance idle for `idle_ttl_s` beyond what is needed is drained (no new work, in-flight
  requests finish), then stopped;
- after `MAX_QUICK_FAILURES` failed starts in a row, starts pause for `FAILURE_BACKOFF_S`, so a
  broken command does not spin the scheduler.

Instances the site file lists by URL (not started by us) count as hot capacity and are never
started, drained or stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from services.site_agent.siteconfig import ModelConfig

InstanceState = Literal["starting", "hot", "draining"]

MAX_QUICK_FAILURES: Final = 3
FAILURE_BACKOFF_S: Final = 60.0


@dataclass(frozen=True)
class InstanceView:
    """One instance as the manager last saw it (times are monotonic seconds)."""

    instance_id: str
    state: InstanceState
    managed: bool
    """Started by our launcher (False: a configured URL)."""
    healthy: bool
    alive: bool
    """Its process or job still exists (always True for configured URLs)."""
    in_flight: int
    running: int
    waiting: int
    started_at: float
    idle_since: float | None
    """Since when nothing ran on it; None while busy."""


@dataclass(frozen=True)
class PoolView:
    """One model's pool and the demand on it."""

    model: str
    instances: tuple[InstanceView, ...]
    held: int = 0
    """Requests at this agent waiting for a hot instance."""
    wanted_until: float = 0.0
    """A router's StartModel keeps at least one instance until then."""
    failures: int = 0
    """Starts that failed in a row (reset by an instance becoming hot)."""
    last_failure_at: float = 0.0


@dataclass(frozen=True)
class Start:
    model: str
    reason: str


@dataclass(frozen=True)
class Promote:
    instance_id: str


@dataclass(frozen=True)
class Drain:
    instance_id: str
    reason: str


@dataclass(frozen=True)
class Stop:
    instance_id: str
    reason: str
    failed: bool
    """The instance failed (died, never became healthy): counts towards the start backoff."""


Action = Start | Promote | Drain | Stop


def _ended(view: InstanceView, config: ModelConfig, now: float) -> Stop | None:
    """Return the Stop of an instance that must go now, if any."""
    if not view.managed:
        return None
    if not view.alive:
        return Stop(view.instance_id, "its process or job ended", failed=True)
    if (
        view.state == "starting"
        and not view.healthy
        and now - view.started_at > config.start_timeout_s
    ):
        reason = f"not healthy within {config.start_timeout_s:g} s"
        return Stop(view.instance_id, reason, failed=True)
    if view.state == "draining" and view.in_flight == 0:
        return Stop(view.instance_id, "drained", failed=False)
    return None


def wanted_instances(view: PoolView, config: ModelConfig, hot: int, now: float) -> int:
    """Return how many instances (hot or starting) the model should have."""
    wanted = config.min_hot
    if view.held > 0 or view.wanted_until > now:
        wanted = max(wanted, 1)
    backlog = view.held + sum(i.waiting for i in view.instances if i.state == "hot")
    if hot > 0 and backlog > config.scale_up_waiting * hot:
        wanted = max(wanted, hot + 1)
    return wanted


def plan(view: PoolView, config: ModelConfig, now: float) -> list[Action]:
    """Return what to do with `view`'s instances now (see the module's docstring)."""
    actions: list[Action] = []
    kept: list[InstanceView] = []
    for instance in view.instances:
        stop = _ended(instance, config, now)
        if stop is not None:
            actions.append(stop)
            continue
        if instance.state == "starting" and instance.healthy:
            actions.append(Promote(instance.instance_id))
            # Hot from now on, and idle only from now on: never drained in the same breath.
            instance = InstanceView(**{**instance.__dict__, "state": "hot", "idle_since": now})
        kept.append(instance)
    live = [i for i in kept if i.state in ("hot", "starting")]
    hot = sum(1 for i in live if i.state == "hot" and i.healthy)
    wanted = wanted_instances(view, config, hot, now)
    room = min(wanted, config.max_instances + sum(1 for i in live if not i.managed)) - len(live)
    backing_off = (
        view.failures >= MAX_QUICK_FAILURES and now - view.last_failure_at < FAILURE_BACKOFF_S
    )
    if room > 0 and config.command and not backing_off:
        # One start per tick: starting instances count as live, so demand that one more
        # instance would meet starts exactly one, not one per tick while it boots.
        actions.append(Start(view.model, _start_reason(view, config, hot, now)))
    elif room < 0 and view.held == 0:
        idle = [
            i
            for i in live
            if i.managed
            and i.state == "hot"
            and i.in_flight == 0
            and i.idle_since is not None
            and now - i.idle_since >= config.idle_ttl_s
        ]
        if idle:
            longest = min(idle, key=lambda i: (i.idle_since, i.instance_id))
            actions.append(Drain(longest.instance_id, f"idle for {config.idle_ttl_s:g} s"))
    return actions


def _start_reason(view: PoolView, config: ModelConfig, hot: int, now: float) -> str:
    if hot == 0 and view.held > 0:
        return f"{view.held} request(s) waiting for a cold model"
    if hot == 0 and view.wanted_until > now:
        return "a router asked to start it"
    if hot < config.min_hot:
        return f"keeping min_hot={config.min_hot}"
    return f"waiting requests exceed {config.scale_up_waiting} per instance"
