"""probe_instance: true only when /health answers 200 and /v1/models lists the model."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from services.sim_vllm.__main__ import running
from services.sim_vllm.settings import Settings
from services.site_agent.launchers import probe_instance


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with running(Settings(model="probe-model", port=0)) as url:
        yield url


async def test_probe_is_true_for_an_instance_serving_the_model(sim_url: str) -> None:
    assert await probe_instance(sim_url, "probe-model", timeout_s=5.0)


async def test_probe_is_false_when_the_instance_serves_another_model(sim_url: str) -> None:
    assert not await probe_instance(sim_url, "other-model", timeout_s=5.0)


async def test_probe_is_false_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        assert not await probe_instance(f"http://127.0.0.1:{port}", "m", timeout_s=5.0)


async def test_probe_gives_up_on_a_silent_instance_at_its_timeout() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # the kernel accepts the connection; nobody ever answers
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        started = time.monotonic()
        assert not await probe_instance(url, "m", timeout_s=0.5)
        assert time.monotonic() - started < 2.0
