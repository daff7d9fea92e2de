"""The pbs launcher: each instance is a PBS batch job (`qsub`) whose script is the wrapper.

Written for PBS Professional / OpenPBS (the `select` resource syntax); the outputs of
Torque's `qsub`, `qstat -f` and `qdel` are read as well. Sites whose resources need other
lines add them as `directives`. PBS copies the job's output to the log file when the job
ends, not while it runs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from services.site_agent.launchers.base import InstanceSpec, LaunchError
from services.site_agent.launchers.script import BatchLauncher
from services.site_agent.siteconfig import LauncherConfig

ALIVE_STATES = frozenset("QRHWTESUB")
"""Queued, Running, Held, Waiting, Transit, Exiting, Suspended, User-suspended, Begun (an
array). The others mean the job is over: F finished, C completed (Torque), X expired, M moved."""
_JOB_STATE = re.compile(r"^\s*job_state\s*=\s*(\w)", re.MULTILINE)
_JOB_ID = re.compile(r"\d+(?:\[\d*\])?(?:\.[A-Za-z0-9._-]+)?")


def qsub_script(spec: InstanceSpec, config: LauncherConfig, log: Path, body: str) -> str:
    """Return the batch script: #PBS lines from the spec and site, then the wrapper body."""
    res = spec.resources
    if any(c.isspace() for c in str(log)):
        raise ValueError(f"PBS cannot write its output to a path with blanks: {str(log)!r}")
    chunk = f"select=1:ncpus={res.cpus}:mem={math.ceil(res.memory_gb * 1024)}mb"
    if res.gpus > 0:
        chunk += f":ngpus={res.gpus}"
    options = [
        f"-N first-{spec.instance_id}",
        *([f"-q {config.partition}"] if config.partition else []),
        *([f"-A {config.account}"] if config.account else []),
        f"-l walltime={config.walltime}",
        f"-l {chunk}",
        "-j oe",
        f"-o {log}",
        # Like sbatch's default: the instance sees the agent's environment (minus FIRST_*).
        "-V",
        *config.directives,
    ]
    lines = ["#!/bin/bash"]
    for option in options:
        # A line break would end the directive and put the rest into the script's body.
        if "\n" in option or "\r" in option:
            raise ValueError(f"qsub option {option!r} spans lines")
        lines.append(option if option.startswith("#PBS") else f"#PBS {option}")
    # PBS starts a job in the home folder; Slurm in the folder it was submitted from.
    lines.append('cd "${PBS_O_WORKDIR:-.}"')
    return "\n".join(lines) + "\n" + body


def parse_qsub(stdout: str) -> str:
    """Return the job id qsub printed ("1234.server"; PBS Pro and Torque alike)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    job_id = lines[-1] if lines else ""
    if not _JOB_ID.fullmatch(job_id):
        raise LaunchError(f"qsub printed no job id: {stdout.strip()[:200]!r}")
    return job_id


def parse_job_state(output: str) -> str:
    """Return the one-letter job_state in `qstat -f` output ("" if it names none)."""
    match = _JOB_STATE.search(output)
    return match.group(1) if match else ""


class PbsLauncher(BatchLauncher):
    """Submits each instance as a PBS job; its URL is the node's host and a port."""

    kind = "pbs"
    scheduler = "PBS"
    submit_cmd = ("qsub",)
    state_cmd = ("qstat", "-f")
    cancel_cmd = ("qdel",)
    alive_states = ALIVE_STATES
    # PBS Pro: "Unknown Job Id", "... Job has finished, use -x or -H ..."; Torque: "Unknown
    # Job Id Error", and qdel of a finished job "invalid state for job - COMPLETE".
    gone_markers = ("unknown job id", "has finished", "invalid state for job - complete")

    def batch_script(self, spec: InstanceSpec, log: Path, body: str) -> str:
        """Return the qsub script of `spec`."""
        return qsub_script(spec, self.config, log, body)

    def parse_submit(self, stdout: str) -> str:
        """Return the job id qsub printed."""
        return parse_qsub(stdout)

    def parse_state(self, stdout: str) -> str:
        """Return the job_state qstat printed."""
        return parse_job_state(stdout)
