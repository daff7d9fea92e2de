"""Ledgers on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
