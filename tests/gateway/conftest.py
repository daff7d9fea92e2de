"""A gateway app running in-process against the session's RabbitMQ vhost, Redis and SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
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


@pytest.fixture
async def gateway(
    rabbit_url: str, redis_url: str, sqlite_url: str
) -> AsyncIterator[GatewayUnderTest]:
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
