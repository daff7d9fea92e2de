"""The job wrapper (run by bash here, as a job would), the command runner and the registry."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.site_agent.launchers import LAUNCHERS, LaunchError, make_launcher, script
from services.site_agent.launchers.base import InstanceRecord, InstanceSpec
from services.site_agent.launchers.local import LocalLauncher
from services.site_agent.launchers.pbs import PbsLauncher
from services.site_agent.launchers.slurm import SlurmLauncher
from services.site_agent.siteconfig import LauncherConfig, Resources

ECHO_ARGV = (sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))")
IDLE_RELAY = ("bash", "-c", "exec sleep 30", "relay")
"""A stand-in for the relay that only waits (its options land in bash's $1...): these tests
look at the wrapper; the relay itself is tested in tests/site_agent/test_relay.py."""


def wrapper_body(spec: InstanceSpec, host: str, report: Path) -> str:
    """The wrapper of `spec` with the idle relay and a key file beside the report."""
    return script.wrapper_body(spec, host, report, report.with_suffix(".key"), IDLE_RELAY)


def spec(command: tuple[str, ...], instance_id: str = "t-1", **env: str) -> InstanceSpec:
    return InstanceSpec(
        instance_id=instance_id, model="org/model", command=command, env=env, resources=Resources()
    )


def run_wrapper(body: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "wrapper.sh"
    path.write_text("#!/bin/bash\n" + body)
    return subprocess.run(
        ["/bin/bash", str(path)], capture_output=True, text=True, timeout=20, check=False
    )


def test_wrapper_reports_its_url_then_runs_the_command_with_every_placeholder_filled(
    tmp_path: Path,
) -> None:
    args = ("{uds}", "--name={served_name}", "{instance_id}", "a b'c", '{"k": 1}', "")
    report = tmp_path / "reports" / "t-1.url"
    body = wrapper_body(spec((*ECHO_ARGV, *args)), "127.0.0.1", report)

    done = run_wrapper(body, tmp_path)

    assert done.returncode == 0, done.stderr
    url = report.read_text().strip()
    port = int(url.rsplit(":", 1)[1])
    assert url == f"http://127.0.0.1:{port}"
    assert script.PORT_RANGE[0] <= port <= script.PORT_RANGE[1]
    uds, *rest = json.loads(done.stdout)
    assert uds.endswith("/server.sock")
    assert rest == [
        "--name=org/model",
        "t-1",
        "a b'c",
        '{"k": 1}',
        "",
    ]
    assert not list(report.parent.glob("*.tmp.*")), "the temporary report was renamed, not left"


def test_wrapper_serves_on_a_socket_in_a_private_folder_and_removes_it_at_the_end(
    tmp_path: Path,
) -> None:
    show = (
        sys.executable,
        "-c",
        "import os, sys; d = os.path.dirname(sys.argv[1]); "
        "print(d, oct(os.stat(d).st_mode & 0o777), os.stat(d).st_uid == os.getuid())",
        "{uds}",
    )
    done = run_wrapper(wrapper_body(spec(show), "127.0.0.1", tmp_path / "r.url"), tmp_path)

    assert done.returncode == 0, done.stderr
    folder, mode, own = done.stdout.split()
    assert (mode, own) == ("0o700", "True"), "only its owner may enter the socket's folder"
    assert not Path(folder).exists(), "removed when the job ended"


def test_wrapper_ends_the_server_when_the_relay_ends(tmp_path: Path) -> None:
    body = script.wrapper_body(
        spec(("sleep", "30")), "127.0.0.1", tmp_path / "r.url", tmp_path / "k", ("false",)
    )
    started = time.monotonic()

    done = run_wrapper(body, tmp_path)

    assert done.returncode == 1, "the relay's status"
    assert time.monotonic() - started < 10, "the server was stopped, not waited for"


def test_wrapper_exports_the_spec_environment_and_the_instance_id(tmp_path: Path) -> None:
    show = (
        sys.executable,
        "-c",
        "import os; print(os.environ['MY_VAR'], os.environ['FIRST_INSTANCE_ID'])",
    )
    body = wrapper_body(spec(show, MY_VAR="x $y 'z'"), "127.0.0.1", tmp_path / "r.url")

    done = run_wrapper(body, tmp_path)

    assert done.stdout.strip() == "x $y 'z' t-1"


def test_wrapper_without_a_host_reports_the_node_hostname(tmp_path: Path) -> None:
    body = wrapper_body(spec(("true",)), "", tmp_path / "r.url")

    run_wrapper(body, tmp_path)

    assert (tmp_path / "r.url").read_text().startswith(f"http://{socket.gethostname()}:")


def test_wrapper_never_picks_a_port_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        free = busy + 1 if busy < 65535 else busy - 1
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", free))  # fails the test if the neighbour is in use
        monkeypatch.setattr(script, "PORT_RANGE", (min(busy, free), max(busy, free)))
        body = wrapper_body(spec(("true",)), "127.0.0.1", tmp_path / "r.url")

        ports = set()
        for _ in range(4):
            run_wrapper(body, tmp_path)
            ports.add(int((tmp_path / "r.url").read_text().rsplit(":", 1)[1]))

        assert ports == {free}
        monkeypatch.setattr(script, "PORT_RANGE", (busy, busy))
        full = run_wrapper(wrapper_body(spec(("true",)), "h", tmp_path / "x.url"), tmp_path)
    assert full.returncode == 1
    assert "no free port" in full.stderr
    assert not (tmp_path / "x.url").exists()


@pytest.mark.parametrize(
    ("instance_id", "command", "env"),
    [
        ("../escape", ("true",), {}),
        ("has space", ("true",), {}),
        ("ok", (), {}),
        ("ok", ("true",), {"BAD-NAME": "x"}),
        ("ok", ("serve", "--port", "{port}"), {}),
        ("ok", ("serve", "--host={host}"), {}),
    ],
)
def test_wrapper_refuses_ids_commands_and_env_names_that_do_not_fit(
    instance_id: str, command: tuple[str, ...], env: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"invalid|no command|relay listens there"):
        wrapper_body(spec(command, instance_id, **env), "h", tmp_path / "r.url")


def test_read_report_ignores_a_missing_or_garbled_file(tmp_path: Path) -> None:
    report = tmp_path / "r.url"
    assert script.read_report(report) == ""
    report.write_text("garbage\n")
    assert script.read_report(report) == ""
    report.write_text("http://node7:20001\n")
    assert script.read_report(report) == "http://node7:20001"


def test_job_environment_leaves_out_the_agents_first_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FIRST_RABBIT_URL", "amqp://user:secret@broker/")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")

    env = script.job_environment({"FIRST_INSTANCE_ID": "t-1"})

    assert "FIRST_RABBIT_URL" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["FIRST_INSTANCE_ID"] == "t-1"


async def test_run_command_kills_a_command_that_outlives_its_bound() -> None:
    started = time.monotonic()
    with pytest.raises(LaunchError, match=r"did not finish within 0\.3 s"):
        await script.run_command(["sleep", "30"], timeout_s=0.3)
    assert time.monotonic() - started < 3


async def test_run_command_reports_a_missing_program_as_a_launch_error() -> None:
    with pytest.raises(LaunchError, match="cannot run"):
        await script.run_command(["/nonexistent/qsub"], timeout_s=5)


async def test_run_command_returns_status_and_both_outputs() -> None:
    result = await script.run_command(["bash", "-c", "echo out; echo err >&2; exit 3"], 5)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert result.summary() == "exit 3: err"


@pytest.mark.parametrize(
    ("kind", "cls"), [("local", LocalLauncher), ("slurm", SlurmLauncher), ("pbs", PbsLauncher)]
)
def test_make_launcher_returns_the_configured_kind(kind: str, cls: type, tmp_path: Path) -> None:
    launcher = make_launcher(LauncherConfig(kind=kind), tmp_path)  # type: ignore[arg-type]
    assert type(launcher) is cls
    assert launcher.state_dir == tmp_path
    assert set(LAUNCHERS) == {"local", "slurm", "pbs"}


def test_records_survive_a_new_launcher_and_other_kinds_are_left_alone(tmp_path: Path) -> None:
    local = LocalLauncher(LauncherConfig(), tmp_path)
    mine = InstanceRecord(instance_id="a", model="m", launcher="local", job_id="1", started_at=1.0)
    other = InstanceRecord(instance_id="b", model="m", launcher="slurm", job_id="7", started_at=1.0)
    local.save(mine)
    local.save(other)
    (tmp_path / "instances" / "broken.json").write_text("{not json")

    assert LocalLauncher(LauncherConfig(), tmp_path).saved() == [mine]
    local.forget(mine)
    assert LocalLauncher(LauncherConfig(), tmp_path).saved() == []
    assert (tmp_path / "instances" / "b.json").exists()
