#!/usr/bin/env python
"""What the whole FIRST path adds over `first sim-vllm`, with this machine's floors beside it.

One run, one client (services/devstack/client.py's `stream()` and the same httpx client for
non-streamed requests), straight at the simulator and through the whole path (gateway ->
RabbitMQ -> router -> site agent -> sim -> Redis stream -> gateway):

  floors      a bare FastAPI endpoint's req/s (1 uvicorn worker, same client, 64 connections);
              one confirmed persistent publish to a quorum queue (aio-pika, sequential);
              XADD -> blocked XREAD wake-up (two connections, same process)
  c=1         sequential streams of 64 tokens (sim 200 tok/s, TTFT 20 ms), direct and gateway
              alternating: TTFT added and inter-token latency added (p50/p99 of each side)
  c=16        16 concurrent streams of 64 tokens at 50 tok/s: TTFT added p50/p99
  capacity    non-streamed `max_tokens: 1`, 64 closed-loop clients: req/s direct vs gateway;
              relay: ramp concurrent streams (256 tokens at 200 tok/s each; the ramp stops
              after two failing steps) and report the highest aggregate chunks/s received
              in a step whose TTFT p99 < 100 ms

Before each measured phase it waits (bounded) until the previous one's work has drained, and
after each it prints the CPU each process used (cores), so a latency run at saturation shows.

It starts what it needs (two sims, accounting, router, site agent, gateway as
`python -m services.<name>`, a private redis-server, a fresh RabbitMQ vhost that is deleted at
the end) and expects RabbitMQ (with the management API) on loopback: `scripts/test` starts it.

    .venv/bin/python benchmarks/overhead.py [--quick] [--json FILE] [--profile DIR]

Everything is bounded: each request has a timeout, each phase a duration cap.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402

from services.access import apikeys  # noqa: E402
from services.devstack.client import Outcome, stream  # noqa: E402
from services.devstack.procs import Proc, ProcessGroup, StartupError  # noqa: E402
from services.devstack.stack import StackConfig, start_service  # noqa: E402
from tests.faults.privates import PrivateRedis, free_port  # noqa: E402

RABBIT_URL = os.environ.get("FIRST_BENCH_RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/")
RABBIT_API = os.environ.get("FIRST_BENCH_RABBIT_API", "http://127.0.0.1:15672/api")

FAST, SLOW = "sim", "sim50"  # served model names: 200 tok/s and 50 tok/s, both TTFT 20 ms
SIMS = {FAST: {"tokens_per_s": 200, "ttft_ms": 20}, SLOW: {"tokens_per_s": 50, "ttft_ms": 20}}
T = TypeVar("T")
REQUEST_TIMEOUT_S = 30.0  # httpx per-operation timeout
REQUEST_CAP_S = 60.0  # whole request (a stream included)
PHASE_SLACK_S = REQUEST_CAP_S + 10.0  # a phase's cap = its planned duration + this
RELAY_TTFT_P99_MS = 100.0
SERVICES = ("accounting", "router", "site_agent", "gateway")
PROFILED = ("gateway", "router", "site_agent", "accounting")
PROFILED_RELAY_STEP = 32  # streams (6400 chunks/s offered, above the 5000 target)

TARGETS = {  # the issue's targets
    "ttft_c1_p50": 3.0,
    "ttft_c1_p99": 10.0,
    "ttft_c16_p50": 5.0,
    "ttft_c16_p99": 25.0,
    "itl_p50": 0.5,
    "rps_gateway": 500.0,
    "relay_chunks_per_s": 5000.0,
}


@dataclass(frozen=True)
class Plan:
    """How much of each phase to run."""

    fastapi_s: float
    confirms: int
    wakes: int
    c1_pairs: int
    c16_s: float
    capacity_s: float
    relay_steps: tuple[int, ...]
    relay_s: float
    warmup_s: float


FULL = Plan(
    fastapi_s=8, confirms=2000, wakes=3000, c1_pairs=150, c16_s=20, capacity_s=10,
    relay_steps=(8, 16, 24, 32, 48, 64, 128, 256), relay_s=10, warmup_s=2,
)  # fmt: skip
QUICK = Plan(
    fastapi_s=2, confirms=200, wakes=300, c1_pairs=12, c16_s=4, capacity_s=3,
    relay_steps=(8, 32), relay_s=3, warmup_s=1,
)  # fmt: skip


# ---------------------------------------------------------------- statistics


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def ms(seconds: list[float]) -> list[float]:
    return [s * 1000 for s in seconds]


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def number(value: float) -> float | None:
    """A JSON number, or null when the phase produced no sample."""
    return None if math.isnan(value) else round(value, 4)


# ---------------------------------------------------------------- CPU of the processes


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    return total - values[3] - values[4], total


class CpuMeter:
    """Samples the CPU of named processes between two points in time."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {"client": os.getpid()}

    def snapshot(self) -> tuple[float, dict[str, float | None], tuple[float, float]]:
        return time.monotonic(), {n: cpu_seconds(p) for n, p in self.pids.items()}, machine_busy()

    def cores(self, start: Any, end: Any) -> dict[str, float]:
        """Cores used by each process (and `machine`) between two snapshots."""
        (t0, a, (b0, tot0)), (t1, b, (b1, tot1)) = start, end
        wall = max(t1 - t0, 1e-6)
        used = {
            name: (b[name] - a[name]) / wall
            for name in b
            if a.get(name) is not None and b[name] is not None
        }
        ncpu = os.cpu_count() or 1
        used["machine"] = ncpu * (b1 - b0) / max(tot1 - tot0, 1)
        return used


QUIET_CORES = 0.15  # our processes (not the shared RabbitMQ) are idle below this


async def settle(meter: CpuMeter, within_s: float = 15.0) -> None:
    """Wait (bounded) until the previous phase's work has drained, e.g. usage events."""
    deadline = time.monotonic() + within_s
    while True:
        start = meter.snapshot()
        await asyncio.sleep(0.5)
        used = meter.cores(start, meter.snapshot())
        busy = sum(v for n, v in used.items() if n not in ("client", "machine", "rabbit"))
        if busy < QUIET_CORES:
            return
        if time.monotonic() > deadline:
            print(f"  (not settled after {within_s:.0f}s: the stack still uses {busy:.2f} cores)")
            return


def cpu_line(used: dict[str, float]) -> str:
    parts = [f"{n} {v:.2f}" for n, v in used.items() if n != "machine" and v >= 0.005]
    return f"cpu cores: {', '.join(parts)} | machine {used['machine']:.2f}/{os.cpu_count()}"


# ---------------------------------------------------------------- the client side


@dataclass
class Tally:
    """Every request the run sent, and those that failed (with the first reasons)."""

    requests: int = 0
    errors: int = 0
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)

    def fail(self, reason: str) -> None:
        self.errors += 1
        self.reasons[reason[:160]] += 1


@dataclass
class Reply:
    """One non-streamed request."""

    started: float
    ended: float
    ok: bool


class Client:
    """The same httpx client code for both sides of every comparison.

    Each closed-loop worker gets an httpx.AsyncClient of its own (`session()`): one client
    shared by 64+ concurrent requests spends milliseconds of CPU per request scanning its
    connection pool, which would make the load generator the bottleneck.
    """

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers
        self.tally = Tally()

    def session(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
        return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)

    async def stream(
        self, http: httpx.AsyncClient, url: str, model: str, max_tokens: int
    ) -> Outcome:
        """One streamed chat completion; an error unless all `max_tokens` chunks came."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "benchmark"}],
            "max_tokens": max_tokens,
            "stream": True,
        }
        self.tally.requests += 1
        started = time.perf_counter()
        try:
            out = await asyncio.wait_for(stream(http, url, body, self.headers), REQUEST_CAP_S)
        except TimeoutError:
            out = Outcome(started=started, ended=time.perf_counter(), exception="request cap")
        if not out.completed or out.content_chunks != max_tokens:
            reason = out.exception or (out.error or {}).get("message") or f"status {out.status}"
            self.tally.fail(f"stream {model}: {reason} ({out.content_chunks} chunks)")
        return out

    async def post(self, http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Reply:
        """One non-streamed request; its JSON is decoded like a real client would."""
        self.tally.requests += 1
        started = time.perf_counter()
        ok, reason = False, ""
        try:
            response = await asyncio.wait_for(
                http.post(url, json=body, headers=self.headers), REQUEST_CAP_S
            )
            response.json()
            ok = response.status_code == 200
            reason = f"status {response.status_code}: {response.text[:100]}"
        except (httpx.HTTPError, ValueError, TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if not ok:
            self.tally.fail(f"POST {urllib.parse.urlsplit(url).path}: {reason}")
        return Reply(started, time.perf_counter(), ok)


async def closed_loop(
    workers: int,
    duration_s: float,
    client: Client,
    one: Callable[[httpx.AsyncClient], Awaitable[T]],
    stagger_s: float = 0.0,
) -> tuple[float, float, list[tuple[float, T]]]:
    """Run `workers` clients back to back for `duration_s`; return (start, end, results).

    Worker i (with its own httpx client) starts after i * stagger_s / workers; no request
    starts after the end. The phase is capped at its duration + PHASE_SLACK_S; stragglers are
    then cancelled and the phase fails.
    """
    results: list[tuple[float, T]] = []
    start = time.perf_counter()
    end = start + duration_s

    async def worker(i: int) -> None:
        await asyncio.sleep(i * stagger_s / workers)
        async with client.session() as http:
            while (now := time.perf_counter()) < end:
                results.append((now, await one(http)))

    tasks = [asyncio.create_task(worker(i)) for i in range(workers)]
    done, pending = await asyncio.wait(tasks, timeout=duration_s + PHASE_SLACK_S)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        raise RuntimeError(f"{len(pending)} clients still running after the phase cap")
    for task in done:
        task.result()
    return start, end, results


# ---------------------------------------------------------------- the stack


def bare_app_main(port: int) -> None:
    """The floor: a trivial FastAPI app in one uvicorn worker (run as a child process)."""
    import uvicorn

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        await request.body()
        return {"id": "x", "object": "chat.completion", "choices": [], "usage": None}

    uvicorn.run(
        app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
        access_log=False, log_level="warning", workers=1,
    )  # fmt: skip


class Stack:
    """Sims, services, a private Redis and a fresh vhost; stopped in reverse on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.group = ProcessGroup(workdir / "logs")
        self.redis = PrivateRedis(workdir)
        self.vhost = f"first-bench-{secrets.token_hex(4)}"
        self.rabbit_url = f"{RABBIT_URL.rstrip('/')}/{self.vhost}"
        self.procs: dict[str, Proc] = {}
        self.sim_urls: dict[str, str] = {}
        self.config: StackConfig | None = None
        self.api_key = ""
        self.rabbit_pid: int | None = None
        self._vhost_made = False

    def check_infrastructure(self) -> None:
        """Fail clearly if RabbitMQ or redis-server is missing."""
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server is not installed; run scripts/test (it installs it).")
        try:
            with httpx.Client(auth=("guest", "guest"), timeout=5, trust_env=False) as api:
                nodes = api.get(f"{RABBIT_API}/nodes").raise_for_status().json()
        except httpx.HTTPError as exc:
            raise SystemExit(
                f"RabbitMQ's management API at {RABBIT_API} is not reachable ({exc}); "
                "start RabbitMQ with scripts/test (or scripts/dev) first."
            ) from exc
        pid = nodes[0].get("os_pid") if nodes else None
        self.rabbit_pid = int(pid) if pid else None

    def make_vhost(self) -> None:
        quoted = urllib.parse.quote(self.vhost, safe="")
        with httpx.Client(auth=("guest", "guest"), timeout=10, trust_env=False) as api:
            api.put(f"{RABBIT_API}/vhosts/{quoted}").raise_for_status()
            self._vhost_made = True
            perms = {"configure": ".*", "write": ".*", "read": ".*"}
            api.put(f"{RABBIT_API}/permissions/{quoted}/guest", json=perms).raise_for_status()

    def start_sims(self) -> None:
        procs = {}
        for model, options in SIMS.items():
            port = free_port()
            env = dict(os.environ)
            env.update({f"FIRST_SIM_VLLM_{k.upper()}": str(v) for k, v in options.items()})
            env.update(
                {
                    "FIRST_SIM_VLLM_PORT": str(port),
                    "FIRST_SIM_VLLM_MODEL": model,
                    "FIRST_SIM_VLLM_SLOTS": "1024",
                    "FIRST_SIM_VLLM_LOG_LEVEL": "WARNING",
                }
            )
            argv = [sys.executable, "-m", "services.sim_vllm"]
            url = f"http://127.0.0.1:{port}"
            procs[model] = self.group.start(f"sim-{model}", argv, env, f"{url}/health")
            self.sim_urls[model] = url
        for model, proc in procs.items():
            self.group.wait_ready(proc, 60)
            self.procs[f"sim-{model}"] = proc

    async def start(self) -> None:
        self.check_infrastructure()
        self.redis.start()
        self.make_vhost()
        self.start_sims()
        database_url = f"sqlite+aiosqlite:///{self.workdir / 'first.db'}"
        self.config = StackConfig(
            rabbit_url=self.rabbit_url,
            redis_url=self.redis.url,
            database_url=database_url,
            backends={model: [url] for model, url in self.sim_urls.items()},
            site_id="bench",
            gateway_port=free_port(),
            router_port=free_port(),
            agent_port=free_port(),
            accounting_port=free_port(),
            extra_env={
                "FIRST_ACCESS_MODELS": json.dumps([{"name": FAST}, {"name": SLOW}]),
                "FIRST_LOG_LEVEL": "WARNING",
                "FIRST_SITE_AGENT_MAX_CONCURRENCY_PER_INSTANCE": "1024",
                "FIRST_SITE_AGENT_PREFETCH": "512",
            },
        )
        self.api_key = await apikeys.issue_key(database_url, "bench")
        for name in SERVICES:
            self.procs[name] = start_service(self.group, self.config, name, timeout_s=90)

    def start_bare(self) -> tuple[Proc, str]:
        port = free_port()
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(port)]
        url = f"http://127.0.0.1:{port}"
        proc = self.group.start("bare-fastapi", argv, dict(os.environ), f"{url}/health")
        self.group.wait_ready(proc, 30)
        return proc, url

    @property
    def gateway_url(self) -> str:
        assert self.config is not None
        return f"http://127.0.0.1:{self.config.gateway_port}"

    def dead(self) -> str | None:
        proc = self.group.first_dead()
        return None if proc is None else f"{proc.name} exited:\n{proc.tail()}"

    def stop(self) -> None:
        self.group.stop_all()
        with contextlib.suppress(Exception):
            self.redis.stop(kill=True)
        if self._vhost_made:
            quoted = urllib.parse.quote(self.vhost, safe="")
            with (
                contextlib.suppress(httpx.HTTPError),
                httpx.Client(auth=("guest", "guest"), timeout=10, trust_env=False) as api,
            ):
                api.delete(f"{RABBIT_API}/vhosts/{quoted}")


# ---------------------------------------------------------------- the floors


async def fastapi_floor(client: Client, url: str, duration_s: float, warmup_s: float) -> float:
    body = {"model": FAST, "messages": [{"role": "user", "content": "benchmark"}], "max_tokens": 1}
    target = f"{url}/v1/chat/completions"
    start, end, results = await closed_loop(
        64, warmup_s + duration_s, client, post_to(client, target, body)
    )
    return rate([r for _, r in results], start + warmup_s, end)


def post_to(
    client: Client, url: str, body: dict[str, Any]
) -> Callable[[httpx.AsyncClient], Awaitable[Reply]]:
    return lambda http: client.post(http, url, body)


def rate(replies: list[Reply], t0: float, t1: float) -> float:
    """Successful replies that ended in [t0, t1], per second."""
    return sum(1 for r in replies if r.ok and t0 <= r.ended <= t1) / (t1 - t0)


async def confirm_floor(rabbit_url: str, n: int) -> list[float]:
    """Sequential persistent publishes with publisher confirms to a quorum queue (ms)."""
    import aio_pika

    connection = await aio_pika.connect(rabbit_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            f"bench.floor.{secrets.token_hex(3)}",
            durable=True,
            arguments={"x-queue-type": "quorum"},
        )
        body = b"x" * 1024
        samples = []
        for i in range(n + n // 10):
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            t0 = time.perf_counter()
            await asyncio.wait_for(
                channel.default_exchange.publish(message, routing_key=queue.name), 10
            )
            if i >= n // 10:  # the first tenth warms up
                samples.append(time.perf_counter() - t0)
        await asyncio.wait_for(queue.delete(if_unused=False, if_empty=False), 10)
    return ms(samples)


async def xread_floor(redis_url: str, n: int) -> list[float]:
    """XADD on one connection -> a blocked XREAD on another wakes (same process, ms)."""
    from redis.asyncio import Redis

    reader = Redis.from_url(redis_url, socket_timeout=10)
    writer = Redis.from_url(redis_url, socket_timeout=10)
    key = f"bench:wake:{secrets.token_hex(3)}"
    samples: list[float] = []
    try:
        await writer.ping()
        await reader.ping()
        last = "0-0"
        for i in range(n + n // 10):
            read = asyncio.create_task(reader.xread({key: last}, block=5000, count=1))
            await asyncio.sleep(0.001)  # the XREAD is sent and blocked by now
            t0 = time.perf_counter()
            await writer.xadd(key, {b"t": b"1"}, maxlen=1000, approximate=True)
            response = await asyncio.wait_for(read, 10)
            woke = time.perf_counter()
            last = response[0][1][-1][0]
            if i >= n // 10:
                samples.append(woke - t0)
        await writer.delete(key)
    finally:
        await reader.aclose()
        await writer.aclose()
    return ms(samples)


# ---------------------------------------------------------------- where the time goes

STAGES = (  # (service, histogram, meaning), from the services' own /metrics
    ("router", "first_router_queue_wait_seconds", "created -> router dispatched (confirmed)"),
    ("site_agent", "first_site_agent_queue_wait_seconds", "created -> agent delivery"),
    ("site_agent", "first_site_agent_first_chunk_seconds", "agent delivery -> 1st chunk XADD"),
    ("gateway", "first_gateway_first_record_seconds", "gateway admission -> 1st record"),
)


async def scrape_stages(stack: Stack) -> dict[str, tuple[float, float]]:
    """(sum, count) of each stage histogram, summed over its labels."""
    assert stack.config is not None
    ports = {
        "router": stack.config.router_port,
        "site_agent": stack.config.agent_port,
        "gateway": stack.config.gateway_port,
    }
    totals: dict[str, tuple[float, float]] = {}
    async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
        for service, metric, _ in STAGES:
            text = (await http.get(f"http://127.0.0.1:{ports[service]}/metrics")).text
            values = {"_sum": 0.0, "_count": 0.0}
            for line in text.splitlines():
                for suffix in values:
                    if line.startswith(metric + suffix):
                        values[suffix] += float(line.rsplit(" ", 1)[1])
            totals[metric] = (values["_sum"], values["_count"])
    return totals


def stage_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean ms of each stage between two scrapes."""
    means = {}
    for _, metric, _ in STAGES:
        total = after[metric][0] - before[metric][0]
        count = after[metric][1] - before[metric][1]
        means[metric] = 1000 * total / count if count else math.nan
    return means


def stage_line(means: dict[str, float]) -> str:
    return "; ".join(f"{label} {fmt(means[metric])}" for _, metric, label in STAGES)


# ---------------------------------------------------------------- the phases


@dataclass
class Side:
    """TTFT and inter-token gaps of one side (direct or gateway), in ms."""

    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    def add(self, out: Outcome) -> None:
        if out.ttft is not None and out.completed:
            self.ttft.append(out.ttft * 1000)
            self.itl.extend(ms(out.inter_token))


async def light_load(client: Client, stack: Stack, pairs: int) -> tuple[Side, Side]:
    """Sequential 64-token streams at 200 tok/s, alternating direct and gateway."""
    direct, gateway = Side(), Side()
    sim, gw = (
        f"{stack.sim_urls[FAST]}/v1/chat/completions",
        f"{stack.gateway_url}/v1/chat/completions",
    )
    async with client.session() as http:
        for _ in range(3):  # warm both paths
            await client.stream(http, sim, FAST, 64)
            await client.stream(http, gw, FAST, 64)
        deadline = time.monotonic() + pairs * 2.0 + PHASE_SLACK_S
        for _ in range(pairs):
            if time.monotonic() > deadline:
                raise RuntimeError("light-load phase over its cap")
            direct.add(await client.stream(http, sim, FAST, 64))
            gateway.add(await client.stream(http, gw, FAST, 64))
    return direct, gateway


async def concurrent_streams(
    client: Client, url: str, model: str, streams: int, tokens: int, stream_s: float,
    duration_s: float, warmup_s: float,
) -> tuple[Side, float, int]:  # fmt: skip
    """Closed loop of `streams` streams, staggered over one stream's length.

    Returns TTFT/ITL of the streams started in the measured window, the aggregate chunks/s
    received in it, and how many streams failed.
    """
    errors_before = client.tally.errors
    start, end, results = await closed_loop(
        streams,
        warmup_s + duration_s,
        client,
        lambda http: client.stream(http, url, model, tokens),
        stream_s,
    )
    t0 = start + warmup_s
    side = Side()
    chunks = 0
    for started, out in results:
        if started >= t0:
            side.add(out)
        chunks += sum(1 for t in out.chunk_times if t0 <= t <= end)
    return side, chunks / (end - t0), client.tally.errors - errors_before


@dataclass
class RelayStep:
    streams: int
    offered: float
    chunks_per_s: float
    ttft_p50: float
    ttft_p99: float
    itl_p99: float
    errors: int
    cpu: dict[str, float]

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.ttft_p99 < RELAY_TTFT_P99_MS


# ---------------------------------------------------------------- profiling (optional)


class Profiler:
    """py-spy on the services while a phase runs (only with --profile DIR).

    `--gil` keeps only the thread holding the GIL (idle threads and a loop waiting in epoll
    do not count), `--nonblocking` does not pause the process to sample it.
    """

    def __init__(self, outdir: Path | None, stack: Stack) -> None:
        self.outdir = outdir
        self.stack = stack
        self.files: dict[str, dict[str, Path]] = {}

    @contextlib.contextmanager
    def record(self, phase: str, duration_s: float) -> Iterator[None]:
        if self.outdir is None:
            yield
            return
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.outdir.mkdir(parents=True, exist_ok=True)
        children = []
        for name in PROFILED:
            out = self.outdir / f"{phase}-{name}.txt"
            self.files.setdefault(phase, {})[name] = out
            argv = [
                pyspy, "record", "--pid", str(self.stack.procs[name].popen.pid),
                "--duration", str(max(1, int(duration_s))), "--rate", "200",
                "--gil", "--nonblocking", "--format", "raw", "-o", str(out),
            ]  # fmt: skip
            children.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            )
        try:
            yield
        finally:
            for child in children:
                try:
                    child.wait(duration_s + 30)
                except subprocess.TimeoutExpired:
                    child.send_signal(signal.SIGINT)
                    child.wait(10)

    def report(self, top: int = 12) -> None:
        for phase, files in self.files.items():
            for name, path in files.items():
                print(f"\nprofile {phase} / {name} ({path})")
                for line in summarize_collapsed(path, top):
                    print(f"  {line}")


ENTRY_FRAMES = {"<module>", "main", "serve", "_run_module_as_main", "_run_code"}


def _where(frame: str) -> tuple[str, str]:
    """(function, file) of a py-spy frame `func (path/file.py:123)`."""
    func, _, rest = frame.partition(" (")
    return func, rest.rsplit(":", 1)[0]


def _library(file: str) -> str:
    if file.startswith(("services/", "schemas/")):
        return ".".join(file.split("/")[:2])
    return file.split("/", 1)[0] if "/" in file else file


def summarize_collapsed(path: Path, top: int) -> list[str]:
    """A py-spy raw (collapsed) profile, summed three ways.

    by library: the innermost frame's package (where the CPU is spent);
    our code: each samples goes to every services/ function on its stack (inclusive);
    self: the innermost frames.
    """
    libraries: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        return [f"no profile: {exc}"]
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f]
        if not count.isdigit() or not frames:
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        libraries[_library(_where(frames[-1])[1])] += n
        seen = set()
        for frame in frames:
            func, file = _where(frame)
            if file.startswith(("services/", "schemas/")) and func not in ENTRY_FRAMES:
                name = f"{file}:{func}"
                if name not in seen:
                    seen.add(name)
                    ours[name] += n
    if not total:
        return ["no samples"]

    def share(counter: collections.Counter[str], k: int) -> list[str]:
        return [f"  {100 * c / total:5.1f}%  {f}" for f, c in counter.most_common(k)]

    return [
        f"{total} samples holding the GIL",
        "by library (innermost frame):",
        *share(libraries, top),
        "our code (inclusive):",
        *share(ours, top),
        "self (innermost frame):",
        *share(own, top),
    ]


# ---------------------------------------------------------------- the run


async def run(plan: Plan, profile_dir: Path | None) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="first-bench-"))
    stack = Stack(workdir)
    meter = CpuMeter()
    cpu: dict[str, dict[str, float]] = {}
    began = time.monotonic()

    def phase_cpu(name: str, start: Any) -> None:
        cpu[name] = meter.cores(start, meter.snapshot())
        print(f"  [{name}] {cpu_line(cpu[name])}  ({time.monotonic() - began:.0f}s)", flush=True)
        if (dead := stack.dead()) is not None:
            raise RuntimeError(dead)

    ok = False
    try:
        print("starting: private redis, vhost, 2 sims, accounting, router, site agent, gateway")
        await stack.start()
        for name, proc in stack.procs.items():
            meter.pids[name] = proc.popen.pid
        assert stack.redis.proc is not None
        meter.pids["redis"] = stack.redis.proc.pid
        if stack.rabbit_pid:
            meter.pids["rabbit"] = stack.rabbit_pid
        client = Client({"authorization": f"Bearer {stack.api_key}"})
        await wait_gateway(client, stack)
        print(f"  ready in {time.monotonic() - began:.0f}s; logs in {workdir / 'logs'}")

        # Floors.
        bare, bare_url = stack.start_bare()
        meter.pids["bare"] = bare.popen.pid
        snap = meter.snapshot()
        fastapi_rps = await fastapi_floor(client, bare_url, plan.fastapi_s, plan.warmup_s)
        phase_cpu("floor: bare FastAPI", snap)
        stack.group.stop(bare)
        del meter.pids["bare"]
        snap = meter.snapshot()
        confirm = await confirm_floor(stack.rabbit_url, plan.confirms)
        wake = await xread_floor(stack.redis.url, plan.wakes)
        phase_cpu("floor: confirm + xread", snap)

        # Light load: c=1.
        await settle(meter)
        snap = meter.snapshot()
        scraped = await scrape_stages(stack)
        direct1, gateway1 = await light_load(client, stack, plan.c1_pairs)
        stages = {"c=1": stage_means(scraped, await scrape_stages(stack))}
        phase_cpu("c=1 streams", snap)

        # Moderate load: 16 streams at 50 tok/s.
        stream_s = 0.02 + 63 / 50
        results16 = {}
        for side, base in (("direct", stack.sim_urls[SLOW]), ("gateway", stack.gateway_url)):
            await settle(meter)
            snap = meter.snapshot()
            scraped = await scrape_stages(stack)
            results16[side], _, _ = await concurrent_streams(
                client, f"{base}/v1/chat/completions", SLOW, 16, 64, stream_s,
                plan.c16_s, stream_s + 0.2,
            )  # fmt: skip
            if side == "gateway":
                stages["c=16"] = stage_means(scraped, await scrape_stages(stack))
            phase_cpu(f"c=16 streams {side}", snap)

        # Capacity: non-streamed max_tokens 1, 64 clients.
        profiler = Profiler(profile_dir, stack)
        body = {
            "model": FAST,
            "messages": [{"role": "user", "content": "benchmark"}],
            "max_tokens": 1,
        }
        rps = {}
        for side, base in (("direct", stack.sim_urls[FAST]), ("gateway", stack.gateway_url)):
            target = f"{base}/v1/chat/completions"
            await settle(meter)
            snap = meter.snapshot()
            span = plan.warmup_s + plan.capacity_s
            recording = (
                profiler.record("capacity", span) if side == "gateway" else contextlib.nullcontext()
            )
            with recording:
                start, end, results = await closed_loop(
                    64, span, client, post_to(client, target, body)
                )
            rps[side] = rate([r for _, r in results], start + plan.warmup_s, end)
            phase_cpu(f"capacity non-streamed {side}", snap)

        # Relay capacity: ramp concurrent 256-token streams at 200 tok/s.
        relay_tokens = 256
        relay_stream_s = 0.02 + (relay_tokens - 1) / 200
        steps: list[RelayStep] = []
        failed = 0
        for n in plan.relay_steps:
            await settle(meter)
            snap = meter.snapshot()
            span = relay_stream_s + 0.5 + plan.relay_s
            recording = (
                profiler.record(f"relay{n}", span)
                if n == PROFILED_RELAY_STEP
                else contextlib.nullcontext()
            )
            with recording:
                side, chunks_per_s, errs = await concurrent_streams(
                    client, f"{stack.gateway_url}/v1/chat/completions", FAST, n, relay_tokens,
                    relay_stream_s, plan.relay_s, relay_stream_s + 0.5,
                )  # fmt: skip
            used = meter.cores(snap, meter.snapshot())
            step = RelayStep(
                n, n * 200.0, chunks_per_s, pct(side.ttft, 50), pct(side.ttft, 99),
                pct(side.itl, 99), errs, used,
            )  # fmt: skip
            steps.append(step)
            print(
                f"  [relay {n} streams] {chunks_per_s:.0f} chunks/s, TTFT p50/p99 "
                f"{fmt(step.ttft_p50, 1)}/{fmt(step.ttft_p99, 1)} ms, errors {errs}; "
                f"{cpu_line(used)}",
                flush=True,
            )
            if (dead := stack.dead()) is not None:
                raise RuntimeError(dead)
            failed = failed + 1 if not step.ok else 0
            if failed >= 2 and (profile_dir is None or n >= PROFILED_RELAY_STEP):
                break  # two failing steps in a row: more streams only queue more
        passing = [s for s in steps if s.ok]
        relay = max((s.chunks_per_s for s in passing), default=0.0)

        result = report(
            fastapi_rps, confirm, wake, direct1, gateway1, results16, rps, steps, relay,
            client.tally, stages,
        )  # fmt: skip
        profiler.report()
        print(f"\ntotal {time.monotonic() - began:.0f}s")
        ok = True
        return result
    finally:
        stack.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir / 'logs'}", file=sys.stderr)


async def wait_gateway(client: Client, stack: Stack, within_s: float = 60.0) -> None:
    """Until the site's heartbeat reached the gateway, it answers 503: wait (bounded)."""
    body = {"model": FAST, "messages": [{"role": "user", "content": "warm"}], "max_tokens": 1}
    deadline = time.monotonic() + within_s
    while True:
        try:
            async with client.session() as http:
                response = await http.post(
                    f"{stack.gateway_url}/v1/chat/completions", json=body, headers=client.headers
                )
            if response.status_code == 200:
                return
            detail = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            detail = repr(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"gateway not answering after {within_s:.0f}s: {detail}")
        await asyncio.sleep(0.5)


def report(
    fastapi_rps: float, confirm: list[float], wake: list[float],
    direct1: Side, gateway1: Side, results16: dict[str, Side], rps: dict[str, float],
    steps: list[RelayStep], relay: float, tally: Tally, stages: dict[str, dict[str, float]],
) -> dict[str, Any]:  # fmt: skip
    added = {
        "c1_p50": pct(gateway1.ttft, 50) - pct(direct1.ttft, 50),
        "c1_p99": pct(gateway1.ttft, 99) - pct(direct1.ttft, 99),
        "c16_p50": pct(results16["gateway"].ttft, 50) - pct(results16["direct"].ttft, 50),
        "c16_p99": pct(results16["gateway"].ttft, 99) - pct(results16["direct"].ttft, 99),
        "itl_p50": pct(gateway1.itl, 50) - pct(direct1.itl, 50),
        "itl_p99": pct(gateway1.itl, 99) - pct(direct1.itl, 99),
    }

    def verdict(value: float, target: float, at_least: bool = False) -> str:
        if math.isnan(value):
            return "n/a"
        met = value >= target if at_least else value <= target
        return ("met" if met else "MISSED") + f" ({'≥' if at_least else '≤'} {target:g})"

    w = 78
    print("\n" + "=" * w)
    print("FIRST overhead: first sim-vllm direct vs the whole path, same client, same run")
    print("=" * w)
    print("floors (this machine)")
    print(f"  bare FastAPI, 1 uvicorn worker, 64 clients      {fastapi_rps:8.0f} req/s")
    print(
        f"  confirmed persistent publish, quorum, seq.      p50 {fmt(pct(confirm, 50))} ms"
        f"  p99 {fmt(pct(confirm, 99))} ms  (n={len(confirm)})"
    )
    print(
        f"  XADD -> blocked XREAD wake, 2 connections       p50 {fmt(pct(wake, 50), 3)} ms"
        f"  p99 {fmt(pct(wake, 99), 3)} ms  (n={len(wake)})"
    )
    print("-" * w)
    head = f"  {'':30}{'direct p50/p99':>16}{'gateway p50/p99':>17}{'added p50/p99':>15}"

    def row(label: str, d: list[float], g: list[float]) -> str:
        return (
            f"  {label:30}{fmt(pct(d, 50)):>8}/{fmt(pct(d, 99)):<7}"
            f"{fmt(pct(g, 50)):>9}/{fmt(pct(g, 99)):<7}"
            f"{fmt(pct(g, 50) - pct(d, 50)):>7}/{fmt(pct(g, 99) - pct(d, 99)):<7}"
        )

    print(f"c=1: sequential 64-token streams, 200 tok/s, TTFT 20 ms (n={len(gateway1.ttft)} each)")
    print(head)
    print(row("TTFT ms", direct1.ttft, gateway1.ttft))
    print(row("inter-token ms", direct1.itl, gateway1.itl))
    d16, g16 = results16["direct"], results16["gateway"]
    print(f"c=16: 64-token streams at 50 tok/s (n={len(d16.ttft)} direct, {len(g16.ttft)} gateway)")
    print(head)
    print(row("TTFT ms", d16.ttft, g16.ttft))
    print(row("inter-token ms", d16.itl, g16.itl))
    print("where the time goes (means in ms, from the services' /metrics histograms)")
    sides = {"c=1": (direct1, gateway1), "c=16": (d16, g16)}
    for load, means in stages.items():
        d, g = sides[load]
        print(f"  {load}: {stage_line(means)}")
        print(f"       client TTFT mean: direct {fmt(mean(d.ttft))}, gateway {fmt(mean(g.ttft))}")
    print("-" * w)
    print("capacity")
    print(
        f"  non-streamed max_tokens 1, 64 clients: direct {rps['direct']:.0f} req/s, "
        f"gateway {rps['gateway']:.0f} req/s"
    )
    print(
        f"  relay ramp (256-token streams at 200 tok/s; pass = TTFT p99 < {RELAY_TTFT_P99_MS:g} ms)"
    )
    print(
        f"  {'streams':>9}{'offered/s':>11}{'chunks/s':>10}{'TTFT p50/p99 ms':>18}"
        f"{'ITL p99':>9}{'errors':>8}{'machine cpu':>13}  pass"
    )
    for s in steps:
        print(
            f"  {s.streams:>9}{s.offered:>11.0f}{s.chunks_per_s:>10.0f}"
            f"{fmt(s.ttft_p50, 1):>10}/{fmt(s.ttft_p99, 1):<7}{fmt(s.itl_p99, 1):>9}{s.errors:>8}"
            f"{s.cpu['machine']:>13.2f}  {'yes' if s.ok else 'no'}"
        )
    print(f"  relay capacity: {relay:.0f} chunks/s")
    print("-" * w)
    print("against the issue's targets")
    checks = [
        ("TTFT added c=1 p50 ms", added["c1_p50"], TARGETS["ttft_c1_p50"], False),
        ("TTFT added c=1 p99 ms", added["c1_p99"], TARGETS["ttft_c1_p99"], False),
        ("TTFT added c=16 p50 ms", added["c16_p50"], TARGETS["ttft_c16_p50"], False),
        ("TTFT added c=16 p99 ms", added["c16_p99"], TARGETS["ttft_c16_p99"], False),
        ("ITL added p50 ms", added["itl_p50"], TARGETS["itl_p50"], False),
        ("non-streamed req/s (gateway)", rps["gateway"], TARGETS["rps_gateway"], True),
        ("relayed chunks/s", relay, TARGETS["relay_chunks_per_s"], True),
    ]
    for label, value, target, at_least in checks:
        print(f"  {label:32}{fmt(value):>10}   {verdict(value, target, at_least)}")
    print("-" * w)
    print(f"requests {tally.requests}, errors {tally.errors}")
    for reason, count in tally.reasons.most_common(5):
        print(f"  {count} x {reason}")
    return {
        "floors": {
            "fastapi_rps": number(fastapi_rps),
            "confirm_rtt_ms": number(pct(confirm, 50)),
            "xread_wake_ms": number(pct(wake, 50)),
        },
        "ttft_added_ms": {
            "c1": {"p50": number(added["c1_p50"]), "p99": number(added["c1_p99"])},
            "c16": {"p50": number(added["c16_p50"]), "p99": number(added["c16_p99"])},
        },
        "itl_added_ms": {"p50": number(added["itl_p50"]), "p99": number(added["itl_p99"])},
        "rps_direct": number(rps["direct"]),
        "rps_gateway": number(rps["gateway"]),
        "relay_chunks_per_s": number(relay),
        "requests": tally.requests,
        "errors": tally.errors,
    }


def run_benchmark(
    work: Awaitable[dict[str, Any]],
    json_path: Path | None,
    runner: Callable[[Any], Any] = asyncio.run,
) -> None:
    """Run a benchmark's coroutine; a stack that did not start is a clear exit, and the
    result goes to `json_path` when given (every benchmark's end)."""
    try:
        result = runner(work)
    except StartupError as exc:
        raise SystemExit(f"the stack did not start: {exc}") from exc
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {json_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke test, < 90 s)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="py-spy gateway, router and site agent under the capacity loads (stacks in DIR)",
    )  # fmt: skip
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare is not None:
        bare_app_main(args.serve_bare)
        return
    plan = QUICK if args.quick else FULL
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    run_benchmark(run(plan, args.profile), args.json, runner)


if __name__ == "__main__":
    main()
