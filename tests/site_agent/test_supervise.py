"""`first sites supervise`: the lease decision, the lock, and the supervisor against real Redis.

Leases run through `GlobusLikeExecutor`: the SDK's own serializer packs the ShellFunction as
registration would and the result as an endpoint would, then a local thread runs it. Nothing
reaches Globus.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import shlex
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from globus_compute_sdk.serialize import ComputeSerializer
from redis.asyncio import Redis
from typer.testing import CliRunner

from schemas import names
from schemas.codec import encode, heartbeat_decoder
from schemas.messages import SiteHeartbeat
from services.cli import app as first_cli
from services.common.redis import make_redis
from services.common.redis_lock import RedisLock
from services.devstack.procs import ProcessGroup
from services.site_agent import supervise, supervise_config
from services.site_agent.supervise import (
    ExecutorFactory,
    Keep,
    Lease,
    SiteState,
    Submit,
    Supervisor,
    backoff_s,
    decide,
    decide_site,
    lease_outcome,
)
from services.site_agent.supervise_config import SiteSpec, SupervisorConfig, SupervisorOptions
from tests.faults.privates import free_port
from tests.router.test_router import running_router
from tests.site_agent.helpers import unique, wait_for

# --- The decision, without an event loop ----------------------------------------------------------

SPEC = SiteSpec(
    site_id="s",
    endpoint_id="ep",
    lease_s=100,
    overlap_s=10,
    stale_after_s=5,
    boot_grace_s=20,
    backoff_s=2,
    backoff_max_s=10,
)


def test_a_site_without_a_lease_gets_one() -> None:
    assert decide_site(0.0, SPEC, SiteState()) == Submit("s", "start")


def test_the_next_lease_is_submitted_overlap_s_before_the_current_one_ends() -> None:
    state = SiteState(lease=Lease(started_at=1000.0), last_beat_at=1089.0)
    assert decide_site(1089.0, SPEC, state) == Keep("s", "running", until=1090.0)
    assert decide_site(1090.0, SPEC, state) == Submit("s", "renew")


def test_a_stale_heartbeat_is_ignored_while_the_new_lease_boots() -> None:
    state = SiteState(lease=Lease(started_at=1000.0), last_beat_at=None)
    assert decide_site(1019.9, SPEC, state) == Keep("s", "booting", until=1020.0)
    assert decide_site(1020.0, SPEC, state) == Submit("s", "stale")


def test_a_heartbeat_older_than_stale_after_s_resubmits() -> None:
    state = SiteState(lease=Lease(started_at=1000.0), last_beat_at=1030.0)
    assert decide_site(1035.0, SPEC, state) == Keep("s", "running", until=1090.0)
    assert decide_site(1035.1, SPEC, state) == Submit("s", "stale")


@pytest.mark.parametrize(("failed", "reason"), [(False, "ended"), (True, "failed")])
def test_a_lease_whose_task_finished_is_replaced_at_once(failed: bool, reason: str) -> None:
    lease = Lease(started_at=1000.0, ended_at=1500.0, failed=failed)
    state = SiteState(lease=lease, last_beat_at=1499.0)
    assert decide_site(1500.0, SPEC, state) == Submit("s", reason)  # type: ignore[arg-type]


def test_repeated_quick_failures_back_off_exponentially_up_to_the_cap() -> None:
    assert [backoff_s(SPEC, n) for n in range(6)] == [0, 2, 4, 8, 10, 10]
    # A site whose every lease fails 0.5 s after its submit, and that never heartbeats.
    state, now, submits = SiteState(), 0.0, []
    for _ in range(7):
        while not isinstance(action := decide_site(now, SPEC, state), Submit):
            assert action.why == "backoff"
            now = action.until
        submits.append(now)
        state = state.submitted(now, action.reason).ended(now + 0.5, failed=True)
        now += 0.5
    gaps = [b - a for a, b in itertools.pairwise(submits)]
    # The first recovery is immediate; then the pause doubles from backoff_s to backoff_max_s.
    assert gaps == [0.5, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_a_heartbeat_since_the_last_recovery_clears_the_backoff() -> None:
    state = SiteState(lease=Lease(started_at=0.0), recoveries=(10.0, 20.0, 30.0))
    ended = state.ended(31.0, failed=True)
    assert decide_site(31.0, SPEC, ended) == Keep("s", "backoff", until=38.0)
    healthy = SiteState(lease=ended.lease, last_beat_at=30.5, recoveries=ended.recoveries)
    assert decide_site(31.0, SPEC, healthy) == Submit("s", "failed")


def test_decide_answers_for_every_configured_site() -> None:
    other = SPEC.model_copy(update={"site_id": "t"})
    running = {"t": SiteState(lease=Lease(started_at=0.0), last_beat_at=1.0)}
    assert decide(2.0, [SPEC, other], running) == [
        Submit("s", "start"),
        Keep("t", "booting", until=20.0),
    ]


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"overlap_s": 100}, "overlap_s"),
        ({"walltime_s": 110}, "walltime_s"),
        ({"env": {"BAD-NAME": "x"}}, "environment"),
        ({"env": {"FIRST_SITE_AGENT_SITE_ID": "other"}}, "site_id"),
    ],
)
def test_inconsistent_site_timings_are_refused(fields: dict[str, Any], error: str) -> None:
    base = {"site_id": "s", "endpoint_id": "e", "lease_s": 100, "overlap_s": 10, "kill_after_s": 10}
    with pytest.raises(ValueError, match=error):
        SiteSpec.model_validate({**base, **fields})


def test_the_documented_supervisor_file_is_valid(tmp_path: Path) -> None:
    doc = supervise_config.__doc__ or ""
    block = doc.split("defaults shown where optional):", 1)[1].split("Each lease runs", 1)[0]
    path = tmp_path / "supervisor.toml"
    path.write_text(textwrap.dedent(block))
    config = supervise_config.load_config(path)
    assert config.sites[0].site_id == "polaris"
    assert config.sites[0].walltime() == 21700


def test_sites_supervise_check_prints_each_lease_command(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.toml"
    path.write_text('[[sites]]\nsite_id = "a"\nendpoint_id = "e"\nlease_s = 60\noverlap_s = 5\n')
    result = CliRunner().invoke(first_cli, ["sites", "supervise", str(path), "--check"])
    assert result.exit_code == 0, result.output
    assert "a @ e: exec env FIRST_SITE_AGENT_SITE_ID=a timeout --signal=TERM" in result.output
    path.write_text('[[sites]]\nsite_id = "a"\n')
    assert CliRunner().invoke(first_cli, ["sites", "supervise", str(path)]).exit_code == 2


def _finished(
    value: Any = None, error: BaseException | None = None
) -> concurrent.futures.Future[Any]:
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
    return future


def test_a_lease_that_ran_out_is_not_a_failure_but_a_walltime_or_an_error_is() -> None:
    from globus_compute_sdk import ShellResult

    def shell(rc: int, exception: str | None) -> ShellResult:
        return ShellResult(
            cmd="c", stdout="", stderr="boom", returncode=rc, exception_name=exception
        )

    assert lease_outcome(_finished(shell(124, "subprocess.CalledProcessError")))[0] is False
    assert lease_outcome(_finished(shell(0, None)))[0] is False
    assert lease_outcome(_finished(shell(124, "subprocess.TimeoutExpired")))[0] is True
    killed = lease_outcome(_finished(shell(137, "subprocess.CalledProcessError")))
    assert killed == (True, "the agent ignored SIGTERM and was killed; stderr: boom")
    assert lease_outcome(_finished(shell(3, "subprocess.CalledProcessError"))) == (
        True,
        "exit code 3; stderr: boom",
    )
    assert lease_outcome(_finished(error=RuntimeError("endpoint offline")))[0] is True


# --- Against real Redis -------------------------------------------------------------------------

Serializer = ComputeSerializer()


def _run_packed(packed: str) -> str:
    # What an endpoint does: unpack function, args and kwargs, run, serialize the result.
    function, args, kwargs = Serializer.unpack_and_deserialize(packed)
    return Serializer.serialize(function(*args, **kwargs))


class GlobusLikeExecutor(concurrent.futures.Executor):
    """Runs each function in a thread after the SDK's serializer round trip; records submits."""

    def __init__(self, endpoint_id: str) -> None:
        self.endpoint_id = endpoint_id
        self.submits: list[float] = []
        self.futures: list[concurrent.futures.Future[Any]] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        parts = [Serializer.serialize(fn), Serializer.serialize(args), Serializer.serialize(kwargs)]
        packed = Serializer.pack_buffers(parts)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def deliver(done: concurrent.futures.Future[str]) -> None:
            if done.exception() is not None:
                future.set_exception(done.exception())
            else:
                future.set_result(Serializer.deserialize(done.result()))

        self._pool.submit(_run_packed, packed).add_done_callback(deliver)
        self.submits.append(time.time())
        self.futures.append(future)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=False, cancel_futures=cancel_futures)


class Executors:
    """The factory handed to a supervisor; it remembers what it built."""

    def __init__(self) -> None:
        self.built: list[GlobusLikeExecutor] = []

    def __call__(self, endpoint_id: str) -> concurrent.futures.Executor:
        executor = GlobusLikeExecutor(endpoint_id)
        self.built.append(executor)
        return executor

    @property
    def submits(self) -> list[float]:
        return sorted(t for e in self.built for t in e.submits)

    @property
    def futures(self) -> list[concurrent.futures.Future[Any]]:
        return [f for e in self.built for f in e.futures]


@pytest.fixture(scope="module")
def module_redis_url(new_redis_url: Callable[[], str]) -> str:
    """One Redis database for this module (a session has only 15); flushed per test."""
    return new_redis_url()


@pytest.fixture
async def redis(module_redis_url: str) -> AsyncIterator[Redis]:
    client = make_redis(module_redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def stop_file(tmp_path: Path) -> Path:
    return tmp_path / "stop"


@pytest.fixture
def executors(stop_file: Path) -> Iterator[Executors]:
    """Executors for the supervisors of a test; afterwards every lease is ended (bounded)."""
    made = Executors()
    yield made
    stop_file.touch()  # the test commands wait for this file, or for their lease to run out
    _done, running = concurrent.futures.wait(made.futures, timeout=10)
    for executor in made.built:
        executor.shutdown()
    assert not running, "leases still running 10 s after the test"


def until_stopped(stop_file: Path, before: str = "") -> str:
    return f"{before}while [ ! -e {shlex.quote(str(stop_file))} ]; do sleep 0.05; done"


def site(tmp_path: Path, command: str, **fields: Any) -> SiteSpec:
    timings: dict[str, Any] = {
        "lease_s": 3.0,
        "overlap_s": 1.0,
        "kill_after_s": 1.0,
        "stale_after_s": 1.0,
        "boot_grace_s": 0.5,
        "backoff_s": 0.2,
        "backoff_max_s": 0.8,
        **fields,
    }
    site_id = timings.pop("site_id", unique("site"))
    return SiteSpec(
        site_id=site_id,
        endpoint_id="ep-1",
        command=command,
        stdout=str(tmp_path / f"{site_id}.out"),
        stderr=str(tmp_path / f"{site_id}.err"),
        **timings,
    )


def configured(*sites: SiteSpec, tick_s: float = 0.05, lock_ttl_s: float = 1.0) -> SupervisorConfig:
    return SupervisorConfig(
        supervisor=SupervisorOptions(tick_s=tick_s, lock_ttl_s=lock_ttl_s, submit_timeout_s=5),
        sites=sites,
    )


class Running:
    """A supervisor running in a task of the test's loop."""

    def __init__(self, config: SupervisorConfig, redis: Redis, factory: ExecutorFactory) -> None:
        self.supervisor = Supervisor(config, redis, factory)
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.supervisor.run(self._stop))

    def active(self) -> bool:
        return self.supervisor.lock.valid()

    async def stop(self) -> None:
        """Stop it as SIGTERM would: it gives up the lock and leaves the leases running."""
        self._stop.set()
        await asyncio.wait_for(self._task, 5)


@contextlib.asynccontextmanager
async def supervising(
    config: SupervisorConfig, redis: Redis, factory: ExecutorFactory
) -> AsyncIterator[Running]:
    running = Running(config, redis, factory)
    try:
        yield running
    finally:
        await running.stop()


async def beat(redis: Redis, site_id: str, sent_at: float) -> None:
    # Mirrored as a router stamps it: received when it was sent.
    heartbeat = SiteHeartbeat(
        site_id=site_id, agent_id="test", sent_at=sent_at, interval_s=0.2, received_at=sent_at
    )
    await redis.hset(names.REGISTRY_KEY, site_id, encode(heartbeat))


async def test_the_lock_admits_one_holder_and_only_the_holder_extends_or_releases_it(
    redis: Redis,
) -> None:
    key = names.supervisor_key("lock")
    first, second = RedisLock(redis, key, 0.3), RedisLock(redis, key, 0.3)
    assert await first.hold()
    assert first.valid()
    assert not await second.hold()
    assert await first.hold()  # extended
    await asyncio.sleep(0.35)  # the first holder stalls past the TTL
    assert not first.valid()
    assert await second.hold()
    assert not await first.hold()  # its extend finds another token
    await first.release()
    assert await redis.exists(key) == 1  # ...and so does its release
    await second.release()
    assert await redis.exists(key) == 0


async def test_a_lease_runs_its_shell_function_and_the_next_starts_overlap_s_before_its_end(
    redis: Redis, executors: Executors, tmp_path: Path, stop_file: Path
) -> None:
    spec = site(tmp_path, "echo started; sleep 30", boot_grace_s=10.0)
    async with supervising(configured(spec), redis, executors):
        await wait_for(lambda: len(executors.submits) == 2, within_s=4)
        first = executors.futures[0]
        result = await asyncio.wait_for(asyncio.wrap_future(first), 3)
        assert len(executors.submits) == 2
    started, renewed = executors.submits
    assert 1.9 <= renewed - started <= 2.4  # lease_s 3 - overlap_s 1
    assert result.returncode == supervise.LEASE_END_RC  # `timeout` ended it, not the walltime
    # Every lease appends to the site's stdout file, and a result holds the file's tail.
    assert result.stdout.startswith("started\n")
    assert "timeout --signal=TERM --kill-after=1s 3s" in result.cmd
    record = await redis.hget(names.supervisor_key("leases"), spec.site_id)
    assert record is not None
    assert float(record) == pytest.approx(renewed, abs=0.1)


async def test_a_site_whose_heartbeats_go_stale_is_resubmitted(
    redis: Redis, executors: Executors, tmp_path: Path, stop_file: Path
) -> None:
    spec = site(tmp_path, until_stopped(stop_file), lease_s=6.0)
    await beat(redis, spec.site_id, time.time() - 60)
    async with supervising(configured(spec), redis, executors):
        await wait_for(lambda: len(executors.submits) == 2, within_s=2)
        first, second = executors.submits
        assert 0.5 <= second - first <= 0.8  # stale from the start, but only after the boot grace

        beats: list[float] = []

        async def keep_beating() -> None:
            while True:
                now = time.time()
                await beat(redis, spec.site_id, now)
                beats.append(now)
                await asyncio.sleep(0.1)

        beater = asyncio.create_task(keep_beating())
        await asyncio.sleep(1.5)
        assert len(executors.submits) == 2  # fresh heartbeats keep the lease
        beater.cancel()
        await wait_for(lambda: len(executors.submits) == 3, within_s=2)
    assert 1.0 <= executors.submits[2] - beats[-1] <= 1.3  # stale_after_s


async def test_a_task_that_exits_early_is_resubmitted_with_growing_pauses(
    redis: Redis, executors: Executors, tmp_path: Path
) -> None:
    spec = site(tmp_path, "echo broken >&2; exit 3", lease_s=30.0, boot_grace_s=10.0)
    async with supervising(configured(spec), redis, executors):
        await asyncio.sleep(2.6)
    submits = executors.submits
    gaps = [b - a for a, b in itertools.pairwise(submits)]
    assert 5 <= len(submits) <= 7, gaps
    assert gaps[0] < 0.3  # the first recovery is immediate
    for gap, pause in zip(gaps[1:], (0.2, 0.4, 0.8, 0.8), strict=False):
        assert pause <= gap <= pause + 0.3, gaps
    result = executors.futures[0].result(timeout=1)
    assert result.returncode == 3
    assert "broken" in result.stderr


async def test_a_failed_submit_builds_a_new_executor_and_is_retried(
    redis: Redis, executors: Executors, tmp_path: Path, stop_file: Path
) -> None:
    spec = site(tmp_path, until_stopped(stop_file), boot_grace_s=10.0)
    calls = []

    def flaky(endpoint_id: str) -> concurrent.futures.Executor:
        calls.append(endpoint_id)
        if len(calls) == 1:
            raise RuntimeError("Globus is down")
        return executors(endpoint_id)

    async with supervising(configured(spec), redis, flaky):
        await wait_for(lambda: len(executors.submits) == 1, within_s=2)
    assert calls == ["ep-1", "ep-1"]


# A process that publishes heartbeats the way an agent does (into the registry mirror), until
# its lease runs out or the test's stop file appears.
BEATER = """
import os, sys, time, redis
from schemas import names
from schemas.codec import encode
from schemas.messages import SiteHeartbeat
url, site_id, stop_file = sys.argv[1:]
r = redis.Redis.from_url(url, socket_timeout=5)
while not os.path.exists(stop_file):
    now = time.time()
    hb = SiteHeartbeat(
        site_id=site_id, agent_id="beater", sent_at=now, interval_s=0.1, received_at=now
    )
    r.hset(names.REGISTRY_KEY, site_id, encode(hb))
    time.sleep(0.1)
"""


def beater(redis_url: str, site_id: str, stop_file: Path) -> str:
    args = shlex.join([sys.executable, "-c", BEATER, redis_url, site_id, str(stop_file)])
    return f"exec {args}"


async def test_of_two_supervisors_only_one_submits_and_the_standby_adopts_its_lease(
    redis: Redis, module_redis_url: str, tmp_path: Path, stop_file: Path
) -> None:
    site_id = unique("two")
    command = beater(module_redis_url, site_id, stop_file)
    spec = site(tmp_path, command, site_id=site_id, boot_grace_s=2.0)
    active, standby = Executors(), Executors()
    try:
        async with (
            supervising(configured(spec), redis, active) as first,
            supervising(configured(spec), redis, standby) as second,
        ):
            await wait_for(lambda: active.submits, within_s=2)
            started = active.submits[0]
            await wait_for(lambda: redis.hexists(names.REGISTRY_KEY, site_id), within_s=3)
            await asyncio.sleep(0.3)
            assert first.active()
            assert not second.active()
            assert standby.submits == []
            await first.stop()
            stopped = time.time()
            await wait_for(second.active, within_s=1.0)  # at its next tick
            took_over = time.time() - stopped
            # Heartbeats are fresh and the adopted lease has time left: nothing is submitted
            # until its renewal, lease_s - overlap_s after the first supervisor's submit.
            await wait_for(lambda: standby.submits, within_s=3)
    finally:
        await asyncio.to_thread(stop_file.touch)
        await _end_leases(active, standby)
    assert took_over < 0.2
    assert standby.submits[0] - started == pytest.approx(2.0, abs=0.2)
    assert len(active.submits) == 1


async def test_a_standby_takes_over_an_expired_lock_and_keeps_the_running_lease(
    redis: Redis, module_redis_url: str, executors: Executors, tmp_path: Path, stop_file: Path
) -> None:
    site_id = unique("expired")
    spec = site(tmp_path, until_stopped(stop_file), site_id=site_id, boot_grace_s=0.5)
    # A supervisor died holding the lock (TTL 1 s) just after submitting a lease that still beats.
    started = time.time()
    await redis.set(names.supervisor_key("lock"), "dead-supervisor", px=1000)
    await redis.hset(names.supervisor_key("leases"), site_id, repr(started))
    agent = await asyncio.create_subprocess_exec(
        "bash", "-c", beater(module_redis_url, site_id, stop_file)
    )
    try:
        async with supervising(configured(spec), redis, executors) as standby:
            await wait_for(standby.active, within_s=2)
            took_over = time.time() - started
            await wait_for(lambda: executors.submits, within_s=2)
    finally:
        await asyncio.to_thread(stop_file.touch)
        await asyncio.wait_for(agent.wait(), 5)
    assert 1.0 <= took_over <= 1.2  # the lock's TTL, then the next tick
    assert executors.submits[0] - started == pytest.approx(2.0, abs=0.2)  # renewal, not restart


async def _end_leases(*groups: Executors) -> None:
    futures = [f for g in groups for f in g.futures]
    await asyncio.to_thread(concurrent.futures.wait, futures, 6)
    assert all(f.done() for f in futures)
    for group in groups:
        for executor in group.built:
            executor.shutdown()


@pytest.fixture
def sim_url(tmp_path: Path) -> Iterator[str]:
    """A `first sim-vllm` process serving the model "sim"."""
    group = ProcessGroup(tmp_path / "logs")
    port = free_port()
    env = {**os.environ, "FIRST_SIM_VLLM_PORT": str(port), "FIRST_SIM_VLLM_MODEL": "sim"}
    url = f"http://127.0.0.1:{port}"
    proc = group.start("sim-vllm", [str(FIRST), "sim-vllm"], env, f"{url}/health")
    try:
        group.wait_ready(proc, 30)
        yield url
    finally:
        group.stop_all()


FIRST = Path(sys.executable).parent / "first"


async def test_the_real_site_agent_runs_in_leases_and_its_site_stays_live_across_the_handover(
    rabbit_url: str,
    module_redis_url: str,
    redis: Redis,
    executors: Executors,
    tmp_path: Path,
    sim_url: str,
) -> None:
    site_id = unique("leased")
    env = {
        "FIRST_RABBIT_URL": rabbit_url,
        "FIRST_REDIS_URL": module_redis_url,
        "FIRST_SITE_AGENT_BACKENDS": json.dumps({"sim": [sim_url]}),  # braces survive format()
        "FIRST_SITE_AGENT_PORT": "0",  # two leases overlap on this host
        "FIRST_SITE_AGENT_HEARTBEAT_INTERVAL_S": "0.3",
        "FIRST_LOG_JSON": "false",
    }
    timings = {"lease_s": 6.0, "overlap_s": 2.5, "kill_after_s": 2.0, "boot_grace_s": 5.0}
    spec = site(tmp_path, f"exec {FIRST} site-agent", site_id=site_id, env=env, **timings)
    agents: set[str] = set()
    worst_age = 0.0
    async with (
        running_router(rabbit_url, module_redis_url),
        supervising(configured(spec, tick_s=0.1), redis, executors),
    ):
        await wait_for(lambda: redis.hexists(names.REGISTRY_KEY, site_id), within_s=5)
        # Watch the mirror until the first lease has run out and its successor serves alone.
        until = executors.submits[0] + spec.lease_s + 0.5
        while time.time() < until:
            raw = await redis.hget(names.REGISTRY_KEY, site_id)
            assert isinstance(raw, bytes)
            heartbeat = heartbeat_decoder.decode(raw)
            agents.add(heartbeat.agent_id)
            worst_age = max(worst_age, time.time() - heartbeat.sent_at)
            await asyncio.sleep(0.1)
        first = await asyncio.wait_for(asyncio.wrap_future(executors.futures[0]), 3)
    assert len(executors.submits) == 2
    assert executors.submits[1] - executors.submits[0] == pytest.approx(3.5, abs=0.3)
    assert len(agents) == 2  # both leases' agents heartbeat, one after the other
    assert worst_age < 1.0  # ...with no gap at the handover
    assert [m.model for m in heartbeat.models] == ["sim"]
    assert heartbeat.models[0].state == "hot"
    assert first.returncode == supervise.LEASE_END_RC, first.stderr  # exited on SIGTERM in time
