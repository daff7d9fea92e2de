"""The backend dies mid-stream; the client hangs up mid-stream; poison on every queue."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import httpx

from schemas import names
from tests.faults.conftest import MODEL, MakeStack


async def test_backend_dying_mid_stream_gives_an_openai_error_event_then_done(
    make_fault_stack: MakeStack,
) -> None:
    stack = await make_fault_stack(sim={"close_after_tokens": 5})
    async with stack.client() as http:
        outcome = await asyncio.wait_for(stack.chat_stream(http, 32), 30)
    assert outcome.status == 200
    assert outcome.content_chunks == 5
    assert outcome.error is not None
    assert set(outcome.error) == {"message", "type", "param", "code"}
    assert outcome.done  # the error event is followed by [DONE]
    rows = await stack.ledger([outcome.request_id])  # type: ignore[list-item]
    row = rows[outcome.request_id]  # type: ignore[index]
    assert (row.outcome, row.completion_tokens) == ("failed", 5)  # what was delivered


async def _running(sim: httpx.AsyncClient) -> float:
    for line in (await sim.get("/metrics")).text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:num_requests_running in /metrics")


async def test_client_disconnect_aborts_the_backend_within_a_second_and_bills_the_tokens(
    make_fault_stack: MakeStack,
) -> None:
    stack = await make_fault_stack(sim={"tokens_per_s": 20})
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a long answer please"}],
        "max_tokens": 400,
        "stream": True,
    }
    headers = stack.headers()
    async with (
        stack.client() as http,
        httpx.AsyncClient(base_url=stack.sim_url, timeout=5, trust_env=False) as sim,
    ):
        received = 0
        async with http.stream("POST", "/chat/completions", json=body, headers=headers) as r:
            request_id = r.headers["x-request-id"]
            async for line in r.aiter_lines():
                if (
                    line.startswith("data: {")
                    and '"content":"' in line
                    and '"content":""' not in line
                ):
                    received += 1
                if received == 5:
                    break
            assert await _running(sim) == 1
        hung_up = time.monotonic()  # leaving the block closed the connection
        while await _running(sim) != 0:
            assert time.monotonic() - hung_up < 1.0, "the backend still generates 1 s after"
            await asyncio.sleep(0.02)
    stats = await stack.sim_stats()
    assert stats["aborted"] == 1
    rows = await stack.ledger([request_id])
    row = rows[request_id]
    assert row.outcome == "cancelled"
    assert received <= row.completion_tokens <= stats["generated_tokens"]
    assert row.completion_tokens < 400


async def test_poison_on_every_queue_is_dead_lettered_once_and_service_goes_on(
    make_fault_stack: MakeStack,
) -> None:
    stack = await make_fault_stack()
    queues = [
        names.ROUTER_REQUESTS_QUEUE,
        names.site_queue("fault", "interactive"),
        names.site_queue("fault", "batch"),
        names.ACCOUNTING_USAGE_QUEUE,
    ]
    connection = await aio_pika.connect(stack.config.rabbit_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        dead = await channel.declare_queue(names.DEAD_QUEUE, passive=True)
        before = dead.declaration_result.message_count
        poisons = [
            (b"\xc1 not msgpack", None),  # garbage
            (b"\x81\xa4type\xa5Nope!", None),  # msgpack with an unknown tag
            (b"{not json", "application/json"),  # labelled JSON, is not: still ours to reject
        ]
        for queue in queues:
            for poison, content_type in poisons:
                message = aio_pika.Message(
                    poison,
                    content_type=content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await channel.default_exchange.publish(message, routing_key=queue, timeout=5)
        # The router consumes first.dead: it logs each dead letter once (and ends a dead
        # request's stream), then acks it. Count its log lines.
        log = stack.group.log_dir / "router.log"
        expected = len(poisons) * len(queues)
        deadline = time.monotonic() + 15
        while (logged := log.read_text().count('"dead letter: ')) < expected:
            assert time.monotonic() < deadline, f"dead letters logged so far: {logged}"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # a requeue loop would log more by now
        assert log.read_text().count('"dead letter: ') == expected
        dead = await channel.declare_queue(names.DEAD_QUEUE, passive=True)
        assert dead.declaration_result.message_count == before
        for queue in queues:  # nothing requeued forever: every source queue is empty
            source = await channel.declare_queue(queue, passive=True)
            assert source.declaration_result.message_count == 0
    async with stack.client() as http:
        outcome = await stack.chat_stream(http, 3)
    assert outcome.completed
