"""The site agent against real RabbitMQ (session vhost) and Redis, with a fake vLLM backend."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from faststream.rabbit import RabbitBroker
from redis.asyncio import Redis

from schemas import names
from schemas.codec import encode
from schemas.messages import SiteHeartbeat, UsageRecorded
from schemas.records import Chunk, Failure, Final, Response, Usage
from services.common import streams, topology
from services.devstack.procs import ProcessGroup
from services.sim_vllm.__main__ import running as sim_running
from services.sim_vllm.settings import Settings as SimSettings
from services.site_agent.app import create_app
from services.site_agent.settings import Settings
from tests.site_agent.conftest import MODEL
from tests.site_agent.fake_backend import PROMPT_TOKENS, WORDS, FakeBackend, free_port
from tests.site_agent.helpers import (
    Tap,
    agent_settings,
    make_request,
    queue_depth,
    read_stream,
    stream_records,
    tap,
    unique,
    wait_for,
)
from tests.site_agent.helpers import (
    running_agent as running,
)
from tests.site_agent.helpers import (
    send_to_site as send,
)


def chunk_json(record: Any) -> dict[str, Any]:
    assert isinstance(record, Chunk)
    data: dict[str, Any] = json.loads(record.data)
    return data


async def test_streams_chunks_in_order_and_ends_with_the_backends_usage(
    rabbit_url: str,
    redis_url: str,
    backend: FakeBackend,
    broker: RabbitBroker,
    redis_client: Redis,
    usage: Tap,
    channel: Any,
) -> None:
    settings = agent_settings(rabbit_url, redis_url, {MODEL: [backend.url]})
    request = make_request(MODEL, stream=True)
    async with running(settings):
        await send(broker, settings.site_id, request)
        records = await read_stream(redis_client, request.request_id)
        event = await usage.get_for(request.request_id)
    *chunks, final = records
    contents = [chunk_json(c)["choices"][0]["delta"].get("content") for c in chunks]
    assert contents == [*WORDS, None]  # the usage-only chunk was not asked for
    assert all(chunk_json(c)["choices"] for c in chunks)
    assert isinstance(final, Final)
    assert final.outcome == "completed"
    assert final.site_id == settings.site_id
    assert final.usage == Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=len(WORDS))
    assert backend.bodies[-1]["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }
    assert isinstance(event, UsageRecorded)
    assert (event.prompt_tokens, event.completion_tokens) == (PROMPT_TOKENS, len(WORDS))
    assert (event.outcome, event.site_id, event.user_id) == ("completed", settings.site_id, "u-1")
    assert await redis_client.ttl(names.stream_key(request.request_id)) > 3000
    # The agent has stopped: anything unacked would be back in its queue.
    assert await queue_depth(channel, names.site_queue(settings.site_id, "interactive")) == 0


async def test_usage_chunk_is_passed_on_when_the_client_asked(
    agent: Settings, broker: RabbitBroker, redis_client: Redis
) -> None:
    request = make_request(MODEL, endpoint="completions", stream=True, include_usage=True)
    await send(broker, agent.site_id, request)
    *chunks, final = await read_stream(redis_client, request.request_id)
    last = chunk_json(chunks[-1])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == len(WORDS)
    texts = [chunk_json(c)["choices"][0]["text"] for c in chunks[:-1]]
    assert "".join(texts) == "".join(WORDS)
    assert isinstance(final, Final)
    assert final.usage.completion_tokens == len(WORDS)


async def test_non_streamed_answer_is_one_response_record_with_the_backends_body(
    agent: Settings, broker: RabbitBroker, redis_client: Redis
) -> None:
    request = make_request(MODEL)
    await send(broker, agent.site_id, request)
    response, final = await read_stream(redis_client, request.request_id)
    assert isinstance(response, Response)
    assert response.status == 200
    body = json.loads(response.body)
    assert body["choices"][0]["message"]["content"] == "".join(WORDS)
    assert isinstance(final, Final)
    assert final.usage == Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=len(WORDS))


async def test_embeddings_bill_prompt_tokens_only(
    agent: Settings, broker: RabbitBroker, redis_client: Redis
) -> None:
    request = make_request(MODEL, endpoint="embeddings")
    await send(broker, agent.site_id, request)
    response, final = await read_stream(redis_client, request.request_id)
    assert isinstance(response, Response)
    assert json.loads(response.body)["data"][0]["embedding"] == [0.25, -0.5, 0.125]
    assert isinstance(final, Final)
    assert final.usage == Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=0)


async def test_redelivered_request_with_a_final_is_not_regenerated_but_its_usage_republished(
    agent: Settings, broker: RabbitBroker, redis_client: Redis, usage: Tap, backend: FakeBackend
) -> None:
    request = make_request(MODEL, stream=True)
    await send(broker, agent.site_id, request)
    await read_stream(redis_client, request.request_id)
    first = await usage.get_for(request.request_id)
    hits = sum(backend.hits.values())

    await send(broker, agent.site_id, request)
    again = await usage.get_for(request.request_id)

    assert again == first
    assert sum(backend.hits.values()) == hits
    finals = [
        r for r in await stream_records(redis_client, request.request_id) if isinstance(r, Final)
    ]
    assert len(finals) == 1


async def test_request_claimed_by_another_site_is_acked_and_skipped(
    rabbit_url: str,
    redis_url: str,
    backend: FakeBackend,
    broker: RabbitBroker,
    redis_client: Redis,
    channel: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="services.site_agent")
    other = unique("other-site")
    request = make_request(MODEL, stream=True)
    await redis_client.set(names.claim_key(request.request_id), other, ex=60)
    hits = sum(backend.hits.values())
    settings = agent_settings(rabbit_url, redis_url, {MODEL: [backend.url]})
    async with running(settings):
        await send(broker, settings.site_id, request)
        await wait_for(lambda: any(other in r.getMessage() for r in caplog.records))
    assert await stream_records(redis_client, request.request_id) == []
    assert sum(backend.hits.values()) == hits
    assert await queue_depth(channel, names.site_queue(settings.site_id, "interactive")) == 0


async def test_a_request_moved_off_a_dead_site_waits_out_its_claim_then_runs(
    agent: Settings, broker: RabbitBroker, redis_client: Redis, backend: FakeBackend
) -> None:
    dead = unique("dead-site")
    request = msgspec.structs.replace(make_request(MODEL), moved_from=dead)
    await redis_client.set(names.claim_key(request.request_id), f"{dead}/agent/x", ex=2)
    hits = sum(backend.hits.values())
    await send(broker, agent.site_id, request)
    records = await read_stream(redis_client, request.request_id, within_s=15)
    assert isinstance(records[0], Response)
    assert isinstance(records[-1], Final)
    assert (records[-1].outcome, records[-1].site_id) == ("completed", agent.site_id)
    assert sum(backend.hits.values()) == hits + 1


async def test_a_moved_request_that_had_streamed_ends_with_an_error_and_bills_what_was_sent(
    agent: Settings, broker: RabbitBroker, redis_client: Redis, backend: FakeBackend, usage: Tap
) -> None:
    dead = unique("dead-site")
    request = msgspec.structs.replace(make_request(MODEL, stream=True), moved_from=dead)
    await redis_client.set(names.claim_key(request.request_id), f"{dead}/agent/x", ex=1)
    sent = Chunk(data=b'{"choices":[]}', usage=Usage(prompt_tokens=3, completion_tokens=2))
    await streams.append(redis_client, request.request_id, sent, ttl_s=60)
    hits = sum(backend.hits.values())
    await send(broker, agent.site_id, request)
    records = await read_stream(redis_client, request.request_id, within_s=15)
    assert isinstance(records[1], Failure)
    assert records[1].error.code == "generation_interrupted"
    assert isinstance(records[-1], Final)
    assert records[-1].usage == Usage(prompt_tokens=3, completion_tokens=2)
    event = await usage.get_for(request.request_id)
    assert isinstance(event, UsageRecorded)
    assert event.completion_tokens == 2
    assert sum(backend.hits.values()) == hits  # not generated again


async def test_cancelled_before_start_is_not_generated(
    agent: Settings, broker: RabbitBroker, redis_client: Redis, usage: Tap, backend: FakeBackend
) -> None:
    request = make_request(MODEL, stream=True)
    await redis_client.set(names.cancel_key(request.request_id), b"1", ex=60)
    hits = sum(backend.hits.values())
    await send(broker, agent.site_id, request)
    records = await read_stream(redis_client, request.request_id)
    assert records == [records[-1]]
    assert isinstance(records[-1], Final)
    assert (records[-1].outcome, records[-1].usage) == ("cancelled", Usage())
    assert sum(backend.hits.values()) == hits
    event = await usage.get_for(request.request_id)
    assert isinstance(event, UsageRecorded)
    assert (event.outcome, event.completion_tokens) == ("cancelled", 0)


async def test_expired_request_is_not_generated(
    agent: Settings, broker: RabbitBroker, redis_client: Redis, backend: FakeBackend
) -> None:
    request = make_request(MODEL, expires_in=-1.0)
    hits = sum(backend.hits.values())
    await send(broker, agent.site_id, request)
    (final,) = await read_stream(redis_client, request.request_id)
    assert isinstance(final, Final)
    assert final.outcome == "cancelled"
    assert sum(backend.hits.values()) == hits


async def test_cancel_while_streaming_closes_the_backend_stream_and_bills_what_was_sent(
    agent: Settings, broker: RabbitBroker, redis_client: Redis, backend: FakeBackend
) -> None:
    backend.chunk_delay_s = 0.5
    aborted = backend.streams_aborted
    request = make_request(MODEL, stream=True)
    await send(broker, agent.site_id, request)
    await wait_for(lambda: redis_client.xlen(names.stream_key(request.request_id)))
    await redis_client.set(names.cancel_key(request.request_id), b"1", ex=60)
    await redis_client.publish(names.CANCEL_CHANNEL, request.request_id)
    cancelled_at = time.monotonic()
    records = await read_stream(redis_client, request.request_id, within_s=3)
    assert time.monotonic() - cancelled_at < 1.0
    *chunks, final = records
    assert isinstance(final, Final)
    assert final.outcome == "cancelled"
    content = [c for c in chunks if chunk_json(c)["choices"][0]["delta"].get("content")]
    assert 1 <= len(content) < len(WORDS)
    assert final.usage == Usage(prompt_tokens=0, completion_tokens=len(content))
    await wait_for(lambda: backend.streams_aborted == aborted + 1, within_s=5)


@pytest.mark.parametrize("shape", ["nested", "flat"])
async def test_backend_400_becomes_a_failure_with_its_message(
    shape: str, agent: Settings, broker: RabbitBroker, redis_client: Redis, backend: FakeBackend
) -> None:
    backend.error_shape = shape  # type: ignore[assignment]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}
    request = make_request(MODEL, stream=True, body=body)
    await send(broker, agent.site_id, request)
    failure, final = await read_stream(redis_client, request.request_id)
    assert isinstance(failure, Failure)
    assert failure.error.status == 400
    assert failure.error.message == "max_tokens must be at least 1, got -1."
    assert (failure.error.type, failure.error.param) == ("BadRequestError", "max_tokens")
    assert isinstance(final, Final)
    assert (final.outcome, final.usage) == ("failed", Usage())


async def test_unreachable_instance_is_skipped_and_all_unreachable_is_a_502(
    rabbit_url: str,
    redis_url: str,
    backend: FakeBackend,
    broker: RabbitBroker,
    redis_client: Redis,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    other = unique("dead-model")
    settings = agent_settings(rabbit_url, redis_url, {MODEL: [dead, backend.url], other: [dead]})
    async with running(settings):
        ok = make_request(MODEL)
        await send(broker, settings.site_id, ok)
        response, _ = await read_stream(redis_client, ok.request_id)
        assert isinstance(response, Response)

        down = make_request(other)
        await send(broker, settings.site_id, down)
        failure, final = await read_stream(redis_client, down.request_id)
        assert isinstance(failure, Failure)
        assert (failure.error.status, failure.error.code) == (502, "backend_unavailable")
        assert isinstance(final, Final)

        unknown = make_request(unique("unknown-model"))
        await send(broker, settings.site_id, unknown)
        failure, _ = await read_stream(redis_client, unknown.request_id)
        assert isinstance(failure, Failure)
        assert (failure.error.status, failure.error.code) == (503, "model_not_served")


async def test_silent_backend_ends_with_a_504(
    rabbit_url: str,
    redis_url: str,
    backend: FakeBackend,
    broker: RabbitBroker,
    redis_client: Redis,
) -> None:
    settings = agent_settings(rabbit_url, redis_url, {MODEL: [backend.url]})
    settings.backend_read_timeout_s = 0.3
    backend.chunk_delay_s = 1.5
    async with running(settings):
        request = make_request(MODEL, stream=True)
        await send(broker, settings.site_id, request)
        *_, failure, final = await read_stream(redis_client, request.request_id)
    assert isinstance(failure, Failure)
    assert (failure.error.status, failure.error.code) == (504, "backend_timeout")
    assert isinstance(final, Final)
    assert final.outcome == "failed"
    assert final.usage.completion_tokens == 1  # the one chunk that did arrive


async def test_poison_message_is_dead_lettered_and_the_agent_keeps_serving(
    agent: Settings, broker: RabbitBroker, redis_client: Redis, channel: Any
) -> None:
    dead = await tap(channel, names.DEAD_EXCHANGE, "")
    queue = names.site_queue(agent.site_id, "interactive")
    await broker.publish(
        b"\x93not a message",
        exchange=topology.SITES,
        routing_key=names.site_routing_key(agent.site_id, "interactive"),
        persist=True,
    )
    raw = await dead.get_raw()
    assert raw.body == b"\x93not a message"
    (death, *_) = raw.headers["x-death"]
    assert (death["reason"], death["queue"]) == ("rejected", queue)
    request = make_request(MODEL)
    await send(broker, agent.site_id, request)
    response, _ = await read_stream(redis_client, request.request_id)
    assert isinstance(response, Response)


async def test_heartbeat_says_hot_with_capacity_then_cold_when_unhealthy(
    agent: Settings, channel: Any, backend: FakeBackend
) -> None:
    beats = await tap(channel, names.HEARTBEATS_EXCHANGE, "")

    async def next_beat() -> SiteHeartbeat:
        while True:
            message, _ = await beats.get()
            if isinstance(message, SiteHeartbeat) and message.site_id == agent.site_id:
                return message

    beat = await next_beat()
    (status,) = beat.models
    assert (status.model, status.state, status.instances) == (MODEL, "hot", 1)
    assert status.capacity == agent.max_concurrency_per_instance
    assert status.kv_cache_usage == 0.125
    assert beat.interval_s == agent.heartbeat_interval_s
    assert abs(beat.sent_at - time.time()) < 5

    backend.healthy = False
    for _ in range(10):
        beat = await next_beat()
        if beat.models[0].state == "cold":
            break
    assert (beat.models[0].state, beat.models[0].capacity) == ("cold", 0)


async def test_agent_stops_cleanly_while_idle(
    rabbit_url: str, redis_url: str, backend: FakeBackend
) -> None:
    settings = agent_settings(rabbit_url, redis_url, {MODEL: [backend.url]})
    started = time.monotonic()
    async with running(settings):
        await asyncio.sleep(0.1)
    assert time.monotonic() - started < 5


async def test_ops_routes_report_ready_and_status(
    rabbit_url: str, redis_url: str, backend: FakeBackend
) -> None:
    settings = agent_settings(rabbit_url, redis_url, {MODEL: [backend.url]})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            ready = await client.get("/ready")
            status = (await client.get("/status")).json()
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"broker": "ok", "redis": "ok"}
    assert status["site_id"] == settings.site_id
    assert status["models"][0]["state"] == "hot"


async def test_request_with_records_but_no_final_is_ended_not_regenerated(
    agent: Settings, broker: RabbitBroker, redis_client: Redis, backend: FakeBackend
) -> None:
    request = make_request(MODEL, stream=True)
    earlier = Chunk(data=b'{"choices":[{"delta":{"content":"Hel"}}]}')
    await redis_client.xadd(
        names.stream_key(request.request_id), {names.RECORD_FIELD: encode(earlier)}
    )
    hits = sum(backend.hits.values())
    await send(broker, agent.site_id, request)
    chunk, failure, final = await read_stream(redis_client, request.request_id)
    assert chunk == earlier
    assert isinstance(failure, Failure)
    assert (failure.error.status, failure.error.code) == (502, "generation_interrupted")
    assert isinstance(final, Final)
    assert final.outcome == "failed"
    assert sum(backend.hits.values()) == hits


async def test_a_duplicate_delivery_while_running_is_not_generated_twice(
    agent: Settings, broker: RabbitBroker, redis_client: Redis, backend: FakeBackend, usage: Tap
) -> None:
    backend.chunk_delay_s = 0.05  # keep the first delivery running while the second arrives
    request = make_request(MODEL, stream=True)
    hits = sum(backend.hits.values())
    await send(broker, agent.site_id, request)
    await send(broker, agent.site_id, request)  # e.g. a router that died before its ack
    records = await read_stream(redis_client, request.request_id)
    assert isinstance(records[-1], Final)
    assert records[-1].outcome == "completed"
    # Both deliveries settle with the same usage (the ledger keeps one row per request_id).
    first = await usage.get_for(request.request_id)
    second = await usage.get_for(request.request_id)
    assert first == second
    assert sum(backend.hits.values()) == hits + 1
    finals = [
        r for r in await stream_records(redis_client, request.request_id) if isinstance(r, Final)
    ]
    assert len(finals) == 1


async def test_a_dead_agents_interrupted_request_ends_billing_what_was_delivered(
    agent: Settings,
    broker: RabbitBroker,
    redis_client: Redis,
    backend: FakeBackend,
    usage: Tap,
) -> None:
    """Its claim (held by an agent of this site that died) expires; the request then ends."""
    request = make_request(MODEL, stream=True)
    delivered = Usage(prompt_tokens=7, completion_tokens=2)
    await redis_client.set(names.claim_key(request.request_id), f"{agent.site_id}/dead", ex=2)
    for i, cumulative in enumerate((Usage(prompt_tokens=7, completion_tokens=1), delivered)):
        chunk = Chunk(data=f'{{"n": {i}}}'.encode(), usage=cumulative)
        await redis_client.xadd(
            names.stream_key(request.request_id), {names.RECORD_FIELD: encode(chunk)}
        )
    hits = sum(backend.hits.values())
    await send(broker, agent.site_id, request)
    records = await read_stream(redis_client, request.request_id, within_s=15)
    failure, final = records[-2:]
    assert isinstance(failure, Failure)
    assert failure.error.code == "generation_interrupted"
    assert isinstance(final, Final)
    assert (final.outcome, final.usage) == ("failed", delivered)
    event = await usage.get_for(request.request_id)
    assert (event.prompt_tokens, event.completion_tokens) == (7, 2)
    assert sum(backend.hits.values()) == hits


@contextlib.contextmanager
def sim_process(
    model: str, tokens_per_s: float, log_dir: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run `first sim-vllm` as a child process (so that it can be killed with -9)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "services.sim_vllm", "--model", model]
    command += ["--port", str(port), "--tokens-per-s", str(tokens_per_s)]
    group = ProcessGroup(log_dir)
    try:
        proc = group.start("sim-vllm", command, dict(os.environ), f"{url}/health")
        group.wait_ready(proc, 20)
        yield proc.popen, url
    finally:
        group.stop_all()


def served(url: str) -> int:
    """Return how many requests a simulator has received."""
    received: int = httpx.get(f"{url}/sim/stats", timeout=5).json()["received"]
    return received


async def test_an_instance_killed_mid_request_is_retried_on_the_next_one(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, redis_client: Redis, tmp_path: Path
) -> None:
    model = unique("killed-model")
    with (
        sim_process(model, tokens_per_s=5, log_dir=tmp_path) as (victim, victim_url),
        sim_running(SimSettings(port=0, model=model, tokens_per_s=1000)) as other,
    ):
        # The victim is listed first: equally idle instances are tried in their order.
        settings = agent_settings(rabbit_url, redis_url, {model: [victim_url, other]})
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
        request = make_request(model, body=body)  # not streamed: 4 s of generation on the victim
        async with running(settings):
            await send(broker, settings.site_id, request)
            await wait_for(lambda: served(victim_url) == 1)
            os.kill(victim.pid, signal.SIGKILL)
            response, final = await read_stream(redis_client, request.request_id)
        retried = served(other)
    assert isinstance(response, Response)
    assert response.status == 200
    assert json.loads(response.body)["usage"]["completion_tokens"] == 20
    assert isinstance(final, Final)
    assert final.outcome == "completed"
    assert retried == 1


async def stream_past_a_breaking_instance(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, redis: Redis, **fault: int
) -> tuple[list[Any], tuple[int, int]]:
    """Stream 8 tokens from a site whose first instance has `fault`, its second none; return
    the records and how many requests each instance received."""
    model = unique("broken-model")
    with (
        sim_running(SimSettings(port=0, model=model, **fault)) as broken,  # type: ignore[arg-type]
        sim_running(SimSettings(port=0, model=model, tokens_per_s=1000)) as other,
    ):
        settings = agent_settings(rabbit_url, redis_url, {model: [broken, other]})
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        request = make_request(model, stream=True, body=body)
        async with running(settings):
            await send(broker, settings.site_id, request)
            records = await read_stream(redis, request.request_id)
        return records, (served(broken), served(other))


async def test_an_instance_that_breaks_off_before_the_first_token_is_retried(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, redis_client: Redis
) -> None:
    records, counts = await stream_past_a_breaking_instance(
        rabbit_url, redis_url, broker, redis_client, close_after_tokens=0
    )
    *chunks, final = records
    assert all(isinstance(chunk, Chunk) for chunk in chunks)
    assert sum(bool(chunk_json(c)["choices"][0]["delta"].get("content")) for c in chunks) == 8
    assert isinstance(final, Final)
    assert (final.outcome, final.usage.completion_tokens) == ("completed", 8)
    assert counts == (1, 1)


async def test_an_instance_that_breaks_off_after_tokens_ends_the_request_with_an_error(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, redis_client: Redis
) -> None:
    records, counts = await stream_past_a_breaking_instance(
        rabbit_url, redis_url, broker, redis_client, close_after_tokens=3
    )
    *chunks, failure, final = records
    assert chunks
    assert all(isinstance(chunk, Chunk) for chunk in chunks)
    assert isinstance(failure, Failure)
    assert (failure.error.status, failure.error.code) == (502, "backend_error")
    assert isinstance(final, Final)
    assert (final.outcome, final.usage.completion_tokens) == ("failed", 3)
    assert counts == (1, 0)  # the client had tokens: the request was not started over
