"""Instances someone else runs (`urls`) take a key file: the agent's probes and forwards send
it, so such an instance can sit behind the same relay as the ones the agent starts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from faststream.rabbit import RabbitBroker
from redis.asyncio import Redis

from schemas.records import Final, Response
from services.devstack.procs import ProcessGroup
from services.site_agent import instance_keys
from services.site_agent.relay import RelayConfig, serve
from tests.e2e.conftest import free_port
from tests.site_agent.helpers import (
    agent_settings,
    make_request,
    read_stream,
    running_agent,
    send_to_site,
    unique,
    wait_for,
)


@pytest.fixture(autouse=True)
def reset_backend() -> None:
    """Replace the site agent tests' autouse fixture: these tests need no fake backend."""


@contextlib.asynccontextmanager
async def relayed_sim(model: str, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """Run sim-vllm on a Unix socket behind the relay; yield the relay's URL and key file."""
    uds = tmp_path / "sim.sock"
    key_file = tmp_path / "keys" / "sim.key"
    instance_keys.write_key(key_file, instance_keys.new_key())
    group = ProcessGroup(tmp_path / "logs")
    sim = [sys.executable, "-m", "services.sim_vllm", "--model", model, "--uds", str(uds)]
    group.start("sim-vllm", sim, dict(os.environ), None)
    port = free_port()
    config = RelayConfig("127.0.0.1", port, uds, instance_keys.read_key(key_file))
    ready = asyncio.Event()
    relay = asyncio.create_task(serve(config, ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        url = f"http://127.0.0.1:{port}"
        headers = instance_keys.bearer(config.key)
        async with httpx.AsyncClient(timeout=2, trust_env=False) as http:

            async def up() -> bool:
                return (await http.get(f"{url}/health", headers=headers)).status_code == 200

            await wait_for(up, 20)
        yield url, key_file
    finally:
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay
        group.stop_all()


async def test_a_urls_backend_behind_the_relay_is_sent_its_key(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, redis_client: Redis, tmp_path: Path
) -> None:
    model = unique("keyed-model")
    async with relayed_sim(model, tmp_path) as (url, key_file):
        settings = agent_settings(rabbit_url, redis_url, {model: [url]})
        settings = settings.model_copy(update={"backend_key_files": {model: key_file}})
        request = make_request(model, body={"model": model, "messages": [], "max_tokens": 3})
        async with running_agent(settings):
            await send_to_site(broker, settings.site_id, request)
            response, final = await read_stream(redis_client, request.request_id)

    assert isinstance(response, Response)
    assert response.status == 200, response.body
    assert json.loads(response.body)["usage"]["completion_tokens"] == 3
    assert isinstance(final, Final)
    assert final.outcome == "completed"


def test_the_key_file_setting_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from services.site_agent.settings import Settings

    monkeypatch.setenv("FIRST_SITE_AGENT_BACKEND_KEY_FILES", json.dumps({"m": str(tmp_path)}))

    assert Settings().backend_key_files == {"m": tmp_path}
