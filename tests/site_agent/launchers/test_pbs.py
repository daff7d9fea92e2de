"""The pbs launcher: its script, its parsers on recorded outputs, and its command plumbing.

No PBS installs here. The outputs in outputs/ are written after the documented formats of
PBS Professional (2022+, as on ALCF's Polaris) and Torque 6 — not captured from a live
server. The plumbing tests put stand-in `qsub`/`qstat`/`qdel` scripts on PATH that replay them.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from services.site_agent.launchers import LaunchError
from services.site_agent.launchers.base import InstanceSpec
from services.site_agent.launchers.pbs import (
    ALIVE_STATES,
    PbsLauncher,
    parse_job_state,
    parse_qsub,
    qsub_script,
)
from services.site_agent.launchers.script import CommandResult
from services.site_agent.siteconfig import LauncherConfig
from tests.site_agent.launchers.conftest import fixed_spec, sim_spec

OUTPUTS = Path(__file__).parent / "outputs"
PBSPRO_ID = "8213725.polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov"
TORQUE_ID = "4807.torque-head.cluster.local"


def recorded(name: str) -> str:
    return (OUTPUTS / name).read_text()


def _spec(gpus: int = 0) -> InstanceSpec:
    return fixed_spec(cpus=64, memory_gb=64, gpus=gpus)


def test_script_asks_for_a_select_chunk_with_the_spec_resources_and_the_site_options() -> None:
    config = LauncherConfig(
        kind="pbs",
        partition="debug",
        account="MyProject",
        walltime="01:00:00",
        directives=("-l filesystems=home:eagle", "#PBS -l place=scatter"),
    )

    text = qsub_script(_spec(gpus=4), config, Path("/lus/first/logs/t-abc.log"), "exec serve\n")

    assert text.splitlines() == [
        "#!/bin/bash",
        "#PBS -N first-t-abc",
        "#PBS -q debug",
        "#PBS -A MyProject",
        "#PBS -l walltime=01:00:00",
        "#PBS -l select=1:ncpus=64:mem=65536mb:ngpus=4",
        "#PBS -j oe",
        "#PBS -o /lus/first/logs/t-abc.log",
        "#PBS -V",
        "#PBS -l filesystems=home:eagle",
        "#PBS -l place=scatter",
        'cd "${PBS_O_WORKDIR:-.}"',
        "exec serve",
    ]


def test_script_leaves_out_what_the_site_did_not_set_and_gpus_it_needs_none_of() -> None:
    text = qsub_script(_spec(), LauncherConfig(kind="pbs"), Path("/l.log"), "")
    assert "#PBS -q" not in text
    assert "#PBS -A" not in text
    assert "ngpus" not in text


@pytest.mark.parametrize(
    ("directives", "log", "match"),
    [(("-l a=b\nrm -rf ~",), "/l.log", "spans lines"), ((), "/my logs/x.log", "blanks")],
)
def test_script_refuses_directives_across_lines_and_log_paths_with_blanks(
    directives: tuple[str, ...], log: str, match: str
) -> None:
    config = LauncherConfig(kind="pbs", directives=directives)
    with pytest.raises(ValueError, match=match):
        qsub_script(_spec(), config, Path(log), "")


def test_generated_script_is_valid_bash(tmp_path: Path) -> None:
    launcher = PbsLauncher(LauncherConfig(kind="pbs"), tmp_path)
    spec = sim_spec()
    text = qsub_script(spec, launcher.config, tmp_path / "x.log", launcher.wrapper(spec, ""))
    path = tmp_path / "job.sh"
    path.write_text(text)

    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=10)

    assert done.returncode == 0, done.stderr
    assert 'FIRST_HOST="$(hostname)"' in text


@pytest.mark.parametrize(
    ("output", "job_id"),
    [("pbspro_qsub.txt", PBSPRO_ID), ("torque_qsub.txt", TORQUE_ID)],
)
def test_parse_qsub_reads_the_job_id(output: str, job_id: str) -> None:
    assert parse_qsub(recorded(output)) == job_id
    assert parse_qsub("123[].server\n") == "123[].server"


def test_parse_qsub_refuses_output_without_a_job_id() -> None:
    with pytest.raises(LaunchError, match="no job id"):
        parse_qsub(recorded("pbspro_qsub_refused.stderr"))
    with pytest.raises(LaunchError, match="no job id"):
        parse_qsub("")


@pytest.mark.parametrize(
    ("output", "state", "alive"),
    [
        ("pbspro_qstat_f_running.txt", "R", True),
        ("pbspro_qstat_f_queued.txt", "Q", True),
        ("torque_qstat_f_running.txt", "R", True),
        ("torque_qstat_f_completed.txt", "C", False),
    ],
)
def test_parse_job_state_reads_qstat_f(output: str, state: str, alive: bool) -> None:
    assert parse_job_state(recorded(output)) == state
    assert (state in ALIVE_STATES) is alive


@pytest.mark.parametrize(
    "stderr",
    [
        "pbspro_qstat_finished.stderr",
        "pbspro_qstat_unknown.stderr",
        "torque_qstat_unknown.stderr",
        "torque_qdel_completed.stderr",
    ],
)
def test_finished_and_unknown_jobs_count_as_gone(stderr: str, tmp_path: Path) -> None:
    launcher = PbsLauncher(LauncherConfig(kind="pbs"), tmp_path)
    assert launcher.is_gone(CommandResult(153, "", recorded(stderr)))


def test_other_failures_do_not_count_as_gone(tmp_path: Path) -> None:
    launcher = PbsLauncher(LauncherConfig(kind="pbs"), tmp_path)
    said = "qstat: cannot connect to server pbs01 (errno=111)\n"
    assert not launcher.is_gone(CommandResult(1, "", said))


# --------------------------------------------------------------------------- stand-in commands


def fake_commands(bin_dir: Path, monkeypatch: pytest.MonkeyPatch, **scripts: str) -> Path:
    """Put executables named after the keywords, with the given bash bodies, first on PATH."""
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


async def test_qsub_failure_is_a_launch_error_and_leaves_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = OUTPUTS / "pbspro_qsub_refused.stderr"
    fake_commands(tmp_path / "bin", monkeypatch, qsub=f"cat {refused} >&2; exit 1")
    launcher = PbsLauncher(LauncherConfig(kind="pbs"), tmp_path / "state")

    with pytest.raises(LaunchError, match=r"qsub refused .*resource limits"):
        await launcher.start(sim_spec())

    assert launcher.saved() == []


async def test_a_hanging_qsub_is_cut_off_at_submit_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_commands(tmp_path / "bin", monkeypatch, qsub="exec sleep 30")
    config = LauncherConfig(kind="pbs", submit_timeout_s=0.5)
    launcher = PbsLauncher(config, tmp_path / "state")

    started = time.monotonic()
    with pytest.raises(LaunchError, match=r"did not finish within 0\.5 s"):
        await launcher.start(sim_spec())
    assert time.monotonic() - started < 3


async def test_launcher_submits_tracks_and_deletes_a_job_through_the_pbs_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls"
    deleted = tmp_path / "deleted"
    fake_commands(
        tmp_path / "bin",
        monkeypatch,
        qsub=f'echo "qsub $*" >>{calls}; cat {OUTPUTS / "pbspro_qsub.txt"}',
        qstat=(
            f'echo "qstat $*" >>{calls}\n'
            f"if [[ -e {deleted} ]]; then cat {OUTPUTS / 'pbspro_qstat_finished.stderr'} >&2;"
            " exit 35; fi\n"
            f"cat {OUTPUTS / 'pbspro_qstat_f_running.txt'}"
        ),
        qdel=f'echo "qdel $*" >>{calls}; touch {deleted}',
    )
    launcher = PbsLauncher(LauncherConfig(kind="pbs"), tmp_path / "state")
    launcher.stop_poll_s = 0.05
    spec = sim_spec()

    record = await launcher.start(spec)
    assert record.job_id == PBSPRO_ID
    assert await launcher.alive(record)
    assert await PbsLauncher(LauncherConfig(kind="pbs"), tmp_path / "state").recover() == [record]
    await launcher.stop(record)

    assert not await launcher.alive(record)
    assert launcher.saved() == []
    script = launcher.script_path(spec.instance_id)
    assert calls.read_text().splitlines()[:3] == [
        f"qsub {script}",
        f"qstat -f {PBSPRO_ID}",
        f"qstat -f {PBSPRO_ID}",
    ]
    assert f"qdel {PBSPRO_ID}" in calls.read_text()
    assert script.read_text().startswith("#!/bin/bash\n#PBS -N first-")
