"""The slurm launcher: each instance is a batch job (`sbatch`) whose script is the wrapper.

Job state comes from `scontrol show job`, not `sacct`: accounting is often off (and is on
the test cluster), and scontrol asks the controller, which knows a job until MinJobAge
(300 s by default) after it ended; past that it answers "Invalid job id", which means gone.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from services.site_agent.launchers.base import InstanceSpec, LaunchError
from services.site_agent.launchers.script import BatchLauncher
from services.site_agent.siteconfig import LauncherConfig

ALIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        # Still held by Slurm, and so still ours to cancel:
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
    }
)
_JOB_STATE = re.compile(r"(?:^|\s)JobState=(\S+)")
_JOB_ID = re.compile(r"\d+(?:_\d+)?")


def sbatch_script(spec: InstanceSpec, config: LauncherConfig, log: Path, body: str) -> str:
    """Return the batch script: #SBATCH lines from the spec and site, then the wrapper body."""
    res = spec.resources
    if any(c.isspace() for c in str(log)):
        raise ValueError(f"an #SBATCH --output path cannot hold blanks: {str(log)!r}")
    options = [
        f"--job-name=first-{spec.instance_id}",
        *([f"--partition={config.partition}"] if config.partition else []),
        *([f"--account={config.account}"] if config.account else []),
        f"--time={config.walltime}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={res.cpus}",
        f"--mem={math.ceil(res.memory_gb * 1024)}M",
        *([f"--gres=gpu:{res.gpus}"] if res.gpus > 0 else []),
        f"--output={log}",
        *config.directives,
    ]
    lines = ["#!/bin/bash"]
    for option in options:
        # A line break would end the directive and put the rest into the script's body.
        if "\n" in option or "\r" in option:
            raise ValueError(f"sbatch option {option!r} spans lines")
        lines.append(option if option.startswith("#SBATCH") else f"#SBATCH {option}")
    return "\n".join(lines) + "\n" + body


def parse_sbatch(stdout: str) -> str:
    """Return the job id `sbatch --parsable` printed ("<id>" or "<id>;<cluster>")."""
    lines = stdout.strip().splitlines()
    job_id = lines[-1].split(";")[0].strip() if lines else ""
    if not _JOB_ID.fullmatch(job_id):
        raise LaunchError(f"sbatch printed no job id: {stdout.strip()[:200]!r}")
    return job_id


def parse_job_state(output: str) -> str:
    """Return the JobState in `scontrol show job` output ("" if it names none)."""
    match = _JOB_STATE.search(output)
    return match.group(1) if match else ""


class SlurmLauncher(BatchLauncher):
    """Submits each instance as a Slurm batch job; its URL is the node's host and a port."""

    kind = "slurm"
    scheduler = "Slurm"
    submit_cmd = ("sbatch", "--parsable")
    state_cmd = ("scontrol", "show", "job")
    cancel_cmd = ("scancel",)
    alive_states = ALIVE_STATES
    gone_markers = ("invalid job id", "already completing or completed")

    def batch_script(self, spec: InstanceSpec, log: Path, body: str) -> str:
        """Return the sbatch script of `spec`."""
        return sbatch_script(spec, self.config, log, body)

    def parse_submit(self, stdout: str) -> str:
        """Return the job id sbatch printed."""
        return parse_sbatch(stdout)

    def parse_state(self, stdout: str) -> str:
        """Return the JobState scontrol printed."""
        return parse_job_state(stdout)
