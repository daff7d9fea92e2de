"""Launchers start, find, check and stop vLLM instances: local processes, Slurm or PBS jobs."""

from __future__ import annotations

from pathlib import Path

from services.site_agent.launchers.base import (
    InstanceRecord,
    InstanceSpec,
    Launcher,
    LaunchError,
)
from services.site_agent.launchers.health import probe_instance
from services.site_agent.launchers.local import LocalLauncher
from services.site_agent.launchers.pbs import PbsLauncher
from services.site_agent.launchers.slurm import SlurmLauncher
from services.site_agent.siteconfig import LauncherConfig

LAUNCHERS: dict[str, type[Launcher]] = {
    cls.kind: cls for cls in (LocalLauncher, SlurmLauncher, PbsLauncher)
}


def make_launcher(config: LauncherConfig, state_dir: Path) -> Launcher:
    """Return the launcher of `config.kind`, keeping its files under `state_dir`."""
    return LAUNCHERS[config.kind](config, state_dir)


__all__ = [
    "LAUNCHERS",
    "InstanceRecord",
    "InstanceSpec",
    "LaunchError",
    "Launcher",
    "make_launcher",
    "probe_instance",
]
