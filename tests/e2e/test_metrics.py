"""Every service's /metrics, scraped over HTTP from the running stack, counts two real requests
(one whole, one streamed) exactly: requests, tokens as vLLM reported them, timings, gauges."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.devstack.stack import service_port
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.vllm

CHAT = "smollm2-135m"
EMBED = "all-minilm-l6-v2"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(stack: Stack, service: str) -> Samples:
    port = service_port(stack.config, service)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def eventually(probe: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s}s")
        await asyncio.sleep(0.2)


async def two_chats(stack: Stack) -> list[dict[str, int]]:
    """Send a whole and a streamed chat; return the usage vLLM reported for each."""
    body: dict[str, Any] = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "Count to three."}],
        "max_tokens": 8,
        "temperature": 0,
    }
    headers = {"authorization": f"Bearer {stack.api_key}"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=120) as http:
        whole = await http.post("/chat/completions", json=body)
        assert whole.status_code == 200, whole.text
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/chat/completions", json=streamed) as sse:
            assert sse.status_code == 200
            events = [line[6:] async for line in sse.aiter_lines() if line.startswith("data: ")]
    last = json.loads(events[-2])  # the usage-only chunk, just before [DONE]
    return [whole.json()["usage"], last["usage"]]


async def test_each_service_counts_two_requests_and_their_tokens(stack: Stack) -> None:
    services = ("gateway", "router", "site_agent", "accounting")
    before = {s: scrape(stack, s) for s in services}
    usages = await two_chats(stack)
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    site = stack.config.site_id

    def delta(service: str, name: str, **labels: str) -> float:
        return value(scrape(stack, service), name, **labels) - value(
            before[service], name, **labels
        )

    # Accounting is last in line: once it has both events, every service has finished.
    await eventually(
        lambda: delta("accounting", "first_accounting_usage_events_total", result="recorded") >= 2
    )
    await eventually(lambda: value(scrape(stack, "gateway"), "first_gateway_in_flight") == 0)
    await eventually(lambda: value(scrape(stack, "site_agent"), "first_site_agent_in_flight") == 0)

    chat = {"endpoint": "/v1/chat/completions", "status": "200"}
    assert delta("gateway", "first_gateway_requests_total", **chat) == 2
    assert delta("gateway", "first_gateway_prompt_tokens_total", model=CHAT) == prompt
    assert delta("gateway", "first_gateway_completion_tokens_total", model=CHAT) == completion
    by_endpoint = {"endpoint": "chat.completions"}
    assert delta("gateway", "first_gateway_first_record_seconds_count", **by_endpoint) == 2
    assert delta("gateway", "first_gateway_request_seconds_count", **by_endpoint) == 2

    routed = {"site": site, "priority": "interactive"}
    assert delta("router", "first_router_requests_routed_total", **routed) == 2
    assert delta("router", "first_router_queue_wait_seconds_count", priority="interactive") == 2
    router = scrape(stack, "router")
    assert value(router, "first_router_live_sites") == 1
    assert 0 <= value(router, "first_router_heartbeat_age_seconds", site=site) < 5
    assert (("first_router_in_flight", frozenset({("site", site)})) in router) is True

    done = {"model": CHAT, "outcome": "completed"}
    assert delta("site_agent", "first_site_agent_requests_total", **done) == 2
    assert delta("site_agent", "first_site_agent_prompt_tokens_total", model=CHAT) == prompt
    assert delta("site_agent", "first_site_agent_completion_tokens_total", model=CHAT) == completion
    assert delta("site_agent", "first_site_agent_first_chunk_seconds_count", model=CHAT) == 1
    assert delta("site_agent", "first_site_agent_request_seconds_count", model=CHAT) == 2
    waits = delta("site_agent", "first_site_agent_queue_wait_seconds_count", priority="interactive")
    assert waits == 2
    agent = scrape(stack, "site_agent")
    for model, backend in stack.backends.items():
        labels = {"model": model, "instance": backend.url}
        assert value(agent, "first_site_agent_backend_up", **labels) == 1, model
    assert {CHAT, EMBED} == set(stack.backends)

    assert delta("accounting", "first_accounting_usage_events_total", result="recorded") == 2
    writes = delta("accounting", "first_accounting_ledger_write_seconds_count", result="recorded")
    assert writes == 2
