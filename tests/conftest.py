"""Fixtures for real RabbitMQ, Redis and PostgreSQL on loopback.

Each test session gets its own RabbitMQ vhost, its own PostgreSQL database and a Redis
database number, so sessions never share queues or rows. A missing service is a failure,
never a skip: `scripts/test` installs and starts them.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

RABBIT_URL = os.environ.get("FIRST_TEST_RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/")
RABBIT_API = os.environ.get("FIRST_TEST_RABBIT_API", "http://127.0.0.1:15672/api")
REDIS_URL = os.environ.get("FIRST_TEST_REDIS_URL", "redis://127.0.0.1:6379")
POSTGRES_URL = os.environ.get(
    "FIRST_TEST_POSTGRES_URL", "postgresql+asyncpg://first:first@127.0.0.1:5432/first"
)


def _rabbit_auth() -> tuple[str, str]:
    parts = urllib.parse.urlsplit(RABBIT_URL)
    return (parts.username or "guest", parts.password or "guest")


@pytest.fixture(scope="session")
def new_rabbit_url() -> Iterator[Callable[[], str]]:
    """Make fresh vhosts on the shared RabbitMQ (one per isolated stack); delete them afterwards."""
    user = _rabbit_auth()[0]
    made: list[str] = []
    with httpx.Client(base_url=RABBIT_API, auth=_rabbit_auth(), timeout=10) as api:

        def make() -> str:
            vhost = urllib.parse.quote(f"first-test-{secrets.token_hex(4)}", safe="")
            api.put(f"/vhosts/{vhost}").raise_for_status()
            perms = {"configure": ".*", "write": ".*", "read": ".*"}
            api.put(f"/permissions/{vhost}/{user}", json=perms).raise_for_status()
            made.append(vhost)
            return f"{RABBIT_URL.rstrip('/')}/{vhost}"

        yield make
        for vhost in made:
            api.delete(f"/vhosts/{vhost}")


@pytest.fixture(scope="session")
def rabbit_url(new_rabbit_url: Callable[[], str]) -> str:
    """A fresh vhost for this session's tests."""
    return new_rabbit_url()


@pytest.fixture(scope="session")
def rabbit_api() -> Iterator[httpx.Client]:
    """The management API of the shared RabbitMQ (to inspect queues)."""
    with httpx.Client(base_url=RABBIT_API, auth=_rabbit_auth(), timeout=10) as api:
        yield api


@pytest.fixture(scope="session")
def new_redis_url() -> Callable[[], str]:
    """Hand out distinct Redis database numbers (1-15, in random order), flushed first."""
    numbers = list(range(1, 16))
    random.SystemRandom().shuffle(numbers)

    def make() -> str:
        url = f"{REDIS_URL.rstrip('/')}/{numbers.pop()}"
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            client.flushdb()
        finally:
            client.close()
        return url

    return make


@pytest.fixture(scope="session")
def redis_url(new_redis_url: Callable[[], str]) -> str:
    """A Redis database of this session's own."""
    return new_redis_url()


async def _pg_admin(sql: str) -> None:
    import asyncpg

    dsn = POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session; dropped afterwards."""
    name = f"first_test_{secrets.token_hex(4)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file of this test's own."""
    return f"sqlite+aiosqlite:///{tmp_path / 'first.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each SQL test runs on SQLite and on PostgreSQL, each time on a fresh database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'first.db'}"
        return
    name = f"first_test_{secrets.token_hex(4)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    yield f"{POSTGRES_URL.rsplit('/', 1)[0]}/{name}"
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[object]:
    """A Redis client on this session's database."""
    from services.common.redis import make_redis

    client = make_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def broker(rabbit_url: str) -> AsyncIterator[Any]:
    """A connected broker on this session's vhost, with the topology declared."""
    from services.common import topology
    from services.common.broker import make_broker

    broker = make_broker(rabbit_url)
    await broker.connect()
    await topology.declare_topology(broker)
    yield broker
    await broker.stop()


@pytest.fixture
async def channel(rabbit_url: str) -> AsyncIterator[Any]:
    """A plain aio-pika channel on this session's vhost."""
    from tests.site_agent.helpers import amqp

    async with amqp(rabbit_url) as channel:
        yield channel
