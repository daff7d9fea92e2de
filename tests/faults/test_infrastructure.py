"""Restart Redis, restart RabbitMQ, each mid-load: every accepted request ends and is billed once.

Clients see either their full answer or a clear error (an HTTP 503 or an SSE error event
followed by [DONE]); none hangs: every client is bounded by `gather_bounded`.
"""

from __future__ import annotations

import asyncio

from services.devstack.client import Outcome
from tests.faults.conftest import FaultStack, MakeStack, gather_bounded

TOKENS = 48


async def _wait_generated(stack: FaultStack, at_least: int, within_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while (await stack.sim_stats())["generated_tokens"] < at_least:
        assert asyncio.get_running_loop().time() < deadline, "load never started"
        await asyncio.sleep(0.05)


def _ended_clearly(outcome: Outcome) -> bool:
    """Full answer, or an error the client can read: an HTTP error or an SSE error + [DONE]."""
    if outcome.completed:
        return True
    if outcome.status is not None and outcome.status >= 400:
        return outcome.error is not None
    return outcome.done and outcome.error is not None


async def _billed_once(stack: FaultStack, outcomes: list[Outcome]) -> None:
    accepted = [o.request_id for o in outcomes if o.request_id]
    rows = await stack.ledger(accepted, within_s=60)
    assert set(rows) == set(accepted), "an accepted request was never billed"
    assert await stack.ledger_count() == len(rows)  # one row per request, no strays
    stats = await stack.sim_stats()
    for outcome in outcomes:
        if outcome.request_id and outcome.completed:
            assert rows[outcome.request_id].completion_tokens == outcome.content_chunks
    assert sum(r.completion_tokens for r in rows.values()) <= stats["generated_tokens"]


async def test_redis_restart_mid_load(make_fault_stack: MakeStack) -> None:
    stack = await make_fault_stack()
    async with stack.client() as http:
        clients = [stack.chat_stream(http, TOKENS) for _ in range(10)]
        load: asyncio.Task[list[Outcome]] = asyncio.create_task(gather_bounded(clients, 90))
        await _wait_generated(stack, at_least=20)
        stack.redis.stop()
        await asyncio.sleep(1.0)
        stack.redis.start()
        outcomes = await load
        assert all(_ended_clearly(o) for o in outcomes), [
            (o.status, o.error, o.exception) for o in outcomes
        ]
        await _billed_once(stack, outcomes)
        after = await stack.chat_stream(http, 4)  # the stack recovers by itself
    assert after.completed, (after.status, after.error, after.exception)


async def test_rabbitmq_restart_mid_load(make_fault_stack: MakeStack) -> None:
    stack = await make_fault_stack(private_rabbit=True)
    assert stack.rabbit is not None
    async with stack.client() as http:
        clients = [stack.chat_stream(http, TOKENS) for _ in range(10)]
        load: asyncio.Task[list[Outcome]] = asyncio.create_task(gather_bounded(clients, 120))
        await _wait_generated(stack, at_least=20)
        stack.rabbit.stop()
        during = await stack.chat_stream(http, 4)  # admission fails clearly while it is down
        stack.rabbit.start()
        outcomes = await load
        assert _ended_clearly(during)
        assert during.status == 503, (during.status, during.error)
        assert all(_ended_clearly(o) for o in outcomes), [
            (o.status, o.error, o.exception) for o in outcomes
        ]
        await _billed_once(stack, outcomes)
        deadline = asyncio.get_running_loop().time() + 60
        while not (after := await stack.chat_stream(http, 4)).completed:  # reconnects by itself
            assert asyncio.get_running_loop().time() < deadline, (after.status, after.error)
            await asyncio.sleep(1.0)
