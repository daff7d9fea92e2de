"""The site agent's Prometheus series count what it really did, against the fake vLLM backend."""

from __future__ import annotations

import time

import msgspec
from faststream.rabbit import RabbitBroker
from prometheus_client import REGISTRY, generate_latest
from redis.asyncio import Redis

from schemas.records import Final
from services.site_agent.settings import Settings
from tests.site_agent.conftest import MODEL
from tests.site_agent.fake_backend import PROMPT_TOKENS, WORDS, FakeBackend
from tests.site_agent.helpers import Tap, make_request, read_stream, wait_for
from tests.site_agent.helpers import send_to_site as send


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def outcomes() -> dict[str, float]:
    return {
        outcome: sample("first_site_agent_requests_total", model=MODEL, outcome=outcome)
        for outcome in ("completed", "cancelled", "failed")
    }


async def test_a_streamed_request_counts_its_outcome_tokens_and_timings(
    agent: Settings, broker: RabbitBroker, redis_client: Redis, usage: Tap
) -> None:
    queued_s = 1.5
    request = make_request(MODEL, stream=True)
    request = msgspec.structs.replace(request, created_at=time.time() - queued_s)
    before = outcomes()
    prompt = sample("first_site_agent_prompt_tokens_total", model=MODEL)
    completion = sample("first_site_agent_completion_tokens_total", model=MODEL)
    ttft = sample("first_site_agent_first_chunk_seconds_count", model=MODEL)
    latency = sample("first_site_agent_request_seconds_count", model=MODEL)
    waits = sample("first_site_agent_queue_wait_seconds_count", priority="interactive")
    waited = sample("first_site_agent_queue_wait_seconds_sum", priority="interactive")

    await send(broker, agent.site_id, request)
    records = await read_stream(redis_client, request.request_id)
    await usage.get_for(request.request_id)  # published after the Final: the handler is done
    await wait_for(lambda: sample("first_site_agent_in_flight") == 0)

    assert isinstance(records[-1], Final)
    assert outcomes() == {**before, "completed": before["completed"] + 1}
    assert sample("first_site_agent_prompt_tokens_total", model=MODEL) == prompt + PROMPT_TOKENS
    assert sample("first_site_agent_completion_tokens_total", model=MODEL) == completion + len(
        WORDS
    )
    assert sample("first_site_agent_first_chunk_seconds_count", model=MODEL) == ttft + 1
    assert sample("first_site_agent_request_seconds_count", model=MODEL) == latency + 1
    assert sample("first_site_agent_queue_wait_seconds_count", priority="interactive") == waits + 1
    wait = sample("first_site_agent_queue_wait_seconds_sum", priority="interactive") - waited
    assert queued_s <= wait < queued_s + 10


async def test_failed_and_cancelled_requests_are_counted_by_outcome_without_a_first_chunk(
    agent: Settings, broker: RabbitBroker, redis_client: Redis
) -> None:
    not_an_object = msgspec.structs.replace(make_request(MODEL, stream=True), body=b"[1, 2]")
    expired = make_request(MODEL, stream=True, expires_in=-1.0)
    before = outcomes()
    ttft = sample("first_site_agent_first_chunk_seconds_count", model=MODEL)

    for request in (not_an_object, expired):
        await send(broker, agent.site_id, request)
        records = await read_stream(redis_client, request.request_id)
        assert isinstance(records[-1], Final)

    await wait_for(lambda: outcomes()["cancelled"] == before["cancelled"] + 1)
    assert outcomes() == {
        "completed": before["completed"],
        "failed": before["failed"] + 1,
        "cancelled": before["cancelled"] + 1,
    }
    assert sample("first_site_agent_first_chunk_seconds_count", model=MODEL) == ttft


async def test_backend_health_is_exported_per_instance_at_scrape_time(
    agent: Settings, backend: FakeBackend
) -> None:
    labels = {"model": MODEL, "instance": backend.url}
    await wait_for(lambda: sample("first_site_agent_backend_up", **labels) == 1.0)
    backend.healthy = False
    await wait_for(lambda: REGISTRY.get_sample_value("first_site_agent_backend_up", labels) == 0)
    text = generate_latest().decode()
    assert f'first_site_agent_backend_up{{instance="{backend.url}",model="{MODEL}"}} 0.0' in text
    backend.healthy = True
    await wait_for(lambda: sample("first_site_agent_backend_up", **labels) == 1.0)
