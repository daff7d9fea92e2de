"""A deployment for direct-producer tests: a vhost and a producer user with `first rabbit
setup`'s grant, a router admitting with AccessSettings, a site agent on the fake backend."""

from __future__ import annotations

import asyncio
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aio_pika
import httpx
import pytest
from redis.asyncio import Redis

from services.access import apikeys
from services.access.settings import AccessSettings, CatalogueModel, Limits
from services.common.db import make_engine
from services.common.rabbit_access import grant_for
from services.router.app import create_app as create_router
from services.router.settings import Settings as RouterSettings
from tests.conftest import RABBIT_API, _rabbit_auth
from tests.site_agent.fake_backend import FakeBackend
from tests.site_agent.helpers import (
    agent_settings,
    running_agent,
    unique,
)

PASSWORD = secrets.token_urlsafe(12)


@dataclass
class Deployment:
    rabbit_url: str  # the services' (guest) URL
    producer_url: str  # the producer user's URL: write to first.ingress, its reply queues
    producer_user: str
    redis_url: str
    key: str  # an API key of user "pipeline"
    site_id: str
    model: str


def _vhost_of(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.lstrip("/"))


def _with_user(url: str, user: str) -> str:
    parts = urllib.parse.urlsplit(url)
    netloc = f"{user}:{PASSWORD}@{parts.hostname}:{parts.port or 5672}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture(scope="module")
def producer_user(new_rabbit_url: Callable[[], str]) -> Iterator[tuple[str, str, str]]:
    """A vhost, and a producer user with `first rabbit setup`'s grant: write first.ingress,
    configure and read its own reply queues, nothing else."""
    url = new_rabbit_url()
    vhost = urllib.parse.quote(_vhost_of(url), safe="")
    user = unique("producer")
    with httpx.Client(base_url=RABBIT_API, auth=_rabbit_auth(), timeout=10) as api:
        api.put(f"/users/{user}", json={"password": PASSWORD, "tags": ""}).raise_for_status()
        grant = grant_for("producer", user)
        perms = {"configure": grant.configure, "write": grant.write, "read": grant.read}
        api.put(f"/permissions/{vhost}/{user}", json=perms).raise_for_status()
        try:
            yield url, _with_user(url, user), user
        finally:
            api.delete(f"/users/{user}")


@pytest.fixture
def forger(producer_user: tuple[str, str, str], rabbit_api: httpx.Client) -> Iterator[str]:
    """A RabbitMQ user wrongly allowed to write to first.requests (a misconfiguration)."""
    vhost = urllib.parse.quote(_vhost_of(producer_user[0]), safe="")
    user = unique("forger")
    rabbit_api.put(f"/users/{user}", json={"password": PASSWORD, "tags": ""}).raise_for_status()
    perms = {"configure": "^$", "write": r"^first\.requests$", "read": "^$"}
    rabbit_api.put(f"/permissions/{vhost}/{user}", json=perms).raise_for_status()
    try:
        yield user
    finally:
        rabbit_api.delete(f"/users/{user}")


@pytest.fixture(scope="module")
def module_redis_url(new_redis_url: Callable[[], str]) -> str:
    return new_redis_url()


@pytest.fixture(scope="module")
def backend() -> Iterator[FakeBackend]:
    server = FakeBackend(unique("fake-model")).start()
    yield server
    server.stop()


@pytest.fixture
async def deployment(
    producer_user: tuple[str, str, str],
    module_redis_url: str,
    sqlite_url: str,
    backend: FakeBackend,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Deployment]:
    """Router (admitting with the gateway's settings) and a site agent, both in-process."""
    rabbit_url, producer_url, user = producer_user
    redis_url = module_redis_url
    async with Redis.from_url(redis_url) as redis:
        await redis.flushdb()  # one database per module (a session has 15), empty per test
    limits = getattr(request, "param", Limits())
    access = AccessSettings(
        database_url=sqlite_url,
        models=[CatalogueModel(name=backend.model)],
        user_limits=limits,
    )
    engine = make_engine(sqlite_url)
    await apikeys.create_schema(engine)
    key, _ = await apikeys.create_key(engine, "pipeline")
    await engine.dispose()
    agent = agent_settings(rabbit_url, redis_url, {backend.model: [backend.url]})
    router = create_router(
        RouterSettings(rabbit_url=rabbit_url, redis_url=redis_url, no_site_wait_s=5.0), access
    )
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(router.router.lifespan_context(router))
        await stack.enter_async_context(running_agent(agent))
        registry = router.state.deps.registry
        deadline = time.monotonic() + 10
        while registry.get(agent.site_id) is None:
            assert time.monotonic() < deadline, "the site never became live"
            await asyncio.sleep(0.05)
        yield Deployment(
            rabbit_url, producer_url, user, redis_url, key, agent.site_id, backend.model
        )


async def publish_as(url: str, exchange: str, routing_key: str, message: aio_pika.Message) -> None:
    """Publish one raw message (confirmed) as the user of `url`, as a hand-made client would."""
    connection = await aio_pika.connect_robust(url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(message, routing_key=routing_key, timeout=5)
    finally:
        await connection.close()


def chat(model: str, text: str = "hi") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 5}
