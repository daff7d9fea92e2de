"""A gateway app running in-process against the session's RabbitMQ vhost, Redis and SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI

from services.common.db import make_engine
from services.gateway import apikeys
from services.gateway.app import create_app
from services.gateway.settings import Settings


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
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield GatewayUnderTest(app, client, key, admin_key, settings)
