"""The supervisor file, and the command a lease runs.

The supervisor file (TOML; durations in seconds; defaults shown where optional):

    [supervisor]                # optional
    tick_s = 5.0                # how often heartbeats are read and decisions taken
    lock_ttl_s = 30.0           # a dead holder's standby takes over after this (>= 3 ticks)
    submit_timeout_s = 60.0     # bound on building one executor and on one submit

    [[sites]]
    site_id = "polaris"         # also exported as FIRST_SITE_AGENT_SITE_ID (heartbeats match it)
    endpoint_id = "4b116d3c-1703-4f8f-9f6f-39921e5864df"
    command = ". ~/first/env.sh && exec first site-agent"   # env.sh: venv, secrets (set -a)
    env = { FIRST_SITE_AGENT_PORT = "0" }  # plain settings only (the line is stored by Globus)
    lease_s = 21600             # a lease gets SIGTERM after this long
    overlap_s = 600             # the next lease is submitted this long before that
    kill_after_s = 30           # SIGKILL this long after SIGTERM
    walltime_s = 21700          # the ShellFunction's (default lease_s + kill_after_s + 60)
    stale_after_s = 30          # an older heartbeat, or none, means the agent is gone...
    boot_grace_s = 900          # ...except this long after a submit (endpoint queue + boot)
    backoff_s = 30              # pause before a 2nd quick resubmit, doubling...
    backoff_max_s = 1800        # ...up to this
    stdout = "/home/me/first/agent.out"  # default: the task's sandbox; a path is appended to
    stderr = "/home/me/first/agent.err"  # by every lease, and read whole when each one ends

Each lease runs `exec env FIRST_SITE_AGENT_SITE_ID=<site> <env...> timeout --signal=TERM
--kill-after=<kill_after_s> <lease_s> bash -c '<command>'`. Secrets (FIRST_RABBIT_URL with its
password) belong in a file on the cluster that `command` sources, never in `env`: the command line
is stored by Globus. Overlapping leases may run on one node, so give the agent `PORT=0` (or
distinct ports). The agent needs outbound TCP to RabbitMQ and Redis from wherever the endpoint
runs tasks; the supervisor needs Redis and HTTPS/AMQPS (443, 5671) to Globus.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, model_validator

SNIPPET_LINES: Final = 50
"""Lines of the agent's stdout/stderr a finished task returns (results are capped at 10 MiB)."""
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteSpec(_Strict):
    """One site: where its agent runs and how its leases are timed."""

    site_id: str = Field(min_length=1)
    endpoint_id: str = Field(min_length=1)
    command: str = "exec first site-agent"
    env: dict[str, str] = Field(default_factory=dict)
    lease_s: float = Field(default=6 * 3600.0, gt=0)
    overlap_s: float = Field(default=600.0, ge=0)
    kill_after_s: float = Field(default=30.0, gt=0)
    walltime_s: float | None = Field(default=None, gt=0)
    stale_after_s: float = Field(default=30.0, gt=0)
    boot_grace_s: float = Field(default=900.0, ge=0)
    backoff_s: float = Field(default=30.0, ge=0)
    backoff_max_s: float = Field(default=1800.0, ge=0)
    stdout: str | None = None
    stderr: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SiteSpec:
        if self.overlap_s >= self.lease_s:
            raise ValueError("overlap_s must be shorter than lease_s")
        if self.walltime_s is not None and self.walltime_s <= self.lease_s + self.kill_after_s:
            # ShellFunction stops *waiting* at its walltime but leaves the process running.
            raise ValueError("walltime_s must exceed lease_s + kill_after_s")
        bad = [k for k in self.env if not _ENV_NAME.fullmatch(k)]
        if bad:
            raise ValueError(f"not environment variable names: {bad}")
        if self.env.get("FIRST_SITE_AGENT_SITE_ID", self.site_id) != self.site_id:
            raise ValueError("env FIRST_SITE_AGENT_SITE_ID differs from site_id")
        return self

    def walltime(self) -> float:
        """Return the ShellFunction walltime: past the lease's SIGTERM and SIGKILL."""
        return self.walltime_s or self.lease_s + self.kill_after_s + 60.0


class SupervisorOptions(_Strict):
    """How often the supervisor looks, and how long its lock lasts."""

    tick_s: float = Field(default=5.0, gt=0)
    lock_ttl_s: float = Field(default=30.0, gt=0)
    submit_timeout_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _renewable(self) -> SupervisorOptions:
        if self.lock_ttl_s < 3 * self.tick_s:
            raise ValueError("lock_ttl_s must be at least 3 x tick_s (renewed once per tick)")
        return self


class SupervisorConfig(_Strict):
    """A whole supervisor file."""

    supervisor: SupervisorOptions = SupervisorOptions()
    sites: tuple[SiteSpec, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> SupervisorConfig:
        ids = [s.site_id for s in self.sites]
        if len(set(ids)) != len(ids):
            raise ValueError("site_id listed twice")
        return self


def load_config(path: Path) -> SupervisorConfig:
    """Read a supervisor file; raise ValueError naming what is wrong."""
    return SupervisorConfig.model_validate(tomllib.loads(path.read_text()))


def _secs(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") + "s"


def lease_command(spec: SiteSpec) -> str:
    """Return the shell line of one lease: the agent's command, ended before the walltime."""
    env = {**spec.env, "FIRST_SITE_AGENT_SITE_ID": spec.site_id}
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    return (
        f"exec env {assignments} timeout --signal=TERM --kill-after={_secs(spec.kill_after_s)} "
        f"{_secs(spec.lease_s)} bash -c {shlex.quote(spec.command)}"
    )


def lease_function(spec: SiteSpec) -> Callable[[], object]:
    """Return the ShellFunction of `spec`'s leases (the SDK is imported only here)."""
    from globus_compute_sdk import ShellFunction

    # ShellFunction runs `cmd.format(**kwargs)` even without kwargs: braces (JSON settings)
    # are doubled to reach the shell as they are.
    template = lease_command(spec).replace("{", "{{").replace("}", "}}")
    function: Callable[[], object] = ShellFunction(
        template,
        walltime=spec.walltime(),
        stdout=spec.stdout,
        stderr=spec.stderr,
        snippet_lines=SNIPPET_LINES,
        name="first_site_agent",
    )
    return function
