"""SQL engine factory: SQLite by default, PostgreSQL when the URL says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
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
