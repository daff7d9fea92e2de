"""Ledgers on SQLite and PostgreSQL, and a vhost per module."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.accounting.ledger import create_schema
from services.common.db import make_engine


@pytest.fixture
async def ledger(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a fresh ledger, SQLite then PostgreSQL."""
    engine = make_engine(database_url)
    await create_schema(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def sqlite_ledger(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a fresh SQLite ledger."""
    engine = make_engine(sqlite_url)
    await create_schema(engine)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module")
def rabbit_url(new_rabbit_url: Callable[[], str]) -> str:
    """A vhost of this module's own: the consumer tests count what waits in
    first.accounting.usage, and must not see what another module left in the session's."""
    return new_rabbit_url()
