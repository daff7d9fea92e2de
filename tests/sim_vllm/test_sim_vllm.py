"""The simulated vLLM answers like vLLM: shapes, usage, slots, pacing, abort and faults.

Each test serves its own simulator on a free loopback port (uvicorn in a thread) and talks to
it with the `openai` SDK or httpx, the way FIRST's site agent does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from services.cli import app as cli_app
from services.sim_vllm.__main__ import parse_settings, running
from services.sim_vllm.settings import Settings
from services.site_agent.backends import Load, parse_metrics
from services.site_agent.sse import SSESplitter

USER: list[Any] = [{"role": "user", "content": "three little words"}]
CHAT_PROMPT_TOKENS = 2 + 4 + 3  # generation prompt + message template + words
TIMEOUT = httpx.Timeout(10.0)

Start = Callable[..., str]


@pytest.fixture
def sim() -> Iterator[Start]:
    """Start simulators with setting overrides; each is stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(running(Settings(port=0, **overrides)))


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        yield client


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)


def chat_body(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": "sim", "messages": USER, "max_tokens": max_tokens, **extra}


async def load(http: httpx.AsyncClient, url: str) -> Load:
    return parse_metrics((await http.get(f"{url}/metrics")).text, "sim")


async def stats(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    result: dict[str, Any] = (await http.get(f"{url}/sim/stats")).json()
    return result


async def until(
    http: httpx.AsyncClient, url: str, holds: Callable[[Load], bool], within_s: float
) -> None:
    """Poll /metrics until `holds(load)`; fail after `within_s`."""
    deadline = time.monotonic() + within_s
    while not holds(await load(http, url)):
        assert time.monotonic() < deadline, f"not true within {within_s} s"
        await asyncio.sleep(0.02)


async def events(http: httpx.AsyncClient, url: str, path: str, body: Any) -> list[Any]:
    """Post a streamed request; return its SSE payloads decoded ("[DONE]" stays a string)."""
    async with http.stream("POST", f"{url}{path}", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = await response.aread()
    frames = raw.split(b"\n\n")
    assert frames[-1] == b""  # every event, [DONE] too, ends with a blank line
    assert all(f.startswith(b"data: ") for f in frames[:-1])
    return [json.loads(f[6:]) if f != b"data: [DONE]" else "[DONE]" for f in frames[:-1]]


async def test_chat_answers_like_vllm_streamed_or_not_with_the_same_usage(sim: Start) -> None:
    url = sim()
    async with sdk(url) as client:
        reply = await client.chat.completions.create(model="sim", messages=USER, max_tokens=5)
        stream = await client.chat.completions.create(
            model="sim",
            messages=USER,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert reply.choices[0].message.content == " tok1 tok2 tok3 tok4 tok5"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (CHAT_PROMPT_TOKENS, 5)
    assert reply.usage.total_tokens == CHAT_PROMPT_TOKENS + 5
    first, *content, last = chunks
    assert (first.choices[0].delta.role, first.choices[0].delta.content) == ("assistant", "")
    assert [c.choices[0].delta.content for c in content] == [f" tok{i}" for i in range(1, 6)]
    assert [c.choices[0].finish_reason for c in content] == [None] * 4 + ["length"]
    assert all(c.usage is None for c in [first, *content])
    assert last.choices == []
    assert last.usage == reply.usage
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")


async def test_completions_stream_and_body_agree(sim: Start, http: httpx.AsyncClient) -> None:
    url = sim()
    async with sdk(url) as client:
        reply = await client.completions.create(model="sim", prompt="one two", max_tokens=3)
    body = {"model": "sim", "prompt": "one two", "max_tokens": 3, "stream": True}
    streamed = await events(
        http, url, "/v1/completions", {**body, "stream_options": {"include_usage": True}}
    )
    assert reply.choices[0].text == " tok1 tok2 tok3"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, 3)
    *content, usage_chunk, done = streamed
    assert done == "[DONE]"
    assert [c["object"] for c in content] == ["text_completion"] * 3
    assert [c["choices"][0]["text"] for c in content] == [" tok1", " tok2", " tok3"]
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == reply.usage.model_dump(exclude_none=True)
    plain = await events(http, url, "/v1/completions", body)
    assert len(plain) == 4  # no usage chunk unless asked for
    assert all("usage" not in c for c in plain[:-1])


async def test_continuous_usage_stats_put_cumulative_usage_in_every_chunk(
    sim: Start, http: httpx.AsyncClient
) -> None:
    url = sim()
    options = {"include_usage": True, "continuous_usage_stats": True}
    streamed = await events(
        http, url, "/v1/chat/completions", chat_body(3, stream=True, stream_options=options)
    )
    *chunks, done = streamed
    p = CHAT_PROMPT_TOKENS
    expected = [
        {"prompt_tokens": p, "total_tokens": p + n, "completion_tokens": n} for n in (0, 1, 2, 3, 3)
    ]
    assert [c["usage"] for c in chunks] == expected  # role chunk, 3 tokens, usage-only chunk
    assert chunks[-1]["choices"] == []
    assert done == "[DONE]"
    # as in vLLM, continuous stats without include_usage give no usage at all
    alone = await events(
        http,
        url,
        "/v1/chat/completions",
        chat_body(3, stream=True, stream_options={"continuous_usage_stats": True}),
    )
    assert all("usage" not in c for c in alone[:-1])
    assert len(alone) == 5


async def test_embeddings_are_deterministic_unit_vectors(
    sim: Start, http: httpx.AsyncClient
) -> None:
    url = sim(embedding_dimensions=16)
    async with sdk(url) as client:  # the SDK asks for base64 and decodes it
        a = await client.embeddings.create(model="sim", input=["red fox", "blue"])
        b = await client.embeddings.create(model="sim", input="red fox")
    floats = (
        await http.post(f"{url}/v1/embeddings", json={"model": "sim", "input": "red fox"})
    ).json()
    assert len(a.data) == 2
    assert a.data[0].embedding == b.data[0].embedding
    assert a.data[0].embedding != a.data[1].embedding
    assert len(a.data[0].embedding) == 16
    assert math.isclose(math.fsum(x * x for x in a.data[0].embedding), 1.0, rel_tol=1e-5)
    assert floats["data"][0]["embedding"] == pytest.approx(b.data[0].embedding, rel=1e-6)
    assert (a.usage.prompt_tokens, a.usage.total_tokens) == (3, 3)


async def test_models_health_version_and_metrics_names(sim: Start, http: httpx.AsyncClient) -> None:
    url = sim(model="smol", max_model_len=512)
    models = (await http.get(f"{url}/v1/models")).json()
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [("smol", 512)]
    assert (await http.get(f"{url}/health")).status_code == 200
    assert (await http.get(f"{url}/version")).json() == {"version": "0.11.0"}
    text = (await http.get(f"{url}/metrics")).text
    for series in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prompt_tokens_total",
        "generation_tokens_total",
    ):
        assert f'vllm:{series}{{engine="0",model_name="smol"}}' in text


async def test_refusals_have_vllm_error_shape(sim: Start, http: httpx.AsyncClient) -> None:
    url = sim(max_model_len=20)
    post = f"{url}/v1/chat/completions"
    too_long = await http.post(post, json=chat_body(12))
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", "max_tokens", 400)
    assert "maximum context length is 20 tokens" in error["message"]
    assert (await http.post(post, json=chat_body(11))).status_code == 200  # 9 + 11 fits exactly
    assert (await http.post(post, json=chat_body(0))).json()["error"]["param"] == "max_tokens"
    missing = await http.post(post, json={**chat_body(1), "model": "other"})
    assert (missing.status_code, missing.json()["error"]["type"]) == (404, "NotFoundError")
    assert (await http.post(post, content=b"{nope")).status_code == 400
    assert (await stats(http, url))["failed"] == 4


async def test_requests_beyond_the_slots_wait(sim: Start, http: httpx.AsyncClient) -> None:
    url = sim(slots=2, tokens_per_s=20)
    async with sdk(url) as client:
        calls = [
            asyncio.ensure_future(
                client.chat.completions.create(model="sim", messages=USER, max_tokens=10)
            )
            for _ in range(4)
        ]
        await until(http, url, lambda m: (m.running, m.waiting) == (2, 2), 2)
        assert (await load(http, url)).kv_cache_usage > 0
        replies = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert all(r.usage is not None and r.usage.completion_tokens == 10 for r in replies)
    final = await stats(http, url)
    assert [final[k] for k in ("started", "completed", "running", "waiting")] == [4, 4, 0, 0]
    assert final["generated_tokens"] == 40


async def test_tokens_are_paced(sim: Start, http: httpx.AsyncClient) -> None:
    url = sim(tokens_per_s=200, ttft_ms=20)
    began = time.monotonic()
    streamed = await events(
        http, url, "/v1/completions", {"prompt": "x", "max_tokens": 20, "stream": True}
    )
    assert time.monotonic() - began >= 0.1  # 20 ms to the first token, then 19 times 5 ms
    assert len(streamed) == 21


@pytest.mark.parametrize("stream", [True, False])
async def test_a_disconnect_aborts_the_request(
    sim: Start, http: httpx.AsyncClient, stream: bool
) -> None:
    url = sim(tokens_per_s=50)

    async def call() -> None:
        body = chat_body(1000, stream=stream)
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            await response.aread()

    client = asyncio.ensure_future(call())
    await until(http, url, lambda m: m.generated_tokens >= 3, 2)
    assert (await load(http, url)).running == 1
    client.cancel()  # httpx closes the connection
    with contextlib.suppress(asyncio.CancelledError):
        await client
    await until(http, url, lambda m: m.running == 0, 1)
    before = (await load(http, url)).generated_tokens
    await asyncio.sleep(0.3)
    after = await stats(http, url)
    assert after["generated_tokens"] == before < 100
    assert (after["aborted"], after["completed"]) == (1, 0)


async def test_a_queued_request_that_disconnects_leaves_the_queue(
    sim: Start, http: httpx.AsyncClient
) -> None:
    url = sim(slots=1, tokens_per_s=20)
    first = asyncio.ensure_future(
        http.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 40})
    )
    await until(http, url, lambda m: m.running == 1, 2)
    second = asyncio.ensure_future(http.post(f"{url}/v1/completions", json={"prompt": "b"}))
    await until(http, url, lambda m: m.waiting == 1, 2)
    second.cancel()
    await until(http, url, lambda m: m.waiting == 0, 1)
    assert (await asyncio.wait_for(first, 5)).status_code == 200
    final = await stats(http, url)
    assert (final["completed"], final["aborted"], final["started"]) == (1, 1, 1)


async def test_fail_nth_from_settings_and_at_run_time(sim: Start, http: httpx.AsyncClient) -> None:
    url = sim(fail_nth=[2])
    async with sdk(url) as client:
        await client.completions.create(model="sim", prompt="a", max_tokens=1)
        with pytest.raises(openai.InternalServerError) as failed:
            await client.completions.create(model="sim", prompt="a", max_tokens=1)
        await client.completions.create(model="sim", prompt="a", max_tokens=1)
        assert failed.value.body == {
            "message": "Simulated failure of request 2.",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
        set_faults = await http.post(f"{url}/sim/faults", json={"fail_nth": [1, 3]})
        assert set_faults.json()["fail_nth"] == [1, 3]
        outcomes = []
        for _ in range(3):
            try:
                await client.embeddings.create(model="sim", input="a")
                outcomes.append("ok")
            except openai.InternalServerError:
                outcomes.append("500")
    assert outcomes == ["500", "ok", "500"]
    assert (await http.post(f"{url}/sim/faults", json={"fail_nth": 0})).status_code == 400
    assert (await http.post(f"{url}/sim/faults", json={"fail_rate": 1.0})).status_code == 200
    statuses = [
        (await http.post(f"{url}/v1/completions", json={"prompt": "a"})).status_code
        for _ in range(3)
    ]
    assert statuses == [500] * 3
    await http.post(f"{url}/sim/faults", json={})
    assert (await http.post(f"{url}/v1/completions", json={"prompt": "a"})).status_code == 200
    assert (await stats(http, url))["failed"] == 6


async def test_close_after_tokens_breaks_the_stream_without_done(
    sim: Start, http: httpx.AsyncClient
) -> None:
    url = sim(close_after_tokens=3, tokens_per_s=1000)
    seen: list[bytes] = []
    request = http.stream("POST", f"{url}/v1/chat/completions", json=chat_body(10, stream=True))

    async def read() -> None:
        splitter = SSESplitter()  # the site agent's SSE reader
        async with request as response:
            async for raw in response.aiter_raw():
                seen.extend(splitter.feed(raw))

    with pytest.raises(httpx.RemoteProtocolError):
        await read()
    contents = [json.loads(d)["choices"][0]["delta"]["content"] for d in seen]
    assert contents == ["", " tok1", " tok2", " tok3"]
    final = await stats(http, url)
    assert (final["aborted"], final["running"], final["generated_tokens"]) == (1, 0, 3)


async def test_stall_after_tokens_keeps_the_connection_open(
    sim: Start, http: httpx.AsyncClient
) -> None:
    url = sim(tokens_per_s=1000)
    await http.post(f"{url}/sim/faults", json={"stall_after_tokens": 2})
    texts: list[str] = []

    async def read() -> None:
        body = {"prompt": "a", "max_tokens": 10, "stream": True}
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line:
                    texts.append(json.loads(line[6:])["choices"][0]["text"])

    reader = asyncio.ensure_future(read())
    await until(http, url, lambda m: m.generated_tokens >= 2, 2)
    await asyncio.sleep(0.5)
    assert texts == [" tok1", " tok2"]
    assert not reader.done()  # the connection stays open, nothing more comes
    assert (await load(http, url)).running == 1
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    await until(http, url, lambda m: m.running == 0, 1)
    assert (await stats(http, url))["generated_tokens"] == 2


async def test_unhealthy_fault_fails_health(sim: Start, http: httpx.AsyncClient) -> None:
    url = sim()
    await http.post(f"{url}/sim/faults", json={"unhealthy": True})
    assert (await http.get(f"{url}/health")).status_code == 503
    assert (await http.get(f"{url}/sim/faults")).json()["unhealthy"] is True


def test_options_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRST_SIM_VLLM_SLOTS", "7")
    monkeypatch.setenv("FIRST_SIM_VLLM_MODEL", "from-env")
    settings = parse_settings(["--model", "m", "--tokens-per-s", "500", "--fail-nth", "[2,4]"])
    assert (settings.model, settings.tokens_per_s, settings.slots) == ("m", 500.0, 7)
    assert settings.faults().failing == {2, 4}


def test_the_cli_command_forwards_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[Settings] = []
    monkeypatch.setattr("services.sim_vllm.__main__.main", got.append)
    result = CliRunner().invoke(
        cli_app, ["sim-vllm", "--port", "9", "--slots", "3", "--fail-nth", "2", "--fail-nth", "5"]
    )
    assert result.exit_code == 0, result.output
    assert (got[0].port, got[0].slots, got[0].fail_nth, got[0].model) == (9, 3, [2, 5], "sim")
