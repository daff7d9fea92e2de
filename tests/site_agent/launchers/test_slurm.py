"""The slurm launcher: its script and parsers, then real jobs on a one-node Slurm cluster.

The cluster is the one `scripts/test` starts (first_ensure_slurm); the module fixture calls
the same function, so that this module also runs alone. No Slurm is a failure, not a skip.
The recorded outputs in outputs/ were taken from that cluster (Slurm 22.05).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.site_agent.launchers import InstanceRecord, LaunchError
from services.site_agent.launchers.base import InstanceSpec
from services.site_agent.launchers.script import run_command
from services.site_agent.launchers.slurm import (
    SlurmLauncher,
    parse_job_state,
    parse_sbatch,
    sbatch_script,
)
from services.site_agent.siteconfig import LauncherConfig
from tests.site_agent.launchers.conftest import (
    chat,
    chat_response,
    eventually,
    fixed_spec,
    port_open,
    serving_url,
    sim_spec,
)

REPO = Path(__file__).resolve().parents[3]
OUTPUTS = Path(__file__).parent / "outputs"
SETUP_TIMEOUT_S = 300.0  # a first run installs the Debian packages
START_LIMIT_S = 30.0
CONFIG = LauncherConfig(kind="slurm", partition="debug", walltime="00:10:00", submit_timeout_s=15)


def _spec(gpus: int = 0) -> InstanceSpec:
    return fixed_spec(cpus=8, memory_gb=31.5, gpus=gpus)


def test_script_asks_for_the_spec_resources_and_the_site_options() -> None:
    config = LauncherConfig(
        kind="slurm",
        partition="gpu",
        account="proj",
        walltime="04:00:00",
        directives=("--constraint=a100", "#SBATCH --qos=high"),
    )

    text = sbatch_script(_spec(gpus=4), config, Path("/state/logs/t-abc.log"), "exec serve\n")

    assert text.splitlines() == [
        "#!/bin/bash",
        "#SBATCH --job-name=first-t-abc",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=04:00:00",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32256M",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --output=/state/logs/t-abc.log",
        "#SBATCH --constraint=a100",
        "#SBATCH --qos=high",
        "exec serve",
    ]


def test_script_leaves_out_what_the_site_did_not_set_and_gpus_it_needs_none_of() -> None:
    text = sbatch_script(_spec(), LauncherConfig(kind="slurm"), Path("/l.log"), "")
    assert "--partition" not in text
    assert "--account" not in text
    assert "--gres" not in text


@pytest.mark.parametrize("bad", ["--qos=a\nrm -rf /", "--x=\r"])
def test_script_refuses_a_directive_that_would_spill_into_the_body(bad: str) -> None:
    with pytest.raises(ValueError, match="spans lines"):
        sbatch_script(_spec(), LauncherConfig(kind="slurm", directives=(bad,)), Path("/l"), "")


def test_parsers_read_recorded_outputs() -> None:
    assert parse_sbatch("42\n") == "42"
    assert parse_sbatch("42;cluster2\n") == "42"
    assert parse_job_state((OUTPUTS / "slurm_scontrol_show_job_running.txt").read_text()) == (
        "RUNNING"
    )
    cancelled = (OUTPUTS / "slurm_scontrol_show_job_cancelled.txt").read_text()
    assert parse_job_state(cancelled) == "CANCELLED"
    assert parse_job_state("") == ""
    with pytest.raises(LaunchError, match="no job id"):
        parse_sbatch("sbatch: error: Batch job submission failed\n")


# --------------------------------------------------------------------------- real Slurm


@pytest.fixture
async def launcher(slurm_cluster: None, tmp_path: Path) -> AsyncIterator[SlurmLauncher]:
    """A slurm launcher on a fresh state folder; its jobs are cancelled afterwards."""
    launcher = SlurmLauncher(CONFIG, tmp_path)
    launcher.stop_poll_s = 0.1
    yield launcher
    for record in launcher.saved():
        await launcher.stop(record)


async def test_job_serves_a_chat_completion_and_scancel_ends_it(launcher: SlurmLauncher) -> None:
    spec = sim_spec()
    record = await launcher.start(spec)
    await eventually(lambda: _in_state(launcher, record, "RUNNING"), 15.0, "job RUNNING")

    url = await serving_url(launcher, record, START_LIMIT_S)

    assert url.startswith(f"http://{socket.gethostname()}:"), "the node's hostname by default"
    assert await chat(url, spec.model, launcher.key(record)) == " tok1 tok2 tok3"
    assert (await chat_response(url, spec.model, "")).status_code == 401, "no key, no answer"

    await launcher.stop(record)

    assert await launcher.job_state(record.job_id) in ("", "CANCELLED")
    assert not await launcher.alive(record)
    assert not port_open(url)
    assert launcher.saved() == []


async def test_a_new_launcher_recovers_running_jobs_and_forgets_ended_ones(
    launcher: SlurmLauncher, tmp_path: Path
) -> None:
    kept = await launcher.start(sim_spec())
    lost = await launcher.start(sim_spec())
    kept_url = await serving_url(launcher, kept, START_LIMIT_S)
    cancelled = await run_command(["scancel", lost.job_id], timeout_s=15)
    assert cancelled.returncode == 0, cancelled.stderr
    await eventually(lambda: _gone(launcher, lost), 15.0, "the cancelled job ended")

    restarted = SlurmLauncher(CONFIG, tmp_path)
    recovered = await restarted.recover()

    assert recovered == [kept]
    assert recovered[0].url == kept_url
    await restarted.stop(recovered[0])
    assert not port_open(kept_url)


async def test_sbatch_refusal_is_a_launch_error(slurm_cluster: None, tmp_path: Path) -> None:
    launcher = SlurmLauncher(LauncherConfig(kind="slurm", partition="no-such-partition"), tmp_path)

    with pytest.raises(LaunchError, match="invalid partition"):
        await launcher.start(sim_spec())

    assert launcher.saved() == []


async def test_an_unknown_job_is_not_alive(slurm_cluster: None, tmp_path: Path) -> None:
    launcher = SlurmLauncher(CONFIG, tmp_path)
    record = InstanceRecord(
        instance_id="t-x", model="m", launcher="slurm", job_id="999999", started_at=0.0
    )
    assert not await launcher.alive(record)


async def _in_state(launcher: SlurmLauncher, record: InstanceRecord, state: str) -> bool:
    return await launcher.job_state(record.job_id) == state


async def _gone(launcher: SlurmLauncher, record: InstanceRecord) -> bool:
    return not await launcher.alive(record)
