"""Globus Auth tokens at the gateway: globus-sdk's real calls against a local Globus stand-in.

The stand-in (`first fake-globus`) runs as its own process on loopback; the gateway's
globus-sdk clients are pointed at it by base URL, exactly as an operator would point them at
globus.org. Nothing here reaches the internet.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.access import apikeys
from services.access.globus_auth import Refusal, check_introspection
from services.access.principal import Principal
from services.access.settings import CatalogueModel
from services.common.db import make_engine
from tests.faults.privates import free_port
from tests.gateway.conftest import MakeGateway, live_site
from tests.gateway.globus_fake import (
    CACHE_TTL_S,
    CLIENT_ID,
    MEMBERS,
    SECRET,
    introspections,
    mint,
    revoke,
)

MODELS = [
    CatalogueModel(name="open-model"),
    CatalogueModel(name="group-model", groups=[MEMBERS]),
    CatalogueModel(name="domain-model", domains=["uchicago.edu"]),
]


def globus_settings(globus_url: str, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "models": MODELS,
        "globus_client_id": CLIENT_ID,
        "globus_client_secret": SECRET,
        "globus_auth_url": globus_url,
        "globus_groups_url": globus_url,
        "globus_domains": ["anl.gov", "uchicago.edu"],
        "globus_cache_ttl_s": CACHE_TTL_S,
        "globus_timeout_s": 3.0,
    }
    values.update(extra)
    return values


@pytest.fixture
def client_for(make_gateway: MakeGateway) -> Callable[..., Any]:
    """Build a gateway (in-process) with Globus at `globus_url`; every model is served."""

    async def make(globus_url: str, **extra: Any) -> tuple[httpx.AsyncClient, Redis]:
        replica = await make_gateway(**globus_settings(globus_url, **extra))
        await live_site(replica.redis, [m.name for m in MODELS])
        return replica.client, replica.redis

    return make


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def model_ids(client: httpx.AsyncClient, token: str) -> set[str]:
    reply = await client.get("/v1/models", headers=bearer(token))
    assert reply.status_code == 200, reply.text
    return {m["id"] for m in reply.json()["data"]}


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


# ------------------------------------------------------------------- pure checks


def introspection(**over: Any) -> dict[str, Any]:
    data = {
        "active": True,
        "exp": 2_000,
        "aud": [CLIENT_ID],
        "scope": "openid urn:first:all",
        "sub": "u-1",
        "username": "jo@anl.gov",
        "identity_set": ["u-1", "u-2"],
    }
    data.update(over)
    return data


def decide(data: dict[str, Any], **over: Any) -> Principal | Refusal:
    kwargs: dict[str, Any] = {
        "now": 1_000.0,
        "audience": CLIENT_ID,
        "required_scope": "urn:first:all",
        "domains": frozenset({"anl.gov"}),
    }
    kwargs.update(over)
    return check_introspection(data, **kwargs)


def test_an_active_token_for_us_from_an_allowed_domain_is_a_principal() -> None:
    assert decide(introspection()) == Principal(
        user_id="u-1",
        username="jo@anl.gov",
        domain="anl.gov",
        identity_set=("u-1", "u-2"),
        expires_at=2_000.0,
    )


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (introspection(active=False), "invalid_token"),
        (introspection(exp=999), "token_expired"),
        (introspection(exp=None), "token_expired"),
        (introspection(aud=["someone-else"]), "invalid_audience"),
        (introspection(scope="openid"), "insufficient_scope"),
        (introspection(username="eve@evil.org"), "domain_not_allowed"),
        (introspection(username="nodomain"), "domain_not_allowed"),
        (introspection(sub=""), "invalid_token"),
    ],
)
def test_each_failed_check_is_a_refusal_naming_it(data: dict[str, Any], code: str) -> None:
    decided = decide(data)
    assert isinstance(decided, Refusal)
    assert decided.code == code


def test_an_empty_domain_allow_list_admits_every_domain() -> None:
    decided = decide(introspection(username="x@anywhere.org"), domains=frozenset())
    assert isinstance(decided, Principal)


# ------------------------------------------------------------- through the gateway


async def test_a_valid_token_works_and_sees_only_models_it_may_use(
    fake_globus: str, client_for: Callable[..., Any]
) -> None:
    client, _ = await client_for(fake_globus)
    anl = mint(fake_globus, "jo@anl.gov")
    assert await model_ids(client, anl) == {"open-model"}
    member = mint(fake_globus, "kim@anl.gov", groups=[MEMBERS])
    assert await model_ids(client, member) == {"open-model", "group-model"}
    uchicago = mint(fake_globus, "al@uchicago.edu")
    assert await model_ids(client, uchicago) == {"open-model", "domain-model"}


async def test_a_model_the_caller_may_not_use_is_a_404_as_if_it_did_not_exist(
    fake_globus: str, client_for: Callable[..., Any]
) -> None:
    client, _ = await client_for(fake_globus)
    outsider = mint(fake_globus, "jo@anl.gov", groups=["another-group"])
    for model in ("group-model", "domain-model"):
        reply = await client.post(
            "/v1/chat/completions", json=chat(model), headers=bearer(outsider)
        )
        assert reply.status_code == 404
        assert reply.json()["error"]["code"] == "model_not_found"
        reply = await client.get(f"/v1/models/{model}", headers=bearer(outsider))
        assert reply.status_code == 404


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ({"username": "jo@anl.gov", "expires_in": -5}, "invalid_token"),
        ({"username": "jo@anl.gov", "aud": ["another-service"]}, "invalid_audience"),
        ({"username": "eve@evil.org"}, "domain_not_allowed"),
    ],
)
async def test_refused_tokens_get_401_naming_the_reason(
    fake_globus: str, client_for: Callable[..., Any], spec: dict[str, Any], code: str
) -> None:
    client, _ = await client_for(fake_globus)
    token = mint(fake_globus, **spec)
    reply = await client.get("/v1/models", headers=bearer(token))
    assert reply.status_code == 401
    error = reply.json()["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert token not in reply.text


async def test_an_unknown_token_is_401_and_a_malformed_header_too(
    fake_globus: str, client_for: Callable[..., Any]
) -> None:
    client, _ = await client_for(fake_globus)
    reply = await client.get("/v1/models", headers=bearer("never-issued"))
    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "invalid_token")
    reply = await client.get("/v1/models", headers={"authorization": "Basic abc"})
    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "invalid_api_key")


async def test_a_wrong_scope_is_refused_when_the_service_requires_one(
    fake_globus: str, client_for: Callable[..., Any]
) -> None:
    client, _ = await client_for(fake_globus, globus_required_scope="urn:first:inference")
    token = mint(fake_globus, "jo@anl.gov", scope="openid email")
    reply = await client.get("/v1/models", headers=bearer(token))
    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "insufficient_scope")
    token = mint(fake_globus, "jo@anl.gov", scope="openid urn:first:inference")
    assert (await client.get("/v1/models", headers=bearer(token))).status_code == 200


async def test_verdicts_are_cached_by_hash_and_a_revoked_token_stops_within_the_ttl(
    fake_globus: str, client_for: Callable[..., Any]
) -> None:
    client, redis = await client_for(fake_globus)
    token = mint(fake_globus, "jo@anl.gov")
    before = introspections(fake_globus)
    for _ in range(5):
        assert (await client.get("/v1/models", headers=bearer(token))).status_code == 200
    assert introspections(fake_globus) == before + 1  # one introspection for five requests
    keys = [k async for k in redis.scan_iter(match="first:globus:*")]
    assert len(keys) == 1
    assert token.encode() not in keys[0]
    assert token.encode() not in (await redis.get(keys[0]) or b"")

    revoke(fake_globus, token)
    revoked_at = time.monotonic()
    while (await client.get("/v1/models", headers=bearer(token))).status_code == 200:
        assert time.monotonic() - revoked_at < CACHE_TTL_S + 1.0, "revoked token still works"
        await asyncio.sleep(0.1)
    reply = await client.get("/v1/models", headers=bearer(token))
    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "invalid_token")


async def test_api_keys_keep_working_beside_globus_tokens(
    fake_globus: str, client_for: Callable[..., Any], sqlite_url: str
) -> None:
    client, _ = await client_for(fake_globus)
    engine = make_engine(sqlite_url)
    try:
        key, _ = await apikeys.create_key(engine, "pipeline")
    finally:
        await engine.dispose()
    # API keys carry no groups or domain: the open model only.
    assert await model_ids(client, key) == {"open-model"}


async def test_globus_unreachable_is_a_503_not_a_401(
    fake_globus: str, client_for: Callable[..., Any]
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    client, _ = await client_for(closed, globus_timeout_s=2.0)
    reply = await client.get("/v1/models", headers=bearer("some-globus-token"))
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "auth_unavailable"
    assert reply.headers["retry-after"]


async def test_wrong_client_credentials_are_a_503_for_the_operator(
    fake_globus: str, client_for: Callable[..., Any]
) -> None:
    client, _ = await client_for(fake_globus, globus_client_secret="wrong")
    token = mint(fake_globus, "jo@anl.gov")
    reply = await client.get("/v1/models", headers=bearer(token))
    assert (reply.status_code, reply.json()["error"]["code"]) == (503, "auth_unavailable")
