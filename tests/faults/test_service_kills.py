"""kill -9 a service mid-load, start it again: every request ends, nothing is billed twice.

The bound on billing: the ledger holds exactly what reached the stream (which the client
got); the backend's generation counter exceeds the ledger by at most the tokens generated
after the last delivered chunk of each request the fault cut, which is at most
`CUT_SLACK` tokens per cut request (the simulator stops when the agent's connection drops).
"""

from __future__ import annotations

import asyncio

from services.devstack.client import Outcome
from tests.faults.conftest import FaultStack, MakeStack, gather_bounded

CUT_SLACK = 2
TOKENS = 48  # ~1 s per stream at 50 tok/s


async def _load(stack: FaultStack, n: int, within_s: float = 90.0) -> asyncio.Task[list[Outcome]]:
    http = stack.client()

    async def run() -> list[Outcome]:
        async with http:
            return await gather_bounded(
                [stack.chat_stream(http, TOKENS) for _ in range(n)], within_s
            )

    return asyncio.create_task(run())


async def _wait_started(stack: FaultStack, at_least: int, within_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while (await stack.sim_stats())["generated_tokens"] < at_least:
        assert asyncio.get_running_loop().time() < deadline, "load never started"
        await asyncio.sleep(0.05)


async def _settled(stack: FaultStack, within_s: float = 20.0) -> dict[str, int]:
    """Wait until the backend runs nothing; return its counters."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        stats = await stack.sim_stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        assert asyncio.get_running_loop().time() < deadline, f"backend still busy: {stats}"
        await asyncio.sleep(0.1)


async def test_killed_site_agent_ends_every_request_and_bills_what_was_delivered(
    make_fault_stack: MakeStack,
) -> None:
    # A small prefetch: some requests are in flight at the kill, others still queued.
    stack = await make_fault_stack(env={"FIRST_SITE_AGENT_PREFETCH": "4"})
    load = await _load(stack, 12)
    await _wait_started(stack, at_least=20)
    stack.kill("site_agent")
    await asyncio.sleep(0.5)
    stack.start("site_agent")
    outcomes = await load

    ids = [o.request_id for o in outcomes]
    assert all(ids), [o.exception or o.error for o in outcomes]
    assert all(o.done for o in outcomes), [o.exception for o in outcomes]  # ended: [DONE]
    cut = [o for o in outcomes if o.error is not None]
    assert cut, "the kill cut no request: the test did not test anything"
    assert all(o.error["code"] == "generation_interrupted" for o in cut)  # type: ignore[index]
    assert all(o.content_chunks == TOKENS for o in outcomes if o.error is None)

    rows = await stack.ledger([i for i in ids if i])
    assert len(rows) == len(outcomes)  # each request billed, once (request_id is the key)
    for outcome in outcomes:
        row = rows[outcome.request_id]  # type: ignore[index]
        assert row.completion_tokens == outcome.content_chunks  # exactly what was delivered
    stats = await _settled(stack)
    billed = sum(r.completion_tokens for r in rows.values())
    assert stats["started"] == len(outcomes)  # nothing generated twice
    assert 0 <= stats["generated_tokens"] - billed <= CUT_SLACK * len(cut)


async def test_killed_router_loses_nothing_and_generates_nothing_twice(
    make_fault_stack: MakeStack,
) -> None:
    """Requests sent while the router is dead wait in its queue and are served after."""
    stack = await make_fault_stack()
    first = await _load(stack, 5)
    await _wait_started(stack, at_least=5)
    stack.kill("router")
    second = await _load(stack, 5)  # admitted by the gateway, queued for the router
    await asyncio.sleep(1.0)
    stack.start("router")
    outcomes = await first + await second

    assert all(o.completed for o in outcomes), [o.exception or o.error for o in outcomes]
    assert all(o.content_chunks == TOKENS for o in outcomes)
    rows = await stack.ledger([o.request_id for o in outcomes])  # type: ignore[misc]
    assert len(rows) == len(outcomes)
    assert all(r.completion_tokens == TOKENS for r in rows.values())
    stats = await _settled(stack)
    assert stats["started"] == len(outcomes)
    assert stats["generated_tokens"] == TOKENS * len(outcomes)


async def test_killed_accounting_counts_every_usage_event_once_after_restart(
    make_fault_stack: MakeStack,
) -> None:
    stack = await make_fault_stack()
    load = await _load(stack, 10)
    await _wait_started(stack, at_least=5)
    stack.kill("accounting")
    outcomes = await load  # serving goes on without accounting
    assert all(o.completed for o in outcomes)
    assert await stack.ledger_count() < len(outcomes)  # their usage events wait in the queue
    stack.start("accounting")
    rows = await stack.ledger([o.request_id for o in outcomes])  # type: ignore[misc]
    assert len(rows) == len(outcomes)
    assert all(r.completion_tokens == TOKENS for r in rows.values())
    await asyncio.sleep(1.0)  # a redelivered event would show up as an extra row by now
    assert await stack.ledger_count() == len(outcomes)


async def test_killed_gateway_drops_its_clients_and_every_generation_is_billed_once(
    make_fault_stack: MakeStack,
) -> None:
    stack = await make_fault_stack()
    load = await _load(stack, 10)
    await _wait_started(stack, at_least=20)
    stack.kill("gateway")
    outcomes = await load
    assert all(o.exception is not None for o in outcomes if not o.completed)
    dropped = [o for o in outcomes if not o.completed]
    assert dropped, "the kill cut no client: the test did not test anything"

    stats = await _settled(stack)  # the generations it left finish on the site
    assert stats["started"] == len(outcomes)
    deadline = asyncio.get_running_loop().time() + 20
    while await stack.ledger_count() < stats["started"]:
        assert asyncio.get_running_loop().time() < deadline, "a generation was never billed"
        await asyncio.sleep(0.2)
    rows = await stack.ledger([o.request_id for o in outcomes if o.request_id])  # type: ignore[misc]
    assert sum(r.completion_tokens for r in rows.values()) <= stats["generated_tokens"]
    assert await stack.ledger_count() == stats["started"]  # once each
    stack.start("gateway")  # and it serves again
    async with stack.client() as http:
        again = await stack.chat_stream(http, 4)
    assert again.completed
