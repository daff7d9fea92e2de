"""The one interface every launcher implements, and the record of an instance it started.

A launcher only starts, locates, checks and stops; whether an instance is *healthy* (its
`/health` and `/v1/models`) is the pool manager's business, the same for every launcher.

An instance reports where it listens: the job writes its URL to `report_path(instance_id)`
once it has a port (for slurm and pbs the compute node is only known then). Records are kept
as JSON files under `<state_dir>/instances/`, so that an agent that restarts can `recover` the
instances still running instead of starting new ones. For slurm and pbs the state folder must
be on a file system the compute nodes share with the agent.

    <state_dir>/instances/<instance_id>.json   the record (save / saved / forget)
    <state_dir>/reports/<instance_id>.url      the URL the instance reported
    <state_dir>/jobs/<instance_id>.sh          the script that runs it
    <state_dir>/logs/<instance_id>.log         its output (kept after it stops)
    <state_dir>/keys/<instance_id>.key         its key (0600, folder 0700; see instance_keys)

The key is what makes an instance usable: its relay refuses every request without it, and
only this agent (and its successor, which reads it back here) holds it.
"""

from __future__ import annotations

import abc
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import msgspec

from services.site_agent import instance_keys
from services.site_agent.siteconfig import LauncherConfig, Resources

logger = logging.getLogger(__name__)

INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""What an instance id may be: it names files, scheduler jobs and appears in shell scripts."""


@dataclass(frozen=True)
class InstanceSpec:
    """What to start: one instance of one model."""

    instance_id: str
    model: str
    command: tuple[str, ...]
    """The argv template ({uds}, {served_name}, {instance_id} not yet filled in)."""
    env: Mapping[str, str]
    resources: Resources


class InstanceRecord(msgspec.Struct, kw_only=True):
    """An instance a launcher started (persisted; JSON)."""

    instance_id: str
    model: str
    launcher: str
    job_id: str
    """The local process id, or the scheduler's job id."""
    started_at: float
    url: str = ""
    """Where it listens, once it reported it ("" until then)."""


class LaunchError(RuntimeError):
    """The launcher could not start or stop an instance (the scheduler refused, timed out)."""


def check_instance_id(instance_id: str) -> str:
    """Return `instance_id`; raise ValueError unless it matches INSTANCE_ID."""
    if not INSTANCE_ID.fullmatch(instance_id):
        raise ValueError(f"invalid instance id {instance_id!r}: want {INSTANCE_ID.pattern}")
    return instance_id


class Launcher(abc.ABC):
    """Starts and stops instances on one kind of resource manager."""

    kind: ClassVar[str]

    def __init__(self, config: LauncherConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir

    @abc.abstractmethod
    async def start(self, spec: InstanceSpec) -> InstanceRecord:
        """Start (or submit) the instance and persist its record; its url may still be ""."""

    @abc.abstractmethod
    async def locate(self, record: InstanceRecord) -> str:
        """Return the instance's URL once it reported one ("" while it has not)."""

    @abc.abstractmethod
    async def alive(self, record: InstanceRecord) -> bool:
        """Tell whether its process or job is still queued or running."""

    @abc.abstractmethod
    async def stop(self, record: InstanceRecord) -> None:
        """Stop it (bounded; a process that ignores SIGTERM is killed) and forget its record."""

    @abc.abstractmethod
    async def recover(self) -> list[InstanceRecord]:
        """Return the persisted instances that are still alive; forget the others."""

    # Files of an instance, shared by every launcher (see the module docstring).

    def record_path(self, instance_id: str) -> Path:
        """Return where the record of `instance_id` is kept."""
        return self.state_dir / "instances" / f"{check_instance_id(instance_id)}.json"

    def report_path(self, instance_id: str) -> Path:
        """Return the file the instance writes its URL to."""
        return self.state_dir / "reports" / f"{check_instance_id(instance_id)}.url"

    def script_path(self, instance_id: str) -> Path:
        """Return where the script that runs the instance is written."""
        return self.state_dir / "jobs" / f"{check_instance_id(instance_id)}.sh"

    def log_path(self, instance_id: str) -> Path:
        """Return the instance's log file."""
        return self.state_dir / "logs" / f"{check_instance_id(instance_id)}.log"

    def key_path(self, instance_id: str) -> Path:
        """Return the file that holds the instance's key."""
        return self.state_dir / "keys" / f"{check_instance_id(instance_id)}.key"

    def key(self, record: InstanceRecord) -> str:
        """Return the instance's key; LaunchError when its file is missing or open to others."""
        try:
            return instance_keys.read_key(self.key_path(record.instance_id))
        except instance_keys.KeyFileError as exc:
            raise LaunchError(f"instance {record.instance_id}: {exc}") from exc

    def save(self, record: InstanceRecord) -> None:
        """Persist `record` atomically (a reader never sees half a file)."""
        path = self.record_path(record.instance_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(msgspec.json.encode(record))
        tmp.replace(path)

    def saved(self) -> list[InstanceRecord]:
        """Return the persisted records of this launcher's kind (unreadable files are skipped)."""
        records = []
        for path in sorted((self.state_dir / "instances").glob("*.json")):
            try:
                record = msgspec.json.decode(path.read_bytes(), type=InstanceRecord)
            except (OSError, msgspec.DecodeError) as exc:
                # Left in place for a person to look at; it names no instance we can manage.
                logger.warning("skipping instance record %s: %s", path, exc)
                continue
            if record.launcher == self.kind:
                records.append(record)
            else:
                logger.warning(
                    "instance %s was started by the %s launcher, not %s: left alone",
                    record.instance_id,
                    record.launcher,
                    self.kind,
                )
        return records

    def forget(self, record: InstanceRecord) -> None:
        """Delete the record, report and key of an instance that is gone (its log stays)."""
        for path in (
            self.record_path(record.instance_id),
            self.report_path(record.instance_id),
            self.key_path(record.instance_id),
        ):
            path.unlink(missing_ok=True)
