"""Fixtures of the launcher tests: instance specs that run the simulated vLLM, and waits."""

from __future__ import annotations

import asyncio
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable

import httpx
import pytest

from services.site_agent.instance_keys import bearer
from services.site_agent.launchers import InstanceRecord, Launcher, probe_instance
from services.site_agent.launchers.base import InstanceSpec
from services.site_agent.siteconfig import Resources

SIM_COMMAND = (
    sys.executable,
    "-m",
    "services.sim_vllm",
    "--model",
    "{served_name}",
    "--uds",
    "{uds}",
)


@pytest.fixture(autouse=True)
def reset_backend() -> None:
    """Replace the site agent tests' autouse fixture: these tests need no fake backend."""


def sim_spec(command: tuple[str, ...] = SIM_COMMAND, **env: str) -> InstanceSpec:
    """Return a spec with a fresh instance id and model name that runs the simulated vLLM."""
    tag = secrets.token_hex(4)
    return InstanceSpec(
        instance_id=f"t-{tag}",
        model=f"sim-{tag}",
        command=command,
        env=env,
        resources=Resources(cpus=1, memory_gb=0.25),
    )


def fixed_spec(cpus: int, memory_gb: float, gpus: int = 0) -> InstanceSpec:
    """A spec with a fixed id and command, for the exact text of generated job scripts."""
    return InstanceSpec(
        instance_id="t-abc",
        model="org/model",
        command=("serve", "--uds", "{uds}"),
        env={},
        resources=Resources(cpus=cpus, memory_gb=memory_gb, gpus=gpus),
    )


async def eventually(check: Callable[[], Awaitable[bool]], limit_s: float, what: str) -> None:
    """Wait until `check()` is true, polling; fail the test after `limit_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"not within {limit_s:g} s: {what}")
        await asyncio.sleep(0.1)


async def serving_url(launcher: Launcher, record: InstanceRecord, limit_s: float) -> str:
    """Wait until the instance reported its URL and serves its model; return the URL."""

    async def up() -> bool:
        url = await launcher.locate(record)
        key = launcher.key(record)
        return bool(url) and await probe_instance(url, record.model, timeout_s=2.0, key=key)

    await eventually(up, limit_s, f"instance {record.instance_id} serving")
    return record.url


async def chat_response(url: str, model: str, key: str) -> httpx.Response:
    """Send one chat completion with `key` ("": none); return the response."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        return await client.post(f"{url}/v1/chat/completions", json=body, headers=bearer(key))


async def chat(url: str, model: str, key: str) -> str:
    """Send one chat completion with the instance's key; return the answer's text."""
    response = await chat_response(url, model, key)
    response.raise_for_status()
    text: str = response.json()["choices"][0]["message"]["content"]
    return text


def port_open(url: str) -> bool:
    """Tell whether something accepts TCP connections at the URL's host and port."""
    parsed = httpx.URL(url)
    try:
        with socket.create_connection((parsed.host, parsed.port or 80), timeout=1.0):
            return True
    except OSError:
        return False
