"""The local launcher: each instance is a child process of the agent, in its own session.

Its own session (and so its own process group) keeps a Ctrl-C of the agent from reaching
the instances and lets `stop` signal the server together with the workers it spawned. The
instances outlive the agent on purpose: an agent that restarts recovers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import subprocess
import time
from pathlib import Path

from services.site_agent.launchers.base import InstanceRecord, InstanceSpec, LaunchError
from services.site_agent.launchers.script import INSTANCE_ENV, ScriptLauncher, job_environment
from services.site_agent.siteconfig import LauncherConfig

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
REAP_POLL_S = 0.02
REAP_TRIES = 50
"""A dying child is polled this often, this many times (1 s in all), to collect it."""


def process_state(pid: int) -> str:
    """Return the one-letter state of `pid` from /proc ("" when there is no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    # The command name in parentheses may itself hold spaces and parentheses.
    fields = stat.rpartition(")")[2].split()
    return fields[0] if fields else ""


def runs_instance(pid: int, instance_id: str) -> bool:
    """Tell whether `pid` is the wrapper or server of `instance_id`, not a reused pid.

    The wrapper execs the server, so its command line names the instance only when the
    command template does; the environment always does (INSTANCE_ENV, set before the exec).
    """
    proc = Path(f"/proc/{pid}")
    try:
        environ = (proc / "environ").read_bytes().split(b"\0")
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    marker = f"{INSTANCE_ENV}={instance_id}".encode()
    return marker in environ or any(instance_id.encode() in arg for arg in cmdline)


def _spawn(script: Path, log: Path, spec: InstanceSpec) -> subprocess.Popen[bytes]:
    """Start `bash script` in a new session with its output appended to `log`."""
    # subprocess, not asyncio's: an asyncio transport kills its child when it is closed or
    # collected, and an instance must outlive the agent to be recovered.
    with log.open("ab") as out:
        try:
            return subprocess.Popen(
                ["/bin/bash", str(script)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=job_environment({INSTANCE_ENV: spec.instance_id}),
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(f"cannot start instance {spec.instance_id}: {exc}") from exc


class LocalLauncher(ScriptLauncher):
    """Runs each instance as a local process (the wrapper, then `exec` of the server)."""

    kind = "local"
    stop_grace_s = 10.0
    """How long a stopped instance may take to exit after SIGTERM before it gets SIGKILL."""
    kill_wait_s = 5.0
    """How long to wait for the process to vanish after SIGKILL."""

    def __init__(self, config: LauncherConfig, state_dir: Path) -> None:
        super().__init__(config, state_dir)
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    async def start(self, spec: InstanceSpec) -> InstanceRecord:
        """Start the wrapper in a new session; its output goes to the instance's log."""
        self.prepare(spec.instance_id)
        script = self.script_path(spec.instance_id)
        script.write_text("#!/bin/bash\n" + self.wrapper(spec, DEFAULT_HOST))
        child = await asyncio.to_thread(_spawn, script, self.log_path(spec.instance_id), spec)
        self._children[child.pid] = child
        record = InstanceRecord(
            instance_id=spec.instance_id,
            model=spec.model,
            launcher=self.kind,
            job_id=str(child.pid),
            started_at=time.time(),
        )
        self.save(record)
        logger.info("started instance %s of %s as pid %d", spec.instance_id, spec.model, child.pid)
        return record

    async def alive(self, record: InstanceRecord) -> bool:
        """Tell whether the instance's process runs: not a zombie, and not a reused pid."""
        pid = int(record.job_id)
        state = process_state(pid)
        child = self._children.get(pid)
        if child is not None:
            # Our own unreaped child cannot have had its pid reused, so /proc's environment
            # need not vouch for it; nor could it just after the spawn: a vfork parent wakes
            # when the child's new memory is installed, a moment before the kernel sets up
            # the environment and command line in it, and /proc shows them empty until then.
            if child.poll() is None and state not in ("", "Z", "X"):
                return True
        elif state not in ("", "Z", "X") and runs_instance(pid, record.instance_id):
            return True
        # Gone, a zombie, or exiting (its environment already torn down): collect it if ours.
        await self._reap(pid)
        return False

    async def stop(self, record: InstanceRecord) -> None:
        """SIGTERM the instance's process group, SIGKILL it after `stop_grace_s`; forget it."""
        pid = int(record.job_id)
        if await self.alive(record):
            self._signal_group(pid, signal.SIGTERM)
            if not await self.wait_gone(record, self.stop_grace_s):
                logger.warning(
                    "instance %s ignored SIGTERM for %g s: killing it",
                    record.instance_id,
                    self.stop_grace_s,
                )
                self._signal_group(pid, signal.SIGKILL)
                if not await self.wait_gone(record, self.kill_wait_s):
                    raise LaunchError(f"instance {record.instance_id} (pid {pid}) survives SIGKILL")
            # Workers the server left behind in its group would hold GPUs and ports.
            self._signal_group(pid, signal.SIGKILL)
            await self._exited(pid)
        self.forget(record)
        logger.info("stopped instance %s (pid %d)", record.instance_id, pid)

    async def _reap(self, pid: int) -> None:
        """Collect the exit status of a child we started that ended, so no zombie stays.

        Only our own Popen objects: a bare waitpid on a pid we did not start here could take
        the exit status of another child of the agent's; others' zombies count as dead. A
        killed process with threads shows as a zombie a moment before waitpid can collect
        it, hence the short, bounded wait.
        """
        child = self._children.get(pid)
        if child is None:
            return
        for _ in range(REAP_TRIES):
            if child.poll() is not None:
                del self._children[pid]
                return
            await asyncio.sleep(REAP_POLL_S)

    async def _exited(self, pid: int) -> None:
        """Wait (bounded) until the process has exited for good, its sockets closed.

        `alive` is already false while it exits: the kernel drops a process's memory, and
        with it the environment that names the instance, before it closes its files.
        """
        for _ in range(math.ceil(self.kill_wait_s / REAP_POLL_S)):
            if process_state(pid) in ("", "Z", "X"):
                break
            await asyncio.sleep(REAP_POLL_S)
        await self._reap(pid)

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> None:
        # The wrapper started a new session, so its pid is also its process group's id.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
