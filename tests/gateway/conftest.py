"""A gateway app running in-process against the session's RabbitMQ vhost, Redis and SQLite."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from schemas import names
from schemas.codec import encode
from schemas.messages import ModelStatus, SiteHeartbeat
from services.access import apikeys
from services.access.settings import AccessSettings
from services.common.db import make_engine
from services.gateway.app import create_app
from services.gateway.settings import Settings
from tests.gateway.globus_fake import run_fake_globus


@dataclass
class GatewayUnderTest:
    app: FastAPI
    client: httpx.AsyncClient
    key: str
    admin_key: str
    settings: Settings


@pytest.fixture(scope="module")
def gateway_space(
    new_rabbit_url: Callable[[], str], new_redis_url: Callable[[], str]
) -> tuple[str, str]:
    """A vhost and Redis database for this module only: no other test's site is live here."""
    return new_rabbit_url(), new_redis_url()


@pytest.fixture
async def gateway(
    gateway_space: tuple[str, str], sqlite_url: str
) -> AsyncIterator[GatewayUnderTest]:
    rabbit_url, redis_url = gateway_space
    settings = Settings(
        rabbit_url=rabbit_url,
        redis_url=redis_url,
        database_url=sqlite_url,
        no_site_wait_s=0.3,
        max_body_bytes=2048,
        first_record_timeout_s=5,
    )
    engine = make_engine(sqlite_url)
    await apikeys.create_schema(engine)
    key, _ = await apikeys.create_key(engine, "alice")
    admin_key, _ = await apikeys.create_key(engine, "root", admin=True)
    await engine.dispose()
    app = create_app(settings, AccessSettings(database_url=sqlite_url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield GatewayUnderTest(app, client, key, admin_key, settings)


def split_settings(values: dict[str, Any]) -> tuple[Settings, AccessSettings]:
    """Return the gateway's settings and its access settings from one dict of values."""
    access = {k: v for k, v in values.items() if k in AccessSettings.model_fields}
    access.setdefault("database_url", values.get("database_url"))
    own = {k: v for k, v in values.items() if k not in access or k == "database_url"}
    return Settings(**own), AccessSettings(**access)


@dataclass
class Replica:
    """One in-process gateway built by `make_gateway`, and a Redis client on its database."""

    client: httpx.AsyncClient
    redis: Redis
    settings: Settings


MakeGateway = Callable[..., Awaitable[Replica]]


@pytest.fixture
async def make_gateway(
    gateway_space: tuple[str, str], sqlite_url: str
) -> AsyncIterator[MakeGateway]:
    """Build gateways with chosen settings, all on this module's vhost and Redis database
    (emptied first) and this test's SQL database: several of them are replicas of one
    deployment."""
    rabbit_url, redis_url = gateway_space
    async with Redis.from_url(redis_url) as redis:
        await redis.flushdb()
    running: list[tuple[Any, httpx.AsyncClient, Redis]] = []

    async def make(**overrides: Any) -> Replica:
        values: dict[str, Any] = {
            "rabbit_url": rabbit_url,
            "redis_url": redis_url,
            "database_url": sqlite_url,
            "no_site_wait_s": 0.3,
        }
        values.update(overrides)
        settings, access = split_settings(values)
        app = create_app(settings, access)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        redis = Redis.from_url(settings.redis_url)
        running.append((lifespan, client, redis))
        return Replica(client, redis, settings)

    yield make
    for lifespan, client, redis in reversed(running):
        await client.aclose()
        await redis.aclose()
        await lifespan.__aexit__(None, None, None)


async def live_site(redis: Redis, models: list[str]) -> None:
    """Mirror a heartbeat into the registry, as the router would: `models` are served."""
    beat = SiteHeartbeat(
        site_id="s1",
        agent_id="a1",
        sent_at=time.time() + 3600,  # stays live for the whole test
        interval_s=5.0,
        models=tuple(
            ModelStatus(model=m, state="hot", instances=1, running=0, waiting=0, capacity=8)
            for m in models
        ),
    )
    await redis.hset(names.REGISTRY_KEY, "s1", encode(beat))


ApiKeyFor = Callable[..., Awaitable[str]]


@pytest.fixture
def api_key_for() -> ApiKeyFor:
    """Issue an API key in a replica's database."""

    async def issue(replica: Replica, username: str, *, admin: bool = False) -> str:
        engine = make_engine(replica.settings.database_url)
        try:
            key, _ = await apikeys.create_key(engine, username, admin=admin)
        finally:
            await engine.dispose()
        return key

    return issue


@pytest.fixture(scope="module")
def fake_globus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a running `first fake-globus` (Auth + Groups) for this module."""
    yield from run_fake_globus(tmp_path_factory)
