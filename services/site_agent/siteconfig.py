"""A site's configuration file (TOML or YAML): what it may serve, how, and within which limits.

    site_id = "polaris"
    state_dir = "/lus/project/first/polaris"     # instance records survive agent restarts here

    [launcher]
    kind = "slurm"                 # local | slurm | pbs
    partition = "debug"            # (pbs: the queue)
    account = "MyProject"
    walltime = "04:00:00"
    directives = ["--gres=gpu:4"]  # extra #SBATCH / #PBS lines

    [models."meta-llama/Llama-3.1-8B-Instruct"]
    command = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/llama",
               "--served-model-name", "{served_name}", "--uds", "{uds}"]
    resources = { cpus = 16, memory_gb = 64, gpus = 4 }
    max_instances = 2      # at most this many instances at once
    max_concurrency = 16   # requests one instance takes at once (the heartbeat's capacity)
    min_hot = 1            # keep this many running even when idle
    idle_ttl_s = 900       # unload an instance (above min_hot) idle this long
    scale_up_waiting = 4   # start another instance while waiting requests per instance exceed this
    start_timeout_s = 900  # an instance not healthy by then is stopped and the start failed

`command` is an argv template: `{uds}`, `{served_name}` and `{instance_id}` are filled in by the
launcher when the instance starts. The server must listen only on the Unix socket `{uds}`, in
a folder no other user may enter; the launcher puts an authenticating relay on the node's
host and port in front of it, which wants the instance's key on every request (see
launchers/script.py and relay.py). A command naming `{host}` or `{port}` is refused.

A model may instead (or also) list `urls` of instances someone else runs: those are always
there, never started or stopped. `api_key_file` names a file (0600) with the key they want
as `Authorization: Bearer`; the agent sends it with every request and probe.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    """What one instance asks the scheduler for."""

    cpus: int = 1
    memory_gb: float = 4.0
    gpus: int = 0


class ModelConfig(_Strict):
    """How one served model runs on this site."""

    command: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    resources: Resources = Resources()
    urls: tuple[str, ...] = ()
    api_key_file: Path | None = None
    """The key the `urls` instances want (a 0600 file); none: they are sent no key."""
    max_instances: int = Field(default=1, ge=0)
    max_concurrency: int = Field(default=8, ge=1)
    min_hot: int = Field(default=0, ge=0)
    idle_ttl_s: float = Field(default=900.0, gt=0)
    scale_up_waiting: int = Field(default=4, ge=0)
    start_timeout_s: float = Field(default=900.0, gt=0)

    @model_validator(mode="after")
    def _startable(self) -> ModelConfig:
        if not self.command and not self.urls:
            raise ValueError("a model needs a `command` to start it or `urls` of running instances")
        if self.min_hot > self.max_instances and self.command:
            raise ValueError("min_hot cannot exceed max_instances")
        return self


class LauncherConfig(_Strict):
    """Which launcher starts instances, and the scheduler options of slurm and pbs."""

    kind: Literal["local", "slurm", "pbs"] = "local"
    partition: str = ""
    """Slurm partition, or PBS queue."""
    account: str = ""
    walltime: str = "01:00:00"
    directives: tuple[str, ...] = ()
    """Extra scheduler lines, e.g. "--gres=gpu:4" (slurm) or "-l filesystems=home" (pbs)."""
    host: str = ""
    """The address instances listen on and are reached at; empty: 127.0.0.1 for local, the
    compute node's hostname for slurm and pbs."""
    submit_timeout_s: float = 30.0
    """Bound on one sbatch/qsub/scancel/qdel/scontrol/qstat call."""
    relay_command: tuple[str, ...] = ()
    """How a job runs the authenticating relay (services/site_agent/relay.py); empty: the
    agent's own Python, `-m services.site_agent.relay` (its path must exist on the nodes)."""


class SiteConfig(_Strict):
    """One site agent's whole configuration."""

    site_id: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    """Letters, digits, - and _: it is part of queue names and routing keys (dot-separated)."""
    state_dir: Path = Path(".first/site")
    launcher: LauncherConfig = LauncherConfig()
    heartbeat_interval_s: float | None = None
    """Overrides FIRST_SITE_AGENT_HEARTBEAT_INTERVAL_S when set."""
    models: dict[str, ModelConfig] = Field(default_factory=dict)


def load_site_config(path: Path) -> SiteConfig:
    """Read a site file (.toml, or .yaml/.yml); raise ValueError naming what is wrong."""
    text = path.read_text()
    data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else tomllib.loads(text)
    return SiteConfig.model_validate(data)
