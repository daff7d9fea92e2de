"""The services' own logs, as the stack writes them (FIRST_LOG_JSON=true, INFO): every line is a
JSON object, the lines about a request carry its request_id and user_id, no prompt text."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.devstack.stack import SERVICES
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.vllm

ON_THE_PATH = tuple(s for s in SERVICES if s != "batch_worker")
"""The services an interactive request passes (the batch worker sees only batch lines)."""

CHAT = "smollm2-135m"
USER = "researcher"  # the owner of stack.api_key


def log_path(stack: Stack, service: str) -> Path:
    return stack.group.log_dir / f"{service}.log"


def parsed_lines(stack: Stack, service: str) -> list[dict[str, Any]]:
    """Every line of a service's log, parsed; fails on the first line that is not JSON."""
    out = []
    for number, line in enumerate(log_path(stack, service).read_text().splitlines(), 1):
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"{service}.log line {number} is not JSON: {line[:300]!r}")
        assert isinstance(parsed, dict), f"{service}.log line {number}: {line[:300]!r}"
        assert {"ts", "level", "logger", "msg"} <= set(parsed), f"{service}.log:{number}"
        out.append(parsed)
    return out


def _about(line: dict[str, Any], request_ids: set[str]) -> bool:
    return line.get("request_id") in request_ids


async def lines_about(
    stack: Stack, request_ids: list[str], timeout_s: float = 20.0
) -> dict[str, list[dict[str, Any]]]:
    """Wait until every service logged about every request; return those lines by service."""
    ids = set(request_ids)
    deadline = time.monotonic() + timeout_s
    while True:
        about = {
            service: [line for line in parsed_lines(stack, service) if _about(line, ids)]
            for service in ON_THE_PATH
        }
        missing = [
            (service, rid)
            for service, lines in about.items()
            for rid in request_ids
            if not any(line["request_id"] == rid for line in lines)
        ]
        if not missing:
            return about
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line about {missing} after {timeout_s}s")
        await asyncio.sleep(0.2)


async def test_every_line_is_json_lines_about_a_request_name_it_and_its_user_never_its_prompt(
    stack: Stack,
) -> None:
    marker = f"quokkamarker{secrets.token_hex(4)}"
    prompt = [{"role": "user", "content": f"Repeat after me: {marker} {marker}"}]
    body: dict[str, Any] = {"model": CHAT, "messages": prompt, "max_tokens": 8, "temperature": 0}
    headers = {"authorization": f"Bearer {stack.api_key}"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=120) as http:
        whole = await http.post("/chat/completions", json=body)
        assert whole.status_code == 200, whole.text
        completions = [whole.json()["choices"][0]["message"]["content"]]
        async with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as sse:
            assert sse.status_code == 200
            events = [line[6:] async for line in sse.aiter_lines() if line.startswith("data: ")]
            streamed_id = sse.headers["x-request-id"]
    assert events[-1] == "[DONE]"
    completions.append(
        "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    )
    request_ids = [whole.headers["x-request-id"], streamed_id]

    about = await lines_about(stack, request_ids)

    for service, lines in about.items():
        for line in lines:
            assert line.get("user_id") == USER, (service, line)
            if service != "gateway":  # the gateway does not know the site
                assert line.get("site_id") == stack.config.site_id, (service, line)
    for rid in request_ids:
        assert any(
            line["request_id"] == rid and line["msg"].startswith("POST /v1/chat/completions 200 ")
            for line in about["gateway"]
        ), rid
    everything = "\n".join(log_path(stack, s).read_text() for s in SERVICES)
    assert marker not in everything
    for completion in completions:
        assert completion.strip()
        if len(completion.strip()) >= 12:  # shorter text could match innocent words
            assert completion not in everything
    for service in SERVICES:  # and, once more, every line written by now is JSON
        parsed_lines(stack, service)
