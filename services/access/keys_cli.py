"""`first keys create|list|revoke`: manage API keys in the SQL database."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated

import typer

from schemas import names
from services.access import apikeys
from services.access.settings import AccessSettings
from services.common.db import make_engine
from services.common.redis import make_redis
from services.common.settings import CommonSettings

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)

DbOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="Defaults to FIRST_ACCESS_DATABASE_URL.",
    ),
]


def _url(database_url: str | None) -> str:
    return database_url or AccessSettings().database_url


@keys_app.command("create")
def create(
    user: Annotated[str, typer.Option("--user", help="The user the key belongs to.")],
    admin: Annotated[bool, typer.Option("--admin", help="May read every user's usage.")] = False,
    database_url: DbOption = None,
) -> None:
    """Issue a key; it is printed once and stored only as a hash."""

    typer.echo(asyncio.run(apikeys.issue_key(_url(database_url), user, admin=admin)))


@keys_app.command("list")
def list_(database_url: DbOption = None) -> None:
    """List keys (ids, owners, state), never the secrets."""

    async def run() -> list[apikeys.KeyRecord]:
        engine = make_engine(_url(database_url))
        try:
            await apikeys.create_schema(engine)
            return await apikeys.list_keys(engine)
        finally:
            await engine.dispose()

    typer.echo(f"{'key_id':<14} {'user':<24} {'admin':<6} {'created (UTC)':<20} state")
    for key in asyncio.run(run()):
        created = dt.datetime.fromtimestamp(key.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        state = "revoked" if key.revoked_at else "active"
        typer.echo(f"{key.key_id:<14} {key.username:<24} {key.is_admin!s:<6} {created:<20} {state}")


@keys_app.command("revoke")
def revoke(key_id: str, database_url: DbOption = None) -> None:
    """Revoke a key by id; it stops working at once on every gateway."""

    async def run() -> bool:
        engine = make_engine(_url(database_url))
        redis = make_redis(CommonSettings().redis_url)
        try:
            key_hash = await apikeys.revoke_key(engine, key_id)
            if key_hash is None:
                return False
            await redis.delete(names.apikey_cache_key(key_hash))
            return True
        finally:
            await redis.aclose()
            await engine.dispose()

    if not asyncio.run(run()):
        typer.echo(f"no key with id {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")
