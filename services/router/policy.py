"""Routing decisions as pure functions: no broker, HTTP or Redis here.

`choose_site` picks, among the live sites the request may use (its `allowed_sites` when it names
any) that have its model hot, the site to dispatch it to, by one of three policies:

- "first" (ours): the least `estimated_wait_s`, from each site's last heartbeat plus what this
  router sent since; sites whose heartbeat is overdue rank last; among sites with a free slot,
  the most spare generation speed; then the smallest site_id, so that replicas decide alike.
  A request with an `affinity_key` stays where its key last went while that site is within
  `PolicyState.affinity_slack_s` of the best, so that the site's prefix cache serves it.
- "round_robin" and "random": the benchmark's baselines, which know liveness and hotness only.

When no site has the model hot, `choose_start_site` says where to start it. The decisions
mutate only the `PolicyState` passed in, which the router owns (one per replica).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from schemas.messages import ModelStatus, RunInference, SiteHeartbeat

Policy = Literal["first", "round_robin", "random"]
POLICIES: Final[tuple[Policy, ...]] = ("first", "round_robin", "random")

MEAN_OUTPUT_TOKENS: Final = 256.0
"""Output length assumed for the requests queued ahead. The router cannot know theirs (and the
new request's own max_tokens does not delay its start); a constant scales every site's estimate
alike, so it changes their size, not their order."""
DEFAULT_TOKENS_PER_S: Final = 20.0
"""Per-request generation speed assumed where a heartbeat measured none (idle or just started)."""
OVERDUE_INTERVALS: Final = 2.5
"""A heartbeat older than this many of its site's intervals is overdue: one beat was missed, so
the site may be dying; it stays live until the TTL but ranks after every punctual site."""
AFFINITY_SLACK_S: Final = 0.5
"""Estimated wait a request may accept over the best site's to stay on its affinity site."""
AFFINITY_TTL_S: Final = 300.0
"""An affinity key unused this long is forgotten: its site has likely evicted the prefix."""
AFFINITY_MAX_KEYS: Final = 100_000
PREFIX_CHARS: Final = 1024
"""A prompt shares a cacheable prefix with others when its first this many characters (about
256 tokens) are theirs; shorter prompts are cheap to prefill anywhere and get no prefix key."""
START_GRACE_S: Final = 10.0
"""How long a decided start is trusted before the site's heartbeats show it (as "starting")."""


def is_live(heartbeat: SiteHeartbeat, now: float, ttl_s: float) -> bool:
    """Tell whether a site's last heartbeat was received less than `ttl_s` ago.

    By the router's clock (`received_at`), never the site's: one never stamped is not live.
    """
    return now - heartbeat.received_at < ttl_s


def is_overdue(heartbeat: SiteHeartbeat, now: float) -> bool:
    """Tell whether a site missed a heartbeat (see OVERDUE_INTERVALS), by receive time."""
    return now - heartbeat.received_at > OVERDUE_INTERVALS * heartbeat.interval_s


def model_status(heartbeat: SiteHeartbeat, model: str) -> ModelStatus | None:
    """Return the site's status of `model` in any state, None if the site does not list it."""
    return next((status for status in heartbeat.models if status.model == model), None)


def free_capacity(status: ModelStatus, in_flight: int = 0) -> int:
    """Return the slots left: capacity minus running, waiting and what was sent but not yet seen.

    May be negative: an overloaded site still ranks, below every less loaded one.
    """
    return status.capacity - status.running - status.waiting - in_flight


def request_tokens_per_s(status: ModelStatus, default: float = DEFAULT_TOKENS_PER_S) -> float:
    """Return the generation speed one request gets on the site: measured, else `default`.

    `tokens_per_s` is the site's total for the model over its last heartbeat interval; shared by
    the running requests it follows vLLM's slowdown per request as batches grow.
    """
    speed = status.tokens_per_s
    if status.running > 0 and math.isfinite(speed) and speed > 0:
        return speed / status.running
    return default


def estimated_wait_s(
    status: ModelStatus,
    in_flight: int = 0,
    *,
    mean_output_tokens: float = MEAN_OUTPUT_TOKENS,
    default_tokens_per_s: float = DEFAULT_TOKENS_PER_S,
) -> float:
    """Estimate how long a request sent now waits before it starts on the site.

    0 while a slot is free (running + waiting + `in_flight` < capacity). Else `ahead` requests
    must finish first (those queued, plus one to free a slot), and `capacity` slots finish one
    request each per service time (`mean_output_tokens` at `request_tokens_per_s`):
    wait = ahead / capacity x service time. Infinite for a site without capacity.
    """
    if status.capacity <= 0:
        return math.inf
    free = free_capacity(status, in_flight)
    if free > 0:
        return 0.0
    service_s = mean_output_tokens / request_tokens_per_s(status, default_tokens_per_s)
    return (1 - free) / status.capacity * service_s


class _Body(msgspec.Struct):
    # Only what affinity reads; msgspec skips the rest of the body unparsed.
    user: Any = None
    messages: Any = None
    prompt: Any = None
    tools: Any = None


_body_decoder: Final = msgspec.json.Decoder(_Body)


def _text(value: Any) -> str:
    # Message content is a string or a list of parts; a prompt a string, a list of strings
    # (a batch: its first one) or token ids. Anything else contributes nothing.
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(item, int) for item in value):
            return " ".join(map(str, value))
        if isinstance(value[0], str | list):
            return _text(value[0])
        return "".join(
            part["text"]
            for part in value
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _prompt_text(body: _Body) -> str:
    # Roughly the order a chat template lays the prompt out in: tools, then the messages.
    text = msgspec.json.encode(body.tools).decode() if body.tools else ""
    if isinstance(body.messages, list):
        for message in body.messages:
            if isinstance(message, dict):
                text += f"{message.get('role')}\x1f{_text(message.get('content'))}\x1e"
            if len(text) >= PREFIX_CHARS:
                break
        return text
    return text + _text(body.prompt)


def _digest(*parts: str) -> str:
    # Stable across processes and replicas, unlike hash(); keeps no raw user data in memory.
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=12).hexdigest()


def affinity_key(request: RunInference) -> str | None:
    """Return what should keep this request on the site of related ones, or None.

    In order: an explicit session (a `session` attribute, when the message has one), the body's
    `user` field (both per caller and model), or the first PREFIX_CHARS of the prompt (per model,
    across callers: a shared system prompt is one cache entry). Bodies that do not parse get None.
    """
    session = getattr(request, "session", "")
    if isinstance(session, str) and session:
        return "session:" + _digest(request.model, request.user_id, session)
    try:
        body = _body_decoder.decode(request.body)
    except msgspec.DecodeError:
        return None
    if isinstance(body.user, str) and body.user:
        return "user:" + _digest(request.model, request.user_id, body.user)
    text = _prompt_text(body)
    if len(text) >= PREFIX_CHARS:
        return "prefix:" + _digest(request.model, text[:PREFIX_CHARS])
    return None


class Affinity:
    """Which site each affinity key last went to; the least recently used are forgotten first."""

    def __init__(self, max_keys: int = AFFINITY_MAX_KEYS, ttl_s: float = AFFINITY_TTL_S) -> None:
        self._max_keys = max_keys
        self._ttl_s = ttl_s
        self._sites: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sites)

    def site(self, key: str, now: float) -> str | None:
        """Return the site `key` last went to, unless that is older than the TTL."""
        held = self._sites.get(key)
        if held is None:
            return None
        if now - held[1] >= self._ttl_s:
            del self._sites[key]
            return None
        return held[0]

    def remember(self, key: str, site_id: str, now: float) -> None:
        """Record that `key` went to `site_id` at `now`."""
        self._sites[key] = (site_id, now)
        self._sites.move_to_end(key)
        while len(self._sites) > self._max_keys:
            self._sites.popitem(last=False)


@dataclass
class PolicyState:
    """What one router replica remembers between decisions."""

    affinity: Affinity = field(default_factory=Affinity)
    rng: random.Random = field(default_factory=random.Random)
    """The "random" policy's generator; seed it for a reproducible run."""
    last_turn: dict[str, str] = field(default_factory=dict)
    """Per model, the site "round_robin" gave the last request."""
    pending_starts: dict[str, tuple[str, float]] = field(default_factory=dict)
    """Per model, the site a start was decided for and when (see START_GRACE_S)."""
    affinity_slack_s: float = AFFINITY_SLACK_S
    """See AFFINITY_SLACK_S; in the units of the estimates, so scale it with the next one."""
    mean_output_tokens: float = MEAN_OUTPUT_TOKENS
    """See MEAN_OUTPUT_TOKENS; set it to the deployment's mean output length when known."""


@dataclass(frozen=True)
class _Candidate:
    site_id: str
    heartbeat: SiteHeartbeat
    status: ModelStatus


def _usable(
    request: RunInference, sites: Sequence[SiteHeartbeat], now: float, ttl_s: float
) -> list[_Candidate]:
    """Return the live sites the request may use that list its model, by site_id."""
    found = []
    for heartbeat in sites:
        if not is_live(heartbeat, now, ttl_s):
            continue
        if request.allowed_sites and heartbeat.site_id not in request.allowed_sites:
            continue
        status = model_status(heartbeat, request.model)
        if status is not None:
            found.append(_Candidate(heartbeat.site_id, heartbeat, status))
    return sorted(found, key=lambda candidate: candidate.site_id)


def choose_site(
    request: RunInference,
    sites: Sequence[SiteHeartbeat],
    now: float,
    ttl_s: float,
    sent: Mapping[str, int] | None = None,
    *,
    policy: Policy = "first",
    state: PolicyState | None = None,
) -> str | None:
    """Pick the site to send `request` to by `policy`; None when no live site has its model hot.

    `sent` counts, per site, what this router dispatched that the site's last heartbeat does
    not reflect yet. "first" works without `state` (then without affinity); the baselines need
    it (their turn and generator live there).
    """
    hot = [c for c in _usable(request, sites, now, ttl_s) if c.status.state == "hot"]
    if not hot:
        return None
    if policy == "first":
        return _least_wait(request, hot, now, sent or {}, state)
    if state is None:
        raise ValueError(f"policy {policy!r} needs a PolicyState")
    if policy == "round_robin":
        last = state.last_turn.get(request.model)
        site_id = next((c.site_id for c in hot if last is None or c.site_id > last), hot[0].site_id)
        state.last_turn[request.model] = site_id
        return site_id
    return state.rng.choice(hot).site_id


def _least_wait(
    request: RunInference,
    hot: list[_Candidate],
    now: float,
    sent: Mapping[str, int],
    state: PolicyState | None,
) -> str:
    mean_output_tokens = MEAN_OUTPUT_TOKENS if state is None else state.mean_output_tokens
    ranks: dict[str, tuple[bool, float, float, str]] = {}
    for candidate in hot:
        in_flight = sent.get(candidate.site_id, 0)
        wait = estimated_wait_s(candidate.status, in_flight, mean_output_tokens=mean_output_tokens)
        # Among free slots, a fast site finishes sooner and frees its slot sooner.
        spare = free_capacity(candidate.status, in_flight) * request_tokens_per_s(candidate.status)
        overdue = is_overdue(candidate.heartbeat, now)
        ranks[candidate.site_id] = (overdue, wait, -spare, candidate.site_id)
    best = min(ranks.values())
    key = None if state is None else affinity_key(request)
    if state is None or key is None:
        return best[3]
    kept = state.affinity.site(key, now)
    rank = ranks.get(kept or "")
    if rank is not None and rank[0] <= best[0] and rank[1] <= best[1] + state.affinity_slack_s:
        chosen = rank[3]
    else:
        chosen = best[3]
    state.affinity.remember(key, chosen, now)
    return chosen


@dataclass(frozen=True)
class StartOn:
    """Send `StartModel` for the request's model to `site_id`; the request waits for it."""

    site_id: str


@dataclass(frozen=True)
class WaitFor:
    """The model is already starting (or hot) on `site_id`: start nothing, the request waits."""

    site_id: str


@dataclass(frozen=True)
class NoSite:
    """No live site the request may use can start its model: fail the request if none comes.

    None lists it, or those that do drain it or run only instances they were given by URL.
    """


StartDecision = StartOn | WaitFor | NoSite


def choose_start_site(
    request: RunInference,
    sites: Sequence[SiteHeartbeat],
    now: float,
    ttl_s: float,
    *,
    state: PolicyState | None = None,
) -> StartDecision:
    """Decide where the request's model should start, for when `choose_site` found no site.

    A site "starting" it (or one this router decided to start it on less than START_GRACE_S
    ago, which `state` remembers: its heartbeat may not show it yet) means wait. Else the best
    live site listing it "cold" that may start instances (`max_instances` > 0; a site given
    instances only by URL cannot): punctual heartbeats first, then the most room it could
    give the model (`slots_per_instance` x `max_instances`), then the fewest `restarts`, then
    the smallest site_id. A site "draining" the model is not restarted: it is unloading it on
    purpose; when done it lists the model cold again.
    """
    usable = _usable(request, sites, now, ttl_s)
    pending = None if state is None else state.pending_starts.get(request.model)
    if (
        pending is not None
        and now - pending[1] < START_GRACE_S
        and any(c.site_id == pending[0] for c in usable)
    ):
        return WaitFor(pending[0])
    coming = [c for c in usable if c.status.state in ("starting", "hot")]
    if coming:
        best = min(coming, key=lambda c: (c.status.state != "hot", is_overdue(c.heartbeat, now)))
        return WaitFor(best.site_id)
    cold = [c for c in usable if c.status.state == "cold" and c.status.max_instances > 0]
    if not cold:
        return NoSite()
    best = min(cold, key=lambda c: _start_rank(c, now))
    if state is not None:
        state.pending_starts[request.model] = (best.site_id, now)
    return StartOn(best.site_id)


def _start_rank(candidate: _Candidate, now: float) -> tuple[bool, int, int, str]:
    status = candidate.status
    room = status.slots_per_instance * status.max_instances
    return (is_overdue(candidate.heartbeat, now), -room, status.restarts, candidate.site_id)
