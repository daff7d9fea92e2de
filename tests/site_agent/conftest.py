"""Fixtures of the site agent tests: a fake vLLM backend, a running agent, broker taps."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from schemas import names
from services.site_agent.settings import Settings
from tests.site_agent.fake_backend import FakeBackend
from tests.site_agent.helpers import Tap, agent_settings, running_agent, tap, unique

MODEL = unique("fake-model")


@pytest.fixture(scope="module")
def backend() -> Iterator[FakeBackend]:
    server = FakeBackend(MODEL).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def reset_backend(backend: FakeBackend) -> None:
    backend.chunk_delay_s = 0.0
    backend.healthy = True
    backend.error_shape = "nested"


@pytest.fixture
async def agent(rabbit_url: str, redis_url: str, backend: FakeBackend) -> AsyncIterator[Settings]:
    settings = agent_settings(rabbit_url, redis_url, {MODEL: [backend.url]})
    async with running_agent(settings):
        yield settings


@pytest.fixture
async def usage(channel: Any) -> Tap:
    return await tap(channel, names.USAGE_EXCHANGE, "usage.#")
