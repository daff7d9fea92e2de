"""A whole stack over the simulated vLLM, with its own Redis (and RabbitMQ when asked), to break.

Every fault test gets a fresh stack: services as processes (`python -m services.<name>`), a
`first sim-vllm` backend, a private Redis server, and either a fresh vhost on the shared
RabbitMQ or a private RabbitMQ node that the test may stop and restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.access.apikeys import issue_key
from services.accounting.ledger import LedgerEntry, get_usage
from services.common.db import make_engine
from services.devstack.client import Outcome, stream
from services.devstack.procs import Proc, ProcessGroup
from services.devstack.stack import StackConfig, start_service
from tests.faults.privates import PrivateRabbit, PrivateRedis, free_port

MODEL = "sim"


@dataclass
class FaultStack:
    """A running stack and the handles to break it."""

    config: StackConfig
    group: ProcessGroup
    procs: dict[str, Proc]
    sim: Proc
    sim_url: str
    api_key: str
    database_url: str
    redis: PrivateRedis
    rabbit: PrivateRabbit | None

    def kill(self, name: str) -> None:
        """kill -9 one service (no chance to clean up)."""
        proc = self.procs.pop(name)
        os.kill(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(10)
        self.group.procs.remove(proc)

    def start(self, name: str) -> None:
        """Start one service again and wait until it is ready."""
        self.procs[name] = start_service(self.group, self.config, name, timeout_s=90)

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}

    def client(self, timeout_s: float = 60.0) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        return httpx.AsyncClient(
            base_url=self.config.base_url, timeout=timeout_s, limits=limits, trust_env=False
        )

    async def sim_stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.sim_url, timeout=5, trust_env=False) as http:
            stats: dict[str, Any] = (await http.get("/sim/stats")).json()
            return stats

    async def set_faults(self, **faults: Any) -> None:
        async with httpx.AsyncClient(base_url=self.sim_url, timeout=5, trust_env=False) as http:
            (await http.post("/sim/faults", json=faults)).raise_for_status()

    async def chat_stream(self, http: httpx.AsyncClient, max_tokens: int, **extra: Any) -> Outcome:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "fault test"}],
            "max_tokens": max_tokens,
            "stream": True,
            **extra,
        }
        return await stream(http, "/chat/completions", body, self.headers())

    async def ledger(
        self, request_ids: list[str], within_s: float = 30.0
    ) -> dict[str, LedgerEntry]:
        """Wait until the ledger has a row for each id; return them."""
        return await wait_ledger(self.database_url, request_ids, within_s)

    async def ledger_count(self) -> int:
        engine = make_engine(self.database_url)
        try:
            async with engine.connect() as conn:
                result = await conn.exec_driver_sql("SELECT COUNT(*) FROM usage_ledger")
                return int(result.scalar_one())
        finally:
            await engine.dispose()


async def wait_ledger(
    database_url: str, request_ids: list[str], within_s: float = 30.0
) -> dict[str, LedgerEntry]:
    """Wait until the ledger has a row for each id (bounded); return the rows found."""
    engine = make_engine(database_url)
    try:
        deadline = time.monotonic() + within_s
        while True:
            rows = {r: await get_usage(engine, r) for r in request_ids}
            found = {r: row for r, row in rows.items() if row is not None}
            if len(found) == len(request_ids) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.2)
    finally:
        await engine.dispose()


def _start_sim(group: ProcessGroup, port: int, options: dict[str, Any]) -> Proc:
    env = dict(os.environ)
    env.update({f"FIRST_SIM_VLLM_{k.upper()}": str(v) for k, v in options.items()})
    env.update({"FIRST_SIM_VLLM_PORT": str(port), "FIRST_SIM_VLLM_MODEL": MODEL})
    proc = group.start(
        "sim-vllm",
        [sys.executable, "-m", "services.sim_vllm"],
        env,
        f"http://127.0.0.1:{port}/health",
    )
    group.wait_ready(proc, 30)
    return proc


MakeStack = Callable[..., Awaitable[FaultStack]]


@pytest.fixture
def make_fault_stack(
    tmp_path: Path, new_rabbit_url: Callable[[], str]
) -> Iterator[Callable[..., Awaitable[FaultStack]]]:
    """Build a stack; `private_rabbit=True` gives it a RabbitMQ node it may restart."""
    groups: list[ProcessGroup] = []
    privates: list[PrivateRedis | PrivateRabbit] = []

    async def make(
        *,
        private_rabbit: bool = False,
        sim: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        services: tuple[str, ...] = ("accounting", "router", "site_agent", "gateway"),
    ) -> FaultStack:
        group = ProcessGroup(tmp_path / "logs")
        groups.append(group)
        redis = PrivateRedis(tmp_path)
        redis.start()
        privates.append(redis)
        rabbit: PrivateRabbit | None = None
        if private_rabbit:
            rabbit = PrivateRabbit()
            privates.append(rabbit)
            rabbit.start()
        sim_port = free_port()
        sim_proc = _start_sim(
            group, sim_port, {"tokens_per_s": 50, "ttft_ms": 20, "slots": 64, **(sim or {})}
        )
        sim_url = f"http://127.0.0.1:{sim_port}"
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'first.db'}"
        config = StackConfig(
            rabbit_url=rabbit.url if rabbit else new_rabbit_url(),
            redis_url=redis.url,
            database_url=database_url,
            backends={MODEL: [sim_url]},
            site_id="fault",
            gateway_port=free_port(),
            router_port=free_port(),
            agent_port=free_port(),
            accounting_port=free_port(),
            batch_worker_port=free_port(),
            files_dir=str(tmp_path / "files"),
            extra_env={
                "FIRST_ACCESS_MODELS": json.dumps([{"name": MODEL}]),
                "FIRST_SITE_AGENT_HEARTBEAT_INTERVAL_S": "0.5",
                "FIRST_SITE_AGENT_CLAIM_TTL_S": "3",
                "FIRST_SITE_AGENT_RETRY_DELAY_S": "0.5",
                **(env or {}),
            },
        )
        procs = {name: start_service(group, config, name, timeout_s=90) for name in services}
        key = await issue_key(database_url, "fault-user")
        return FaultStack(config, group, procs, sim_proc, sim_url, key, database_url, redis, rabbit)

    yield make
    for group in groups:
        group.stop_all()
    for private in privates:
        if isinstance(private, PrivateRabbit):
            private.remove()
        else:
            private.stop(kill=True)


async def gather_bounded(coros: list[Any], within_s: float) -> list[Outcome]:
    """Run the clients concurrently; fail (not hang) if any has not ended after `within_s`."""
    results: list[Outcome] = await asyncio.wait_for(asyncio.gather(*coros), within_s)
    return results
