"""Services that start side by side on one database create its tables without tripping on
each other (SQLite and PostgreSQL, each on a fresh database)."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from services.access import apikeys
from services.accounting import ledger
from services.common.db import make_engine
from services.gateway import batch_db

SCHEMAS = (ledger.create_schema, apikeys.create_schema, batch_db.create_schema)


async def test_processes_creating_the_same_tables_at_once_all_succeed(database_url: str) -> None:
    engines = [make_engine(database_url) for _ in range(6)]  # one engine each, as processes
    try:
        await asyncio.gather(
            *(create(engine) for engine in engines for create in SCHEMAS for _ in range(2))
        )
        async with engines[0].connect() as conn:
            tables = await conn.run_sync(lambda sync: set(sa.inspect(sync).get_table_names()))
    finally:
        await asyncio.gather(*(engine.dispose() for engine in engines))
    assert {"usage_ledger", "usage_conflicts", "api_keys"} <= tables
