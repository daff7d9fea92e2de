"""The Redis client factory: bounded waits, retries, and a pool that queues under a burst."""

from __future__ import annotations

import asyncio

from services.common.redis import make_redis


async def test_a_busy_pool_makes_commands_wait_for_a_connection_instead_of_failing(
    redis_url: str,
) -> None:
    client = make_redis(redis_url, max_connections=2)
    try:
        # 20 commands that each hold a connection for 50 ms, through a pool of 2.
        replies = await asyncio.gather(*(client.blpop([f"nothing-{i}"], 0.05) for i in range(20)))
    finally:
        await client.aclose()
    assert replies == [None] * 20
