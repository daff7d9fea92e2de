"""SQL engine factory: SQLite by default, PostgreSQL when the URL says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///.first/first.db"


def normalise_url(url: str) -> str:
    """Pick the async driver for plain URLs (postgresql://, sqlite:///)."""
    for plain, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


def is_sqlite(url: str) -> bool:
    """Tell whether `url` names a SQLite database."""
    return normalise_url(url).startswith("sqlite")


def make_engine(url: str) -> AsyncEngine:
    """Return an engine; SQLite files get WAL and a busy timeout so services can share one."""
    url = normalise_url(url)
    if is_sqlite(url):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_async_engine(
        url, pool_size=5, max_overflow=5, pool_timeout=10, pool_pre_ping=True
    )


_RACED = (OperationalError, ProgrammingError, IntegrityError)
"""What CREATE TABLE raises when another process created the table between SQLAlchemy's check
and its statement (SQLite: "already exists"; PostgreSQL: DuplicateTable, or a unique
violation on pg_type)."""


async def create_tables(engine: AsyncEngine, metadata: sa.MetaData, attempts: int = 10) -> None:
    """Create `metadata`'s missing tables, safe against other processes doing it at once.

    Services start side by side on one database: when two race, the loser's statement fails;
    trying again finds the tables there (create_all checks first). Each lost race means
    another process created a table or index, so the tries needed are bounded by the number
    of them; a real failure persists and is raised after `attempts` tries.
    """
    for attempt in range(1, attempts + 1):
        try:
            async with engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
            return
        except _RACED:
            if attempt == attempts:
                raise
