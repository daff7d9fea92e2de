"""API keys: `first keys` issues, lists and revokes them; the gateway honours each at once."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from services.access import apikeys
from services.cli import app
from services.common.db import make_engine
from tests.gateway.conftest import GatewayUnderTest

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


async def run(*args: str) -> str:
    """Run the CLI in a thread: it calls asyncio.run, which needs a thread without a loop."""
    return await asyncio.to_thread(invoke, *args)


async def test_keys_are_stored_only_as_hashes(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        await apikeys.create_schema(engine)
        key, record = await apikeys.create_key(engine, "alice", admin=True)
        found = await apikeys.find_key(engine, apikeys.hash_key(key))
        assert found == record
        assert found.is_admin
        async with engine.connect() as conn:
            rows = (await conn.execute(apikeys.api_keys.select())).all()
        assert all(key not in str(tuple(row)) for row in rows)
        assert await apikeys.find_key(engine, apikeys.hash_key(key + "x")) is None
    finally:
        await engine.dispose()


async def test_cli_creates_lists_and_revokes_and_the_gateway_follows(
    gateway: GatewayUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = gateway.settings.database_url
    monkeypatch.setenv("FIRST_REDIS_URL", gateway.settings.redis_url)
    key = (await run("keys", "create", "--user", "bob", "--database-url", db)).strip()
    assert key.startswith(apikeys.KEY_PREFIX)
    key_id = key.removeprefix(apikeys.KEY_PREFIX).split("-", 1)[0]

    listing = await run("keys", "list", "--database-url", db)
    line = next(row for row in listing.splitlines() if row.startswith(key_id))
    assert "bob" in line
    assert line.endswith("active")
    assert key not in listing

    headers = {"authorization": f"Bearer {key}"}
    assert (
        await gateway.client.get("/v1/models", headers=headers)
    ).status_code == 200  # cached now

    assert f"revoked {key_id}" in await run("keys", "revoke", key_id, "--database-url", db)
    response = await gateway.client.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert (await run("keys", "list", "--database-url", db)).count("revoked") == 1


def test_revoking_an_unknown_key_fails(sqlite_url: str) -> None:
    result = runner.invoke(app, ["keys", "revoke", "nope", "--database-url", sqlite_url])
    assert result.exit_code == 1
