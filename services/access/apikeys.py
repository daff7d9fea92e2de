"""API keys: issued once in clear, stored as SHA-256 hashes in the SQL database."""

from __future__ import annotations

import hashlib
import secrets
import time

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from services.common.db import create_tables, make_engine

KEY_PREFIX = "first-"

metadata = sa.MetaData()
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("user_id", sa.String(200), nullable=False),
    sa.Column("username", sa.String(200), nullable=False),
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One stored key, without its secret."""

    key_id: str
    user_id: str
    username: str
    is_admin: bool
    created_at: float
    revoked_at: float | None = None


def hash_key(key: str) -> str:
    """Return the hex SHA-256 under which a key is stored and cached."""
    return hashlib.sha256(key.encode()).hexdigest()


async def create_schema(engine: AsyncEngine) -> None:
    """Create the keys table if it is missing."""
    await create_tables(engine, metadata)


async def create_key(
    engine: AsyncEngine, username: str, *, admin: bool = False
) -> tuple[str, KeyRecord]:
    """Issue a key for `username`; the clear key is returned once and never stored."""
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
    record = KeyRecord(
        key_id=key_id, user_id=username, username=username, is_admin=admin, created_at=time.time()
    )
    async with engine.begin() as conn:
        await conn.execute(
            api_keys.insert().values(key_hash=hash_key(key), **msgspec.structs.asdict(record))
        )
    return key, record


async def issue_key(database_url: str, username: str, *, admin: bool = False) -> str:
    """Issue a key into the database at `database_url` (schema created if missing)."""
    engine = make_engine(database_url)
    try:
        await create_schema(engine)
        key, _ = await create_key(engine, username, admin=admin)
        return key
    finally:
        await engine.dispose()


async def find_key(engine: AsyncEngine, key_hash: str) -> KeyRecord | None:
    """Return the live (not revoked) key with this hash, if any."""
    query = sa.select(api_keys).where(
        api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None)
    )
    async with engine.connect() as conn:
        row = (await conn.execute(query)).mappings().first()
    if row is None:
        return None
    return _record(row)


async def list_keys(engine: AsyncEngine) -> list[KeyRecord]:
    """Return every key, oldest first."""
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(api_keys).order_by(api_keys.c.created_at))).mappings()
        return [_record(row) for row in rows]


async def revoke_key(engine: AsyncEngine, key_id: str) -> str | None:
    """Mark a key revoked; return its hash (to drop from caches) or None if unknown."""
    async with engine.begin() as conn:
        row = (
            await conn.execute(sa.select(api_keys.c.key_hash).where(api_keys.c.key_id == key_id))
        ).first()
        if row is None:
            return None
        await conn.execute(
            api_keys.update().where(api_keys.c.key_id == key_id).values(revoked_at=time.time())
        )
    return str(row[0])


def _record(row: sa.RowMapping) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        user_id=row["user_id"],
        username=row["username"],
        is_admin=bool(row["is_admin"]),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )
