"""The local launcher on real processes: the simulated vLLM started, served, stopped, recovered."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.site_agent.launchers import InstanceRecord, local, probe_instance
from services.site_agent.launchers.local import LocalLauncher
from services.site_agent.siteconfig import LauncherConfig
from tests.site_agent.launchers.conftest import (
    chat,
    chat_response,
    eventually,
    port_open,
    serving_url,
    sim_spec,
)

START_LIMIT_S = 20.0


@pytest.fixture
async def launcher(tmp_path: Path) -> AsyncIterator[LocalLauncher]:
    """A local launcher on a fresh state folder; whatever it leaves running is stopped."""
    launcher = LocalLauncher(LauncherConfig(kind="local"), tmp_path)
    launcher.stop_grace_s = 5.0
    yield launcher
    for record in launcher.saved():
        await launcher.stop(record)


async def test_instance_serves_a_chat_completion_and_stop_closes_its_port(
    launcher: LocalLauncher, tmp_path: Path
) -> None:
    spec = sim_spec()
    record = await launcher.start(spec)
    assert await launcher.alive(record)

    url = await serving_url(launcher, record, START_LIMIT_S)

    assert url.startswith("http://127.0.0.1:")
    key = launcher.key(record)
    assert await chat(url, spec.model, key) == " tok1 tok2 tok3"
    assert (await chat_response(url, spec.model, "")).status_code == 401, "no key, no answer"
    assert not await probe_instance(url, "another-model", timeout_s=2.0, key=key)
    assert launcher.saved() == [record], "the URL is persisted with the record"

    await launcher.stop(record)

    assert not await launcher.alive(record)
    assert not port_open(url)
    assert not await probe_instance(url, spec.model, timeout_s=2.0, key=key)
    assert launcher.saved() == []
    assert not launcher.key_path(record.instance_id).exists(), "its key is gone with it"
    assert "sim-vllm serving" in (tmp_path / "logs" / f"{spec.instance_id}.log").read_text()


async def test_a_new_launcher_recovers_running_instances_and_forgets_dead_ones(
    launcher: LocalLauncher, tmp_path: Path
) -> None:
    kept = await launcher.start(sim_spec())
    lost = await launcher.start(sim_spec())
    kept_url = await serving_url(launcher, kept, START_LIMIT_S)
    os.killpg(int(lost.job_id), signal.SIGKILL)
    await eventually(lambda: _dead(launcher, lost), 5.0, "the killed instance gone")

    restarted = LocalLauncher(LauncherConfig(kind="local"), tmp_path)
    recovered = await restarted.recover()

    assert recovered == [kept]
    assert recovered[0].url == kept_url
    assert restarted.key(recovered[0]) == launcher.key(kept), "read back from the state folder"
    assert [r.instance_id for r in restarted.saved()] == [kept.instance_id]
    await restarted.stop(recovered[0])
    assert not port_open(kept_url)
    assert not await launcher.alive(kept), "the first launcher sees it gone too (and reaps it)"


async def test_recover_does_not_take_a_reused_pid_for_an_instance(
    launcher: LocalLauncher,
) -> None:
    # The pid of a live process that is no instance of ours: this test's own.
    stale = InstanceRecord(
        instance_id="t-stale",
        model="m",
        launcher="local",
        job_id=str(os.getpid()),
        started_at=time.time(),
    )
    launcher.save(stale)

    assert not await launcher.alive(stale)
    assert await launcher.recover() == []
    assert launcher.saved() == []


async def test_an_instance_just_started_is_alive_before_proc_names_it(
    launcher: LocalLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Just after the spawn the kernel shows the child's environment and command line empty
    # for a moment (CI saw `alive` false right after `start`); pin that moment open.
    monkeypatch.setattr(local, "runs_instance", lambda pid, instance_id: False)
    record = await launcher.start(sim_spec(("sleep", "60")))

    assert await launcher.alive(record), "our own unreaped child needs no /proc evidence"

    await launcher.stop(record)
    assert not await launcher.alive(record)


async def test_stop_kills_an_instance_that_ignores_sigterm(launcher: LocalLauncher) -> None:
    # An ignored signal stays ignored across exec: the whole instance shrugs off SIGTERM.
    record = await launcher.start(sim_spec(("bash", "-c", "trap '' TERM; exec sleep 60")))
    await eventually(lambda: _reported(launcher, record), 5.0, "the wrapper reported")
    launcher.stop_grace_s = 0.5

    started = time.monotonic()
    await launcher.stop(record)

    assert time.monotonic() - started < 3.0
    assert not await launcher.alive(record)


async def test_instance_gets_its_env_but_not_the_agents_first_settings(
    launcher: LocalLauncher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIRST_RABBIT_URL", "amqp://user:secret@broker/")
    show = ("bash", "-c", 'echo "MY_VAR=$MY_VAR RABBIT=${FIRST_RABBIT_URL:-unset}"')
    spec = sim_spec(show, MY_VAR="given")
    record = await launcher.start(spec)

    await eventually(lambda: _dead(launcher, record), 5.0, "the command ran to its end")

    log = (tmp_path / "logs" / f"{spec.instance_id}.log").read_text()
    assert "MY_VAR=given RABBIT=unset" in log
    assert await launcher.recover() == [], "an instance that exited is forgotten"


async def _dead(launcher: LocalLauncher, record: InstanceRecord) -> bool:
    return not await launcher.alive(record)


async def _reported(launcher: LocalLauncher, record: InstanceRecord) -> bool:
    return bool(await launcher.locate(record))
