"""The job wrapper every launcher runs, the scheduler commands' runner, and what they share.

The wrapper is a bash script. It makes a private folder for the server's Unix socket
(`mktemp -d`: mode 0700, so no other user can connect to the socket), picks a free port on
the machine it lands on, and starts two processes: the authenticating relay
(services/site_agent/relay.py) on {host}:{port}, which wants the instance's key on every
request, and the model's command, which must listen only on {uds} (vLLM's `--uds`). It writes
the instance's URL (the relay's) to the report file (a temporary file renamed over it, so a
reader sees all of it or nothing), then waits: when either process ends, it stops the other,
removes the socket's folder and exits with that status. A SIGTERM (`stop`, scancel, qdel) ends
both. The key is read by the relay from its 0600 file: it is neither in the script nor on any
command line (see services/site_agent/instance_keys.py).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from services.site_agent import instance_keys
from services.site_agent.launchers.base import (
    InstanceRecord,
    InstanceSpec,
    Launcher,
    LaunchError,
    check_instance_id,
)

logger = logging.getLogger(__name__)

PORT_RANGE = (20000, 29999)
"""Ports the wrapper picks from: below Linux's ephemeral range (32768-60999), where outgoing
connections would take ports from under it."""
KILL_WAIT_S = 5.0
"""How long a scheduler command killed at its timeout may take to exit."""
INSTANCE_ENV = "FIRST_INSTANCE_ID"
"""Set in the instance's environment: how the local launcher tells its processes from others."""
_PLACEHOLDER = re.compile(r"(\{uds\})")
_TCP_PLACEHOLDER = re.compile(r"\{host\}|\{port\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Reads the kernel's TCP tables rather than probing: a port is taken when any socket, in any
# state and on any address, uses it. Pure bash, since mawk (Debian's awk) has no hex parsing.
_PICK_PORT = """\
first_used=" "
for first_table in /proc/net/tcp /proc/net/tcp6; do
    [[ -r $first_table ]] || continue
    while read -r _ first_addr _; do
        first_used+="$((16#${first_addr##*:})) "
    done < <(tail -n +2 "$first_table")
done
FIRST_PORT=""
for ((first_try = 0; first_try < 200; first_try++)); do
    first_port=$((PORT_MIN + (RANDOM * 32768 + RANDOM) % (PORT_MAX - PORT_MIN + 1)))
    if [[ $first_used != *" $first_port "* ]]; then
        FIRST_PORT=$first_port
        break
    fi
done
if [[ -z $FIRST_PORT ]]; then
    echo "first: no free port in PORT_MIN-PORT_MAX" >&2
    exit 1
fi"""


_RELAY_ARGS = (
    ' --host "$FIRST_HOST" --port "$FIRST_PORT" --uds "$FIRST_UDS" --key-file "$FIRST_KEY_FILE"'
)
"""The relay's options: where it listens, where the server is, where its key is."""
# The end of the job: stop whichever of the relay and the server still runs, wait for them,
# and remove the socket's folder. Runs on every exit, a SIGTERM's included.
_SUPERVISE = """\
first_pids=()
first_end() {
    trap '' TERM INT
    kill -TERM "${first_pids[@]}" 2>/dev/null || true
    wait
    rm -rf "$FIRST_UDS_DIR"
}
trap first_end EXIT
trap 'exit 143' TERM
trap 'exit 130' INT"""


def _shell_word(arg: str) -> str:
    """Quote one argv element for bash, leaving {uds} to expand in the job."""
    if not arg:
        return "''"
    parts = []
    for piece in _PLACEHOLDER.split(arg):
        if piece == "{uds}":
            parts.append('"$FIRST_UDS"')
        elif piece:
            parts.append(shlex.quote(piece))
    return "".join(parts)


def fill_command(template: Sequence[str], served_name: str, instance_id: str) -> list[str]:
    """Fill in {served_name} and {instance_id}; {uds} stays for the wrapper.

    Only these placeholders are replaced (no str.format): a command may well carry braces of
    its own, e.g. a JSON argument.
    """
    return [
        arg.replace("{served_name}", served_name).replace("{instance_id}", instance_id)
        for arg in template
    ]


def check_command(command: Sequence[str], model: str) -> None:
    """Raise ValueError for no command, or one that would listen on {host} or {port}.

    The relay owns {host}:{port}; a server listening there itself would be open to anyone
    on the cluster, since its own --api-key leaves most paths unguarded (relay.py). A server
    must listen on {uds} (vLLM: `--uds {uds}`); one that does not is never reached, so never
    healthy, and its start fails.
    """
    if not command:
        raise ValueError(f"model {model!r} has no command to start it")
    if any(_TCP_PLACEHOLDER.search(arg) for arg in command):
        raise ValueError(
            f"the command of model {model!r} names {{host}}/{{port}}: the relay listens there; "
            "the server listens only on {uds}"
        )


def wrapper_body(
    spec: InstanceSpec, host: str, report: Path, key_file: Path, relay: Sequence[str]
) -> str:
    """Return the wrapper's lines (no #! line): see the module docstring.

    `host` is where the relay listens and is reached; "" means the node's `hostname`.
    `key_file` holds the instance's key; `relay` is the argv that runs the relay.
    """
    check_instance_id(spec.instance_id)
    check_command(spec.command, spec.model)
    bad = [name for name in spec.env if not _ENV_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"invalid environment variable names {bad}")
    lines = [
        f"# FIRST instance {spec.instance_id} of {spec.model!r}: a relay, the server behind it.",
        "set -euo pipefail",
        f"export {INSTANCE_ENV}={shlex.quote(spec.instance_id)}",
        *(f"export {name}={shlex.quote(value)}" for name, value in sorted(spec.env.items())),
        f"FIRST_HOST={shlex.quote(host)}" if host else 'FIRST_HOST="$(hostname)"',
        f"FIRST_REPORT={shlex.quote(str(report))}",
        f"FIRST_KEY_FILE={shlex.quote(str(key_file))}",
        _PICK_PORT.replace("PORT_MIN", str(PORT_RANGE[0])).replace("PORT_MAX", str(PORT_RANGE[1])),
        'FIRST_UDS_DIR="$(mktemp -d "${TMPDIR:-/tmp}/first-XXXXXX")"',
        # A socket's path must fit in 108 bytes; a long job TMPDIR would not leave room.
        "if ((${#FIRST_UDS_DIR} > 90)); then",
        '    rmdir "$FIRST_UDS_DIR"',
        '    FIRST_UDS_DIR="$(mktemp -d /tmp/first-XXXXXX)"',
        "fi",
        'FIRST_UDS="$FIRST_UDS_DIR/server.sock"',
        _SUPERVISE,
        shlex.join(relay) + _RELAY_ARGS + " &",
        'first_pids+=("$!")',
        " ".join(
            _shell_word(arg) for arg in fill_command(spec.command, spec.model, spec.instance_id)
        )
        + " &",
        'first_pids+=("$!")',
        'mkdir -p "$(dirname "$FIRST_REPORT")"',
        'printf \'http://%s:%s\\n\' "$FIRST_HOST" "$FIRST_PORT" >"$FIRST_REPORT.tmp.$$"',
        'mv -f "$FIRST_REPORT.tmp.$$" "$FIRST_REPORT"',
        'echo "first: instance $FIRST_INSTANCE_ID at http://$FIRST_HOST:$FIRST_PORT" >&2',
        "first_status=0",
        "wait -n || first_status=$?",
        'exit "$first_status"',
    ]
    return "\n".join(lines) + "\n"


def read_report(path: Path) -> str:
    """Return the URL in a report file, or "" while there is none (yet)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return ""
    return text if text.startswith(("http://", "https://")) else ""


def job_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment for an instance or a scheduler command: the agent's own, minus
    its FIRST_* settings (they hold broker credentials an instance has no use for)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRST_")}
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class CommandResult:
    """What a scheduler command printed, and its exit status."""

    returncode: int
    stdout: str
    stderr: str

    def summary(self) -> str:
        """Return the exit status and what the command said, for an error message."""
        text = (self.stderr.strip() or self.stdout.strip())[:500]
        return f"exit {self.returncode}: {text}" if text else f"exit {self.returncode}"


async def run_command(argv: Sequence[str], timeout_s: float) -> CommandResult:
    """Run a scheduler command (sbatch, qstat, ...) to its end within `timeout_s`.

    Raises LaunchError when it cannot be run or outlives its bound (it is then killed).
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=job_environment(),
        )
    except OSError as exc:
        raise LaunchError(f"cannot run {argv[0]}: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        # Bounded too: a command stuck in the kernel (a hung file system) outlives SIGKILL.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), KILL_WAIT_S)
        raise LaunchError(f"{shlex.join(argv)} did not finish within {timeout_s:g} s") from None
    return CommandResult(
        proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
    )


class ScriptLauncher(Launcher):
    """A launcher whose instances run the wrapper and report their URL to a file."""

    stop_poll_s = 0.2
    """How often `stop` looks whether the instance is gone yet."""

    def wrapper(self, spec: InstanceSpec, default_host: str) -> str:
        """Return the wrapper body for `spec`, on the configured host or else `default_host`."""
        host = self.config.host or default_host
        relay = self.config.relay_command or (sys.executable, "-m", "services.site_agent.relay")
        return wrapper_body(
            spec, host, self.report_path(spec.instance_id), self.key_path(spec.instance_id), relay
        )

    def prepare(self, instance_id: str) -> None:
        """Make the folders of an instance's files, drop a report left by an earlier run, and
        give the instance a new key."""
        for path in (self.script_path(instance_id), self.log_path(instance_id)):
            path.parent.mkdir(parents=True, exist_ok=True)
        self.report_path(instance_id).unlink(missing_ok=True)
        instance_keys.write_key(self.key_path(instance_id), instance_keys.new_key())

    async def locate(self, record: InstanceRecord) -> str:
        """Return the URL the instance reported ("" until it has); persist it once known."""
        if not record.url:
            url = read_report(self.report_path(record.instance_id))
            if url:
                record.url = url
                self.save(record)
        return record.url

    async def recover(self) -> list[InstanceRecord]:
        """Return the persisted instances still alive (with their URLs); forget the others."""
        alive = []
        for record in self.saved():
            if await self.alive(record):
                await self.locate(record)
                alive.append(record)
            else:
                logger.info("instance %s (job %s) is gone", record.instance_id, record.job_id)
                self.forget(record)
        return alive

    async def wait_gone(self, record: InstanceRecord, limit_s: float) -> bool:
        """Wait up to `limit_s` for the instance to end; tell whether it did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while await self.alive(record):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(self.stop_poll_s)
        return True


class BatchLauncher(ScriptLauncher):
    """A launcher that submits the wrapper as a batch job; the subclass names the commands
    and reads their outputs."""

    scheduler: ClassVar[str]
    submit_cmd: ClassVar[tuple[str, ...]]
    state_cmd: ClassVar[tuple[str, ...]]
    cancel_cmd: ClassVar[tuple[str, ...]]
    alive_states: ClassVar[frozenset[str]]
    gone_markers: ClassVar[tuple[str, ...]]
    """Lower-case phrases of a failed state or cancel command meaning the job is no more."""
    stop_grace_s = 60.0
    """How long `stop` waits for a cancelled job to leave the queue (Slurm's KillWait, 30 s by
    default, stands between its SIGTERM and SIGKILL)."""

    @abc.abstractmethod
    def batch_script(self, spec: InstanceSpec, log: Path, body: str) -> str:
        """Return the job script: the scheduler's directives, then `body`."""

    @abc.abstractmethod
    def parse_submit(self, stdout: str) -> str:
        """Return the job id in the submit command's output (LaunchError if none)."""

    @abc.abstractmethod
    def parse_state(self, stdout: str) -> str:
        """Return the job state in the state command's output ("" if none)."""

    async def start(self, spec: InstanceSpec) -> InstanceRecord:
        """Write the job script and submit it."""
        self.prepare(spec.instance_id)
        script = self.script_path(spec.instance_id)
        body = self.wrapper(spec, "")  # "": the compute node's hostname
        script.write_text(self.batch_script(spec, self.log_path(spec.instance_id), body))
        result = await self._run(*self.submit_cmd, str(script))
        if result.returncode != 0:
            raise LaunchError(
                f"{self.submit_cmd[0]} refused instance {spec.instance_id}: {result.summary()}"
            )
        record = InstanceRecord(
            instance_id=spec.instance_id,
            model=spec.model,
            launcher=self.kind,
            job_id=self.parse_submit(result.stdout),
            started_at=time.time(),
        )
        self.save(record)
        logger.info(
            "submitted instance %s of %s as %s job %s",
            spec.instance_id,
            spec.model,
            self.scheduler,
            record.job_id,
        )
        return record

    async def alive(self, record: InstanceRecord) -> bool:
        """Tell whether the job is queued or running; LaunchError when the scheduler cannot say."""
        return await self.job_state(record.job_id) in self.alive_states

    async def job_state(self, job_id: str) -> str:
        """Return the job's state ("" once the scheduler no longer knows it)."""
        result = await self._run(*self.state_cmd, job_id)
        if result.returncode != 0:
            if self.is_gone(result):
                return ""
            raise LaunchError(f"{shlex.join(self.state_cmd)} {job_id}: {result.summary()}")
        return self.parse_state(result.stdout)

    async def stop(self, record: InstanceRecord) -> None:
        """Cancel the job, wait (bounded) until it has left the queue, and forget it."""
        result = await self._run(*self.cancel_cmd, record.job_id)
        if result.returncode != 0 and not self.is_gone(result):
            raise LaunchError(f"{self.cancel_cmd[0]} {record.job_id}: {result.summary()}")
        if not await self.wait_gone(record, self.stop_grace_s):
            # The scheduler took the cancel and kills the job in its own time.
            logger.warning(
                "%s job %s of instance %s still there %g s after %s",
                self.scheduler,
                record.job_id,
                record.instance_id,
                self.stop_grace_s,
                self.cancel_cmd[0],
            )
        self.forget(record)
        logger.info(
            "cancelled instance %s (%s job %s)", record.instance_id, self.scheduler, record.job_id
        )

    def is_gone(self, result: CommandResult) -> bool:
        """Tell whether a failed state or cancel command said the job is no more."""
        said = (result.stderr + result.stdout).lower()
        return any(marker in said for marker in self.gone_markers)

    async def _run(self, *argv: str) -> CommandResult:
        return await run_command(argv, self.config.submit_timeout_s)
