"""Fixtures of the site agent tests: a fake vLLM backend, a running agent, broker taps."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from faststream.rabbit import RabbitBroker

from schemas import names
from services.common import topology
from services.common.broker import make_broker
from services.site_agent.settings import Settings
from tests.site_agent.fake_backend import FakeBackend
from tests.site_agent.helpers import Tap, agent_settings, amqp, running_agent, tap, unique

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
async def broker(rabbit_url: str) -> AsyncIterator[RabbitBroker]:
    broker = make_broker(rabbit_url)
    await broker.connect()
    await topology.declare_topology(broker)
    yield broker
    await broker.stop()


@pytest.fixture
async def channel(rabbit_url: str) -> AsyncIterator[Any]:
    async with amqp(rabbit_url) as channel:
        yield channel


@pytest.fixture
async def usage(channel: Any) -> Tap:
    return await tap(channel, names.USAGE_EXCHANGE, "usage.#")
