"""The benchmark's scenario as a discrete-event simulation of the router's policies (no I/O).

Sites a, b, c have 8, 4 and 2 slots at 40, 20 and 10 tokens/s per request; every request
generates 64 tokens, its first one token's time after it starts. Poisson arrivals at 80 % of the
sites' total throughput (6.5625 requests/s) bring 600 requests (seed 7) from 40 sessions (the
body's `user`). Site b dies once 40 % of the requests were sent: what it runs with a token out
fails; what it runs without one, what waits in its queue and what the router still sends it
moves elsewhere once its last heartbeat is older than the TTL.

The router knows what the real one knows: each site's last heartbeat (every 2 s: running,
waiting, capacity, and tokens/s measured over the interval) and its own count of dispatches
since. No prefix cache is modelled, so affinity can only cost here, not gain. Goodput: requests
completed with TTFT <= 2 s per second of the arrival window. `pytest -s` prints the tables.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
import statistics
from collections import deque
from dataclasses import dataclass, field

import pytest

from schemas.messages import ModelStatus, RunInference, SiteHeartbeat
from services.router.policy import POLICIES, Policy, PolicyState, choose_site

MODEL = "m"
SPECS = {"a": (8, 40.0), "b": (4, 20.0), "c": (2, 10.0)}  # site: (slots, tokens/s per request)
OUTPUT_TOKENS = 64
REQUESTS = 600
SESSIONS = 40
SEED = 7
LOAD = 0.8
HEARTBEAT_S = 2.0
TTL_S = 15.0  # the router's default site_ttl_s
DYING = "b"
DIES_AFTER = int(0.4 * REQUESTS)
SLO_TTFT_S = 2.0


@dataclass
class Job:
    index: int
    request: RunInference
    session: int
    site: str = ""
    first_token_at: float | None = None
    done: bool = False
    failed: bool = False


@dataclass
class Site:
    site_id: str
    slots: int
    speed: float
    alive: bool = True
    running: dict[int, Job] = field(default_factory=dict)
    queue: deque[Job] = field(default_factory=deque)
    busy_area: float = 0.0  # running requests integrated over time: tokens = area x speed
    last_change: float = 0.0
    tokens_at_beat: float = 0.0
    last_beat: float = 0.0

    def advance(self, now: float) -> None:
        self.busy_area += len(self.running) * (now - self.last_change)
        self.last_change = now

    def heartbeat(self, now: float) -> SiteHeartbeat:
        self.advance(now)
        tokens = self.busy_area * self.speed
        status = ModelStatus(
            model=MODEL,
            state="hot",
            instances=1,
            running=len(self.running),
            waiting=len(self.queue),
            capacity=self.slots,
            tokens_per_s=(tokens - self.tokens_at_beat) / HEARTBEAT_S,
        )
        self.tokens_at_beat, self.last_beat = tokens, now
        return SiteHeartbeat(
            site_id=self.site_id,
            agent_id="sim",
            sent_at=now,
            interval_s=HEARTBEAT_S,
            models=(status,),
            received_at=now,
        )


def arrivals(seed: int) -> list[tuple[float, int]]:
    """Return the (time, session) of every request, from the first heartbeat round on."""
    rng = random.Random(seed)
    rate = LOAD * sum(slots * speed / OUTPUT_TOKENS for slots, speed in SPECS.values())
    now, out = HEARTBEAT_S, []
    for _ in range(REQUESTS):
        now += rng.expovariate(rate)
        out.append((now, rng.randrange(SESSIONS)))
    return out


class Simulation:
    """One policy's run: sites, the router's view of them, and an event queue."""

    def __init__(self, policy: Policy, seed: int = SEED) -> None:
        self.policy = policy
        self.seed = seed
        self.state = PolicyState(rng=random.Random(seed))
        self.sites = {s: Site(s, slots, speed) for s, (slots, speed) in SPECS.items()}
        self.beats: dict[str, SiteHeartbeat] = {}
        self.sent: dict[str, int] = {}
        self.events: list[tuple[float, int, str, str, int]] = []
        self.order = itertools.count()
        self.jobs: list[Job] = []
        self.dispatched = self.moved = 0
        self.same_site = self.repeat_sessions = 0
        self.last_site: dict[int, str] = {}

    def schedule(self, at: float, kind: str, site_id: str = "", job: int = -1) -> None:
        heapq.heappush(self.events, (at, next(self.order), kind, site_id, job))

    def run(self) -> Simulation:
        for i, site_id in enumerate(self.sites):
            self.schedule(i * HEARTBEAT_S / len(self.sites), "beat", site_id)
        for i, (at, session) in enumerate(arrivals(self.seed)):
            body = {"messages": [{"role": "user", "content": "hi"}], "user": f"s{session}"}
            request = RunInference(
                request_id=str(i),
                user_id="u",
                username="u",
                model=MODEL,
                endpoint="chat.completions",
                body=json.dumps(body).encode(),
                created_at=at,
                expires_at=at + 3600,
            )
            self.jobs.append(Job(i, request, session))
            self.schedule(at, "arrive", job=i)
        while self.events:
            now, _, kind, site_id, index = heapq.heappop(self.events)
            if kind == "arrive":
                self.route(self.jobs[index], now)
            elif kind == "finish":
                self.finish(self.sites[site_id], self.jobs[index], now)
            elif kind == "beat":
                self.beat(self.sites[site_id], now)
            elif kind == "expire":
                self.move_away(self.sites[site_id], now)
        return self

    def beat(self, site: Site, now: float) -> None:
        if not site.alive:
            return
        self.beats[site.site_id] = site.heartbeat(now)
        self.sent[site.site_id] = 0  # as Registry.remember: the heartbeat reflects them
        if not all(job.done or job.failed for job in self.jobs):
            self.schedule(now + HEARTBEAT_S, "beat", site.site_id)

    def route(self, job: Job, now: float, *, moved: bool = False) -> None:
        chosen = choose_site(
            job.request,
            list(self.beats.values()),
            now,
            TTL_S,
            self.sent,
            policy=self.policy,
            state=self.state,
        )
        assert chosen is not None, "site a never dies"
        site = self.sites[chosen]
        assert now < site.last_beat + TTL_S, "dispatched to an expired site"
        if job.session in self.last_site:
            self.repeat_sessions += 1
            self.same_site += self.last_site[job.session] == chosen
        self.last_site[job.session] = chosen
        self.sent[chosen] = self.sent.get(chosen, 0) + 1
        job.site = chosen
        site.queue.append(job)
        self.start_queued(site, now)
        if moved:
            self.moved += 1
            return
        self.dispatched += 1
        if self.dispatched == DIES_AFTER:
            self.kill(self.sites[DYING], now)

    def start_queued(self, site: Site, now: float) -> None:
        site.advance(now)
        while site.alive and site.queue and len(site.running) < site.slots:
            job = site.queue.popleft()
            site.running[job.index] = job
            job.first_token_at = now + 1 / site.speed
            self.schedule(now + OUTPUT_TOKENS / site.speed, "finish", site.site_id, job.index)

    def finish(self, site: Site, job: Job, now: float) -> None:
        if job.index not in site.running:
            return  # the site died while it ran: kill() decided its fate
        site.advance(now)
        del site.running[job.index]
        job.done = True
        self.start_queued(site, now)

    def kill(self, site: Site, now: float) -> None:
        site.advance(now)
        site.alive = False
        unstarted = []
        for job in site.running.values():
            assert job.first_token_at is not None
            if job.first_token_at <= now:
                job.failed = True  # tokens reached the client: ended with an error record
            else:
                job.first_token_at = None
                unstarted.append(job)
        site.queue.extendleft(reversed(unstarted))
        site.running.clear()
        # The router learns of it only when the last heartbeat expires.
        self.schedule(site.last_beat + TTL_S + 1e-9, "expire", site.site_id)

    def move_away(self, site: Site, now: float) -> None:
        waiting, site.queue = list(site.queue), deque()
        for job in waiting:
            self.route(job, now, moved=True)


@dataclass(frozen=True)
class Result:
    policy: str
    completed: int
    failed: int
    moved: int
    good: int
    goodput: float
    p50_ttft_s: float
    p99_ttft_s: float
    same_site: float


def measure(sim: Simulation) -> Result:
    completed = [job for job in sim.jobs if job.done]
    ttfts = [job.first_token_at - job.request.created_at for job in completed if job.first_token_at]
    good = sum(ttft <= SLO_TTFT_S for ttft in ttfts)
    window = sim.jobs[-1].request.created_at - sim.jobs[0].request.created_at
    return Result(
        policy=sim.policy,
        completed=len(completed),
        failed=sum(job.failed for job in sim.jobs),
        moved=sim.moved,
        good=good,
        goodput=good / window,
        p50_ttft_s=statistics.median(ttfts),
        p99_ttft_s=statistics.quantiles(ttfts, n=100, method="inclusive")[98],
        same_site=sim.same_site / max(1, sim.repeat_sessions),
    )


@pytest.fixture(scope="module")
def runs() -> dict[Policy, Simulation]:
    return {policy: Simulation(policy).run() for policy in POLICIES}


@pytest.fixture(scope="module")
def results(runs: dict[Policy, Simulation]) -> dict[Policy, Result]:
    table = {policy: measure(sim) for policy, sim in runs.items()}
    print(f"\nseed {SEED}:")
    print(
        f"{'policy':<12} {'completed':>9} {'failed':>6} {'moved':>5} {'TTFT<=2s':>8} "
        f"{'goodput/s':>9} {'p50 TTFT':>9} {'p99 TTFT':>9} {'same site':>9}"
    )
    for r in table.values():
        print(
            f"{r.policy:<12} {r.completed:>9} {r.failed:>6} {r.moved:>5} {r.good:>8} "
            f"{r.goodput:>9.2f} {r.p50_ttft_s:>8.2f}s {r.p99_ttft_s:>8.2f}s "
            f"{100 * r.same_site:>8.1f}%"
        )
    return table


def test_every_request_completes_or_fails_exactly_once(runs: dict[Policy, Simulation]) -> None:
    for policy, sim in runs.items():
        assert all(job.done != job.failed for job in sim.jobs), policy
        assert not any(site.queue or site.running for site in sim.sites.values()), policy


def test_only_what_the_dead_site_had_started_is_lost(results: dict[Policy, Result]) -> None:
    for result in results.values():
        assert result.failed <= SPECS[DYING][0]
        assert result.completed + result.failed == REQUESTS


def test_first_beats_round_robin_on_goodput(results: dict[Policy, Result]) -> None:
    assert results["first"].goodput >= 1.25 * results["round_robin"].goodput


def test_first_beats_round_robin_on_p99_ttft(results: dict[Policy, Result]) -> None:
    assert results["first"].p99_ttft_s <= 0.1 * results["round_robin"].p99_ttft_s


def test_first_beats_random_as_well(results: dict[Policy, Result]) -> None:
    assert results["first"].goodput >= 1.25 * results["random"].goodput
    assert results["first"].p99_ttft_s <= 0.1 * results["random"].p99_ttft_s


def test_first_moves_less_work_off_the_dying_site(results: dict[Policy, Result]) -> None:
    # It ranks a site that missed a heartbeat last, long before the TTL expires it.
    assert results["first"].moved < results["round_robin"].moved / 2


def test_first_wins_for_other_seeds_too() -> None:
    print(f"\n{'seed':>4} {'goodput first/round_robin':>26} {'p99 TTFT first':>15} {'rr':>8}")
    for seed in range(1, 11):
        first = measure(Simulation("first", seed).run())
        baseline = measure(Simulation("round_robin", seed).run())
        ratio = first.goodput / baseline.goodput
        print(f"{seed:>4} {ratio:>26.2f} {first.p99_ttft_s:>14.2f}s {baseline.p99_ttft_s:>7.0f}s")
        assert ratio > 1.1, seed
        assert first.p99_ttft_s < 0.1 * baseline.p99_ttft_s, seed
