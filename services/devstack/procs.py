"""Child processes that are started, waited for (bounded) and stopped — only the ones we started."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


class StartupError(RuntimeError):
    """A child process died or did not become ready in time."""


@dataclass
class Proc:
    """One started child process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    ready_url: str | None = None
    ready_headers: dict[str, str] = field(default_factory=dict)
    """Sent with the ready check (e.g. the key a relay wants)."""
    needs: list[Proc] = field(default_factory=list)
    """Processes it cannot be ready without: one that exits fails the wait."""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """Processes started together and stopped together, in reverse order."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)
    temp_dirs: list[Path] = field(default_factory=list)
    """Folders removed once every process stopped (e.g. private socket folders)."""

    def start(self, name: str, argv: list[str], env: dict[str, str], ready_url: str | None) -> Proc:
        """Start `argv` with its output in `<log_dir>/<name>.log`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("ab")
        popen = subprocess.Popen(  # each in its own session: Ctrl-C reaches only us
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        log.close()
        proc = Proc(name=name, popen=popen, log_path=log_path, ready_url=ready_url)
        self.procs.append(proc)
        return proc

    def wait_ready(self, proc: Proc, timeout_s: float) -> float:
        """Poll the process's ready URL until 200; return the seconds it took."""
        assert proc.ready_url is not None
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            for needed in (proc, *proc.needs):
                if not needed.alive():
                    code = needed.popen.returncode
                    raise StartupError(f"{needed.name} exited ({code}):\n{needed.tail()}")
            try:
                reply = httpx.get(proc.ready_url, headers=proc.ready_headers, timeout=2.0)
                if reply.status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise StartupError(f"{proc.name} not ready after {timeout_s:.0f}s:\n{proc.tail()}")

    def first_dead(self) -> Proc | None:
        """Return a process that has exited, if any."""
        return next((p for p in self.procs if not p.alive()), None)

    def stop(self, proc: Proc, timeout_s: float = 15.0) -> None:
        """SIGTERM the process's group, then SIGKILL it after `timeout_s`."""
        if proc.alive():
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0fs; killing it", proc.name, timeout_s)
                _signal_group(proc, signal.SIGKILL)
                proc.popen.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        """Stop every process this group started, newest first."""
        for proc in reversed(list(self.procs)):
            self.stop(proc)
        for path in self.temp_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self.temp_dirs.clear()


def _signal_group(proc: Proc, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.popen.pid, sig)
