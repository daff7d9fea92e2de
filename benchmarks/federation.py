#!/usr/bin/env python
"""Issue 5's federation benchmark: our routing policy against round-robin and random.

The real router and three real site agents, each over one `first sim-vllm` instance:

  site A   8 slots at 40 tok/s per request   5.0    req/s of 64-token answers
  site B   4 slots at 20 tok/s               1.25   req/s
  site C   2 slots at 10 tok/s               0.3125 req/s   (total 6.5625 req/s)

Prompts count 64 tokens (the simulator's count: one per word, plus its chat overheads) and
every answer is 64 tokens (the simulator never stops early). Open-loop Poisson arrivals at 80 %
of the total capacity (5.25 req/s), 600 requests, seed 7; site B's agent is killed (SIGKILL)
right after 40 % of the requests were issued. The same scenario runs three times in one
invocation, each on a fresh stack (its own RabbitMQ vhost, redis-server and SQLite ledger;
the simulators are shared) with FIRST_ROUTER_POLICY = first, round_robin and random. All
three stop using a site whose heartbeats stopped for the site TTL, and the router's mover then
moves what waits in the dead site's queues to live ones.

Per policy it reports goodput (requests completed with TTFT <= 2 s, per second of the arrival
window), TTFT p50/p99 over every request issued, errors (HTTP errors, SSE error events) and lost
requests (no terminal event by 120 s after the last arrival, when the run ends by itself).

    .venv/bin/python benchmarks/federation.py [--quick | --requests N] [--seed 7] [--json FILE]

It starts a RabbitMQ node of its own (one per invocation, a vhost per run; `--shared-rabbit`
uses a vhost on the loopback RabbitMQ instead, like overhead.py) and needs rabbitmq-server and
redis-server installed: `scripts/test` installs both.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from benchmarks.overhead import (  # noqa: E402
    Client,
    CpuMeter,
    Stack,
    cpu_line,
    fmt,
    number,
    pct,
    run_benchmark,
    wait_gateway,
)
from services.access import apikeys  # noqa: E402
from services.devstack.client import Outcome, stream  # noqa: E402
from services.devstack.procs import Proc, ProcessGroup  # noqa: E402
from services.devstack.stack import StackConfig, service_port  # noqa: E402
from services.router.policy import POLICIES, Policy  # noqa: E402
from services.sim_vllm.parsing import CHAT_OVERHEAD, MESSAGE_OVERHEAD  # noqa: E402
from tests.faults.privates import PrivateRabbit, free_port, free_ports  # noqa: E402

MODEL: Final = "sim"  # what overhead.wait_gateway asks for
PROMPT_TOKENS: Final = 64
OUTPUT_TOKENS: Final = 64
CHAT_TOKENS: Final = CHAT_OVERHEAD + MESSAGE_OVERHEAD  # the simulator's count of a 1-message chat
LOAD: Final = 0.8  # of the total capacity
KILL_AT: Final = 0.4  # of the requests issued
KILLED: Final = "B"
GOOD_TTFT_S: Final = 2.0
BOUND_S: Final = 120.0
"""After the last arrival, how long requests may take to end; then the rest count as lost."""
FIRST_RECORD_TIMEOUT_S: Final = 60.0
"""The gateway's bound on a request's start (FIRST_GATEWAY_FIRST_RECORD_TIMEOUT_S, default 300
s): a request not started by then ends with a 504 `timeout` (an error), within BOUND_S."""
HTTP_TIMEOUT: Final = httpx.Timeout(FIRST_RECORD_TIMEOUT_S + 30.0, connect=10.0)
CLIENTS: Final = 8  # httpx clients the requests take turns on (one client's pool gets slow)
FULL_REQUESTS: Final = 600
QUICK_REQUESTS: Final = 120


@dataclass(frozen=True)
class Site:
    """One site of the scenario: a simulator and the agent in front of it."""

    site_id: str
    slots: int
    tokens_per_s: float

    @property
    def capacity_rps(self) -> float:
        """Requests per second it completes when every slot is busy."""
        return self.slots * self.tokens_per_s / OUTPUT_TOKENS


SITES: Final = (Site("A", 8, 40.0), Site("B", 4, 20.0), Site("C", 2, 10.0))
CAPACITY_RPS: Final = sum(s.capacity_rps for s in SITES)


def arrivals(requests: int, seed: int) -> list[float]:
    """Poisson arrival offsets (s) at LOAD x capacity; the first at 0."""
    rng = random.Random(seed)
    rate = LOAD * CAPACITY_RPS
    offsets = [0.0]
    for _ in range(requests - 1):
        offsets.append(offsets[-1] + rng.expovariate(rate))
    return offsets


def chat_body(index: int) -> dict[str, Any]:
    """A streamed chat request whose prompt the simulator counts as PROMPT_TOKENS tokens."""
    words = [f"r{index}"] + ["token"] * (PROMPT_TOKENS - CHAT_TOKENS - 1)
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": " ".join(words)}],
        "max_tokens": OUTPUT_TOKENS,
        "stream": True,
    }


# ---------------------------------------------------------------- the processes


class Sims:
    """The three simulators, started once and shared by the runs."""

    def __init__(self, workdir: Path, sites: tuple[Site, ...] = SITES) -> None:
        self.sites = sites
        self.group = ProcessGroup(workdir / "sim-logs")
        self.urls: dict[str, str] = {}
        self.procs: dict[str, Proc] = {}

    def start(self) -> None:
        for site in self.sites:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = dict(os.environ) | {"FIRST_SIM_VLLM_LOG_LEVEL": "WARNING"}
            argv = [
                sys.executable, "-m", "services.sim_vllm", "--model", MODEL, "--port", str(port),
                "--slots", str(site.slots), "--tokens-per-s", str(site.tokens_per_s),
            ]  # fmt: skip
            self.procs[site.site_id] = self.group.start(
                f"sim-{site.site_id}", argv, env, f"{url}/health"
            )
            self.urls[site.site_id] = url
        for proc in self.procs.values():
            self.group.wait_ready(proc, 60)

    async def stats(self) -> dict[str, dict[str, Any]]:
        """Each simulator's GET /sim/stats."""
        async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
            return {s: (await http.get(f"{u}/sim/stats")).json() for s, u in self.urls.items()}


def rabbitmqctl(node: PrivateRabbit, *args: str) -> None:
    """Run one rabbitmqctl command against the private node (bounded)."""
    subprocess.run(
        ["rabbitmqctl", "-n", node.node, *args],
        env=node._env(),  # the node's own environment (tests/faults/privates.py)
        check=True,
        capture_output=True,
        timeout=60,
    )


def node_pid(node: PrivateRabbit) -> int | None:
    """The private node's OS pid (for the CPU figures), None if unknown."""
    try:
        return int((node.dir / "rabbit.pid").read_text().strip())
    except (OSError, ValueError):
        return None


class FederationStack(Stack):
    """overhead.py's stack (private Redis, fresh vhost, SQLite ledger) with three site agents."""

    def __init__(
        self,
        workdir: Path,
        sims: Sims,
        policy: Policy,
        env: dict[str, str],
        node: PrivateRabbit | None,
        *,
        batch_worker: bool = False,
    ) -> None:
        super().__init__(workdir)
        self.sites = sims.sites
        self.batch_worker = batch_worker
        self.sims = sims
        self.policy = policy
        self.env = env
        self.node = node
        if node is not None:
            self.rabbit_url = f"{node.url.rstrip('/')}/{self.vhost}"
        # All at once: ports taken one by one may repeat (a collision left a service unbound).
        ports = free_ports(len(self.sites) + 4)
        self._ports = ports[len(self.sites) :]  # gateway, router, accounting, batch worker
        self.agent_ports = {
            site.site_id: port for site, port in zip(self.sites, ports, strict=False)
        }
        self.database = workdir / "first.db"

    async def start(self) -> None:
        if self.node is None:
            self.check_infrastructure()
        elif shutil.which("redis-server") is None:
            raise SystemExit("redis-server is not installed; run scripts/test (it installs it).")
        self.redis.start()
        self.make_vhost()
        database_url = f"sqlite+aiosqlite:///{self.database}"
        self.config = StackConfig(
            rabbit_url=self.rabbit_url,
            redis_url=self.redis.url,
            database_url=database_url,
            backends={},
            gateway_port=self._ports[0],
            router_port=self._ports[1],
            accounting_port=self._ports[2],
            batch_worker_port=self._ports[3],
            files_dir=str(self.workdir / "files"),
            extra_env={
                "FIRST_ACCESS_MODELS": json.dumps([{"name": MODEL}]),
                "FIRST_GATEWAY_FIRST_RECORD_TIMEOUT_S": str(FIRST_RECORD_TIMEOUT_S),
                "FIRST_ROUTER_POLICY": self.policy,
                "FIRST_LOG_LEVEL": "WARNING",
                **self.env,
            },
            # The router's timeline (expiry, moves) is at INFO; FIRST_BENCH_ROUTER_LOG=DEBUG
            # adds each batch line's dispatch with its user's fair-share counter.
            service_env={
                "router": {"FIRST_LOG_LEVEL": os.environ.get("FIRST_BENCH_ROUTER_LOG", "INFO")}
            },
        )
        self.api_key = await apikeys.issue_key(database_url, "bench")
        for name in ("accounting", "router", "gateway"):
            self.procs[name] = self._start(
                name, name, service_port(self.config, name), self.config.service_env.get(name, {})
            )
        if self.batch_worker:
            self.procs["batch_worker"] = self._start(
                "batch_worker", "gateway.batch_service", self.config.batch_worker_port, {}
            )
        for site in self.sites:
            port = self.agent_ports[site.site_id]
            self.procs[f"agent-{site.site_id}"] = self._start(
                f"agent-{site.site_id}",
                "site_agent",
                port,
                {
                    "FIRST_SITE_AGENT_SITE_ID": site.site_id,
                    "FIRST_SITE_AGENT_BACKENDS": json.dumps(
                        {MODEL: [self.sims.urls[site.site_id]]}
                    ),
                    "FIRST_SITE_AGENT_PORT": str(port),
                    "FIRST_SITE_AGENT_MAX_CONCURRENCY_PER_INSTANCE": str(site.slots),
                },
            )
        for proc in list(self.procs.values()):  # all start at once; then each must be ready
            self.group.wait_ready(proc, 90)
        await self.wait_sites()

    def make_vhost(self) -> None:
        """On the private node with rabbitmqctl (the vhost goes with the node); else
        overhead.py's, through the management API."""
        if self.node is None:
            super().make_vhost()
            return
        self.rabbit_pid = node_pid(self.node)
        rabbitmqctl(self.node, "add_vhost", self.vhost)
        rabbitmqctl(self.node, "set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")

    def _start(self, name: str, module: str, port: int, env: dict[str, str]) -> Proc:
        """Start `python -m services.<module>` as `name` (devstack's start_service, unwaited)."""
        assert self.config is not None
        argv = [sys.executable, "-m", f"services.{module}"]
        ready = f"http://127.0.0.1:{port}/ready"
        return self.group.start(name, argv, self.config.env() | env, ready)

    @property
    def router_url(self) -> str:
        assert self.config is not None
        return f"http://127.0.0.1:{self.config.router_port}"

    async def wait_sites(self, within_s: float = 60.0) -> None:
        """Wait (bounded) until the router holds a hot heartbeat of every site."""
        deadline = time.monotonic() + within_s
        hot: set[str] = set()
        async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
            while time.monotonic() < deadline:
                sites = (await http.get(f"{self.router_url}/sites")).json()["sites"]
                hot = {
                    s["site_id"]
                    for s in sites
                    if any(m["model"] == MODEL and m["state"] == "hot" for m in s["models"])
                }
                if hot == {site.site_id for site in self.sites}:
                    return
                await asyncio.sleep(0.5)
        raise RuntimeError(f"the router sees only sites {sorted(hot)} hot after {within_s:.0f}s")

    def kill_agent(self, site_id: str) -> None:
        """SIGKILL one site's agent (our child, in its own session) and forget it."""
        proc = self.procs.pop(f"agent-{site_id}")
        os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(10)
        self.group.stop(proc)  # only removes it from the group: it is gone

    async def router_metrics(self) -> dict[str, float]:
        """The router's counters this benchmark reads: by site for the routed ones, else summed
        over their labels."""
        wanted = (
            "first_router_requests_routed_total",
            "first_router_requests_moved_total",
            "first_router_queue_wait_seconds_sum",
            "first_router_queue_wait_seconds_count",
        )
        async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
            text = (await http.get(f"{self.router_url}/metrics")).text
        values: dict[str, float] = collections.defaultdict(float)
        for line in text.splitlines():
            if not line.startswith(wanted):
                continue
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            if name == wanted[0]:
                name = "routed:" + labels.split('site="')[1].split('"')[0]
            values[name] += float(value)
        return dict(values)

    def router_timeline(self) -> list[tuple[float, str]]:
        """(epoch s, message) of the router's site-expiry and move log lines."""
        events = []
        log = self.workdir / "logs" / "router.log"
        for line in log.read_text(errors="replace").splitlines():
            if "expired" in line or "moved" in line or "dead site" in line:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                events.append((float(record["ts"]), str(record["msg"])))
        return events

    async def ledger(
        self, since: float, expected: int, within_s: float = 20.0
    ) -> dict[str, tuple[str, str]]:
        """request_id -> (site_id, outcome) of the requests created from `since` (epoch s),
        once the ledger holds `expected` of them or stopped growing for 3 s (at most
        `within_s`): what the site agents still settle after the clients ended."""
        deadline = time.monotonic() + within_s
        rows: dict[str, tuple[str, str]] = {}
        stable_since = time.monotonic()
        query = "SELECT request_id, site_id, outcome FROM usage_ledger WHERE created_at >= ?"
        while time.monotonic() < deadline:
            with contextlib.closing(sqlite3.connect(self.database, timeout=5)) as db:
                now = {r: (s, o) for r, s, o in db.execute(query, (since,)).fetchall()}
            if len(now) != len(rows):
                stable_since = time.monotonic()
            rows = now
            if len(rows) >= expected or time.monotonic() - stable_since > 3:
                break
            await asyncio.sleep(0.5)
        return rows


# ---------------------------------------------------------------- the load


@dataclass
class Sent:
    """One request of the run and what its client saw (None: no end by the bound)."""

    index: int
    due: float
    """Its arrival, s after the first."""
    started: float = 0.0
    outcome: Outcome | None = None

    def ttft_or_wait(self, bound: float) -> float:
        """Its TTFT (s); with no token, how long it waited until it ended (or the bound)."""
        out = self.outcome
        if out is not None and out.ttft is not None:
            return out.ttft
        return (bound if out is None else out.ended) - self.started

    @property
    def completed(self) -> bool:
        out = self.outcome
        return out is not None and out.completed and out.content_chunks == OUTPUT_TOKENS

    @property
    def good(self) -> bool:
        out = self.outcome
        ttft = None if out is None else out.ttft
        return self.completed and ttft is not None and ttft <= GOOD_TTFT_S

    def error(self) -> str | None:
        """Why it failed, if it ended and is not complete."""
        out = self.outcome
        if out is None or self.completed:
            return None
        if out.error is not None:
            return str(out.error.get("code") or out.error.get("type") or "error")
        if out.exception is not None:
            return out.exception.split(":", 1)[0]
        if out.status != 200:
            return f"HTTP {out.status}"
        if not out.done:
            return "closed without [DONE]"
        return f"{out.content_chunks} of {OUTPUT_TOKENS} tokens"


@dataclass
class Load:
    """The run's requests and its clock (perf_counter)."""

    sent: list[Sent]
    t0: float = 0.0
    t0_epoch: float = 0.0
    killed_at: float = 0.0
    killed_epoch: float = 0.0
    bound: float = 0.0
    late_s: list[float] = field(default_factory=list)
    """Per request, how far behind its arrival time the client was when it came to issue it."""


async def drive(stack: FederationStack, offsets: list[float]) -> Load:
    """Issue the requests at their arrival times, kill site B's agent after KILL_AT of them,
    and wait until each ended or BOUND_S after the last arrival."""
    headers = {"authorization": f"Bearer {stack.api_key}"}
    url = f"{stack.gateway_url}/v1/chat/completions"
    kill_after = max(1, round(KILL_AT * len(offsets)))
    load = Load(sent=[Sent(i, due) for i, due in enumerate(offsets)])
    limits = httpx.Limits(max_connections=len(offsets), max_keepalive_connections=32)
    clients = [
        httpx.AsyncClient(timeout=HTTP_TIMEOUT, limits=limits, trust_env=False)
        for _ in range(CLIENTS)
    ]

    async def one(item: Sent) -> None:
        item.started = time.perf_counter()
        http = clients[item.index % CLIENTS]
        item.outcome = await stream(http, url, chat_body(item.index), headers)

    tasks = []
    try:
        load.t0, load.t0_epoch = time.perf_counter(), time.time()
        for item in load.sent:
            delay = load.t0 + item.due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            load.late_s.append(max(0.0, -delay))
            tasks.append(asyncio.create_task(one(item)))
            if item.index + 1 == kill_after:
                stack.kill_agent(KILLED)
                load.killed_at, load.killed_epoch = time.perf_counter(), time.time()
        load.bound = load.t0 + offsets[-1] + BOUND_S
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, load.bound - time.perf_counter()))
        for task in pending:  # their requests are lost
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise RuntimeError("a client task failed") from task.exception()
    finally:
        for task in tasks:
            task.cancel()
        for http in clients:
            await http.aclose()
    return load


# ---------------------------------------------------------------- one run


async def run_policy(
    policy: Policy,
    sims: Sims,
    root: Path,
    offsets: list[float],
    env: dict[str, str],
    node: PrivateRabbit | None,
) -> dict[str, Any]:
    """Run the scenario once on a fresh stack with `policy`; return its summary."""
    workdir = root / policy
    workdir.mkdir()
    stack = FederationStack(workdir, sims, policy, env, node)
    began = time.monotonic()
    try:
        await stack.start()
        client = Client({"authorization": f"Bearer {stack.api_key}"})
        await wait_gateway(client, stack)
        ready_s = time.monotonic() - began
        meter = CpuMeter()
        for name, proc in stack.procs.items():
            meter.pids[name] = proc.popen.pid
        for site_id, proc in sims.procs.items():
            meter.pids[f"sim-{site_id}"] = proc.popen.pid
        if stack.redis.proc is not None:
            meter.pids["redis"] = stack.redis.proc.pid
        if stack.rabbit_pid:
            meter.pids["rabbit"] = stack.rabbit_pid
        sims_before, counters_before = await sims.stats(), await stack.router_metrics()
        snap = meter.snapshot()
        print(f"  [{policy}] stack ready in {ready_s:.0f}s; {len(offsets)} requests over "
              f"{offsets[-1]:.0f}s", flush=True)  # fmt: skip
        load = await drive(stack, offsets)
        cpu = meter.cores(snap, meter.snapshot())
        if (dead := stack.dead()) is not None:
            raise RuntimeError(dead)
        sims_after = await sims.stats()
        counters = {
            k: v - counters_before.get(k, 0.0) for k, v in (await stack.router_metrics()).items()
        }
        ledger = await stack.ledger(load.t0_epoch, len(offsets))  # not the warm-up request
        timeline = stack.router_timeline()
        result = summarize(load, ledger, counters, timeline)
        result["sim_started"] = {
            s: sims_after[s]["started"] - sims_before[s]["started"] for s in sims.urls
        }
        result["cpu_cores"] = {k: round(v, 2) for k, v in cpu.items()}
        result["run_s"] = round(time.monotonic() - began, 1)
        print(f"  [{policy}] done in {result['run_s']:.0f}s; {cpu_line(cpu)}", flush=True)
        return result
    except BaseException:
        print(f"  [{policy}] failed; logs kept in {workdir / 'logs'}", file=sys.stderr)
        root.joinpath("keep").touch()
        raise
    finally:
        stack.stop()


BIN_S: Final = 10.0


def summarize(
    load: Load,
    ledger: dict[str, tuple[str, str]],
    counters: dict[str, float],
    timeline: list[tuple[float, str]],
) -> dict[str, Any]:
    """The numbers of one run (times in ms unless named _s)."""
    sent = load.sent
    window = sent[-1].due - sent[0].due
    kill_due = load.killed_at - load.t0
    ttft = [s.ttft_or_wait(load.bound) * 1000 for s in sent]
    errors = collections.Counter(e for s in sent if (e := s.error()) is not None)
    good_before = sum(1 for s in sent if s.good and s.due < kill_due)
    good_after = sum(1 for s in sent if s.good and s.due >= kill_due)
    waits = counters.get("first_router_queue_wait_seconds_count", 0.0)
    dispatch_s = counters.get("first_router_queue_wait_seconds_sum", 0.0) / waits if waits else 0
    return {
        "requests": len(sent),
        "completed": sum(1 for s in sent if s.completed),
        "good": good_before + good_after,
        "errors": sum(errors.values()),
        "lost": sum(1 for s in sent if s.outcome is None),
        "goodput_rps": number((good_before + good_after) / window),
        "ttft_p50_ms": number(pct(ttft, 50)),
        "ttft_p99_ms": number(pct(ttft, 99)),
        "goodput_before_kill_rps": number(good_before / max(kill_due, 1e-9)),
        "goodput_after_kill_rps": number(good_after / max(window - kill_due, 1e-9)),
        "error_codes": dict(errors.most_common()),
        "window_s": round(window, 2),
        "kill_at_s": round(kill_due, 2),
        "issue_late_ms_max": number(1000 * max(load.late_s, default=0.0)),
        "routed": {k.split(":", 1)[1]: int(v) for k, v in sorted(counters.items()) if ":" in k},
        "moved": int(counters.get("first_router_requests_moved_total", 0)),
        "router_dispatch_ms_mean": number(1000 * dispatch_s if waits else math.nan),
        "served_by": by_site(sent, ttft, ledger),
        "ledger_rows": len(ledger),
        "ledger_outcomes": dict(collections.Counter(o for _, o in ledger.values()).most_common()),
        "by_arrival_10s": by_window(sent, ttft),
        "timeline_s": [(round(ts - load.killed_epoch, 1), msg) for ts, msg in timeline],
    }


def by_site(
    sent: list[Sent], ttft: list[float], ledger: dict[str, tuple[str, str]]
) -> dict[str, dict[str, Any]]:
    """Requests and their TTFT by the site the ledger bills them to (the last that had them)."""
    found: dict[str, list[float]] = collections.defaultdict(list)
    for item, wait_ms in zip(sent, ttft, strict=True):
        rid = item.outcome.request_id if item.outcome else None
        site = "no request id" if rid is None else ledger.get(rid, ("no ledger row", ""))[0]
        found[site].append(wait_ms)
    return {
        site: {"n": len(v), "ttft_p50_ms": number(pct(v, 50)), "ttft_p99_ms": number(pct(v, 99))}
        for site, v in sorted(found.items())
    }


def by_window(sent: list[Sent], ttft: list[float]) -> list[dict[str, Any]]:
    """Per BIN_S of arrivals: requests, good ones, TTFT p50."""
    bins: dict[int, list[tuple[bool, float]]] = collections.defaultdict(list)
    for item, wait_ms in zip(sent, ttft, strict=True):
        bins[int(item.due // BIN_S)].append((item.good, wait_ms))
    return [
        {
            "from_s": k * BIN_S,
            "n": len(v),
            "good": sum(g for g, _ in v),
            "ttft_p50_ms": number(pct([t for _, t in v], 50)),
        }
        for k, v in sorted(bins.items())
    ]


# ---------------------------------------------------------------- the report


def report(results: dict[str, dict[str, Any]], requests: int, seed: int) -> None:
    w = 100
    base = results.get("round_robin")
    print("\n" + "=" * w)
    print(
        f"FIRST federation: {requests} requests, Poisson at {LOAD:.0%} of "
        f"{CAPACITY_RPS:g} req/s, seed {seed}; site {KILLED}'s agent killed after "
        f"{KILL_AT:.0%} of them"
    )
    print("=" * w)
    print(
        f"{'policy':<12}{'completed':>10}{'errors':>8}{'lost':>6}{'goodput/s':>11}"
        f"{'TTFT p50':>10}{'TTFT p99':>10}{'goodput×rr':>12}{'p99÷rr':>9}"
    )
    for policy, r in results.items():
        ratio = p99_ratio = math.nan
        if base is not None and base["goodput_rps"]:
            ratio = r["goodput_rps"] / base["goodput_rps"]
        if base is not None and base["ttft_p99_ms"]:
            p99_ratio = r["ttft_p99_ms"] / base["ttft_p99_ms"]
        print(
            f"{policy:<12}{r['completed']:>10}{r['errors']:>8}{r['lost']:>6}"
            f"{fmt(r['goodput_rps'], 3):>11}{fmt(r['ttft_p50_ms'], 0):>10}"
            f"{fmt(r['ttft_p99_ms'], 0):>10}{fmt(ratio):>12}{fmt(p99_ratio):>9}"
        )
    print("-" * w)
    print(
        f"goodput: requests completed with TTFT <= {GOOD_TTFT_S:g} s / arrival window (first to "
        "last arrival); TTFT over every request, one without a token counted as its wait until "
        "it ended; ms"
    )
    for policy, r in results.items():
        print(f"{policy}:")
        print(
            f"  goodput before / after the kill {fmt(r['goodput_before_kill_rps'], 3)} / "
            f"{fmt(r['goodput_after_kill_rps'], 3)} req/s (kill at {r['kill_at_s']:.1f}s of "
            f"{r['window_s']:.1f}s); errors {r['error_codes'] or '{}'}"
        )
        print(
            f"  routed {r['routed']}, moved {r['moved']}, router dispatch mean "
            f"{fmt(r['router_dispatch_ms_mean'])} ms; simulators started {r['sim_started']}; "
            f"latest issue {fmt(r['issue_late_ms_max'], 1)} ms late"
        )
        served = ", ".join(
            f"{s}: {v['n']} (p50 {fmt(v['ttft_p50_ms'], 0)}, p99 {fmt(v['ttft_p99_ms'], 0)})"
            for s, v in r["served_by"].items()
        )
        print(f"  by ledger site (n, TTFT ms): {served}")
        print(f"  ledger: {r['ledger_rows']} rows, {r['ledger_outcomes']}")
        bins = " ".join(
            f"{b['good']}/{b['n']}@{fmt(b['ttft_p50_ms'], 0)}" for b in r["by_arrival_10s"]
        )
        print(f"  per {BIN_S:g} s of arrivals, good/n@TTFT p50: {bins}")
        for at, msg in r["timeline_s"][:6]:
            print(f"  router, kill{at:+.1f}s: {msg}")
    if base is not None and "first" in results:
        first = results["first"]
        goals = [
            ("goodput >= 1.5 x round_robin", first["goodput_rps"] >= 1.5 * base["goodput_rps"]),
            ("TTFT p99 <= 0.5 x round_robin", first["ttft_p99_ms"] <= 0.5 * base["ttft_p99_ms"]),
            ("0 lost", first["lost"] == 0),
        ]
        print("-" * w)
        for label, met in goals:
            print(f"  {label:34}{'met' if met else 'MISSED'}")


# ---------------------------------------------------------------- main


async def run(
    policies: list[Policy], requests: int, seed: int, env: dict[str, str], shared_rabbit: bool
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="first-federation-"))
    sims = Sims(root)
    node = None if shared_rabbit else PrivateRabbit()
    offsets = arrivals(requests, seed)
    env = {"FIRST_ROUTER_POLICY_SEED": str(seed), **env}  # the random baseline, reproducible
    began = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    try:
        print(f"starting 3 simulators{'' if node is None else ' and a RabbitMQ node'}; logs "
              f"under {root}", flush=True)  # fmt: skip
        sims.start()
        if node is not None:
            node.start()
        for policy in policies:
            results[policy] = await run_policy(policy, sims, root, offsets, env, node)
    finally:
        sims.group.stop_all()
        if node is not None:
            node.remove()
        if not root.joinpath("keep").exists():
            shutil.rmtree(root, ignore_errors=True)
    report(results, requests, seed)
    print(f"\ntotal {time.monotonic() - began:.0f}s")
    return {
        "scenario": {
            "requests": requests,
            "seed": seed,
            "arrival_rps": LOAD * CAPACITY_RPS,
            "capacity_rps": CAPACITY_RPS,
            "killed": KILLED,
            "kill_after": KILL_AT,
            "good_ttft_s": GOOD_TTFT_S,
            "bound_s": BOUND_S,
            "env": env,
            "rabbitmq": "shared" if shared_rabbit else "private node",
        },
        "policies": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=FULL_REQUESTS, help="default 600")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_REQUESTS} requests (about a fifth)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    parser.add_argument(
        "--policies", default=",".join(POLICIES), help="comma-separated, default all three"
    )
    parser.add_argument(
        "--site-ttl-s",
        type=float,
        metavar="S",
        help="site TTL and agents' claim TTL (default: the services' 15 s), sweep every S/3, "
        "heartbeat every S/4: for smoke tests, not for measurements",
    )
    parser.add_argument(
        "--shared-rabbit",
        action="store_true",
        help="a fresh vhost on the RabbitMQ of scripts/test (FIRST_BENCH_RABBIT_URL/_API) "
        "instead of a RabbitMQ node of the benchmark's own",
    )
    args = parser.parse_args()
    requests = QUICK_REQUESTS if args.quick else args.requests
    if requests < 3:
        parser.error("--requests must be at least 3")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if unknown := set(policies) - set(POLICIES):
        parser.error(f"unknown policies {sorted(unknown)}; choose from {', '.join(POLICIES)}")
    env: dict[str, str] = {}
    if args.site_ttl_s is not None:
        env = {
            "FIRST_SITE_TTL_S": str(args.site_ttl_s),
            "FIRST_ROUTER_SWEEP_INTERVAL_S": str(args.site_ttl_s / 3),
            "FIRST_SITE_AGENT_CLAIM_TTL_S": str(args.site_ttl_s),
            "FIRST_SITE_AGENT_HEARTBEAT_INTERVAL_S": str(args.site_ttl_s / 4),
        }
    run_benchmark(run(policies, requests, args.seed, env, args.shared_rabbit), args.json)


if __name__ == "__main__":
    main()
