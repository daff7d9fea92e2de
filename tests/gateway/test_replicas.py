"""Two gateway processes behind one Redis: a rate limit holds in total, not per replica."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from redis.asyncio import Redis

from services.access.apikeys import issue_key
from services.devstack.procs import ProcessGroup
from services.devstack.stack import StackConfig, start_service
from tests.faults.privates import free_port
from tests.gateway.conftest import live_site

MODEL = "replica-model"
LIMIT = 6


async def test_requests_per_minute_hold_across_two_gateway_processes(
    tmp_path: Path, new_rabbit_url: Callable[[], str], new_redis_url: Callable[[], str]
) -> None:
    redis_url = new_redis_url()  # its own: the registry entry below must not leak elsewhere
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'first.db'}"
    key = await issue_key(database_url, "replicated")
    async with Redis.from_url(redis_url) as redis:
        await live_site(redis, [MODEL])
    config = StackConfig(
        rabbit_url=new_rabbit_url(),
        redis_url=redis_url,
        database_url=database_url,
        backends={},
        site_id="unused",
        gateway_port=free_port(),
        router_port=free_port(),
        agent_port=free_port(),
        accounting_port=free_port(),
        extra_env={
            "FIRST_ACCESS_MODELS": json.dumps([{"name": MODEL}]),
            "FIRST_ACCESS_USER_LIMITS": json.dumps({"requests_per_minute": LIMIT}),
            # Nobody serves the admitted requests here: they end as 504s after half a second.
            "FIRST_GATEWAY_FIRST_RECORD_TIMEOUT_S": "0.5",
        },
    )
    second = dataclasses.replace(config, gateway_port=free_port())
    group = ProcessGroup(tmp_path / "logs")
    try:
        start_service(group, config, "gateway", timeout_s=60)
        start_service(group, second, "gateway", timeout_s=60)
        if 60 - time.time() % 60 < 8:  # keep the burst inside one minute window
            await asyncio.sleep(60 - time.time() % 60 + 0.1)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=20, trust_env=False) as http:
            replies = await asyncio.gather(
                *(
                    http.post(f"{c.base_url}/chat/completions", json=body, headers=headers)
                    for i in range(16)
                    for c in ((config, second)[i % 2],)
                )
            )
    finally:
        group.stop_all()
    statuses = [r.status_code for r in replies]
    assert statuses.count(429) == 16 - LIMIT, statuses
    assert statuses.count(504) == LIMIT, statuses  # admitted (and published) by either replica
    limited = [r for r in replies if r.status_code == 429]
    assert {r.json()["error"]["code"] for r in limited} == {"rate_limit_exceeded"}
    async with Redis.from_url(redis_url) as redis:
        keys = [k async for k in redis.scan_iter(match="first:quota:requests:user:replicated:*")]
        assert len(keys) == 1
        assert int(await redis.get(keys[0]) or 0) == LIMIT
