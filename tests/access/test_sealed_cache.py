"""Redis is not a root of trust: a writer of Redis (say, a site agent's credential on a
compromised node) cannot mint a principal or a Globus verdict the gateway believes.

Each attack writes the cache entry by hand, as such an attacker could, then calls the gateway.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
from prometheus_client import REGISTRY

from schemas import names
from services.access import apikeys
from services.access.apikeys import hash_key
from services.access.globus_auth import Verdict, token_hash
from services.access.principal import Principal
from services.common.db import make_engine
from tests.access.test_globus_auth import bearer, globus_settings
from tests.gateway.conftest import ApiKeyFor, MakeGateway, live_site
from tests.gateway.globus_fake import mint

ADMIN = Principal(user_id="root", username="root", is_admin=True)


def refused_entries(cache: str) -> float:
    sample = "first_access_cache_entries_refused_total"
    return REGISTRY.get_sample_value(sample, {"cache": cache}) or 0.0


async def test_a_principal_written_into_redis_by_hand_is_not_an_admin(
    make_gateway: MakeGateway,
) -> None:
    replica = await make_gateway()
    forged_key = "first-forged000000-" + "x" * 43
    cache_key = names.apikey_cache_key(hash_key(forged_key))
    await replica.redis.set(cache_key, msgspec.msgpack.encode(ADMIN))
    refused = refused_entries("apikey")

    reply = await replica.client.get("/v1/usage/report", headers=bearer(forged_key))

    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "invalid_api_key")
    assert refused_entries("apikey") == refused + 1


async def test_an_admins_cached_entry_copied_under_a_users_key_grants_nothing(
    make_gateway: MakeGateway, api_key_for: ApiKeyFor
) -> None:
    replica = await make_gateway()
    admin_key = await api_key_for(replica, "root", admin=True)
    user_key = await api_key_for(replica, "mallory")
    assert (await replica.client.get("/v1/models", headers=bearer(admin_key))).status_code == 200
    sealed = await replica.redis.get(names.apikey_cache_key(hash_key(admin_key)))
    assert sealed is not None
    await replica.redis.set(names.apikey_cache_key(hash_key(user_key)), sealed)

    reply = await replica.client.get("/v1/usage/report", headers=bearer(user_key))

    assert reply.status_code == 403  # mallory, resolved again from SQL: not an admin
    usage = await replica.client.get("/v1/usage", headers=bearer(user_key))
    assert usage.json()["user_id"] == "mallory"


async def test_a_globus_verdict_written_into_redis_by_hand_is_not_trusted(
    fake_globus: str, make_gateway: MakeGateway
) -> None:
    replica = await make_gateway(**globus_settings(fake_globus))
    await live_site(replica.redis, ["open-model"])
    token = "a-token-globus-never-issued"
    verdict = Verdict(principal=ADMIN)
    await replica.redis.set(
        names.globus_cache_key(token_hash(token)), msgspec.msgpack.encode(verdict)
    )

    reply = await replica.client.get("/v1/models", headers=bearer(token))

    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "invalid_token")


async def test_a_verdict_of_a_laxer_policy_is_not_reused_under_a_stricter_one(
    fake_globus: str, make_gateway: MakeGateway
) -> None:
    """A component that admits any domain shares the cache (and its secret) with one that
    admits anl.gov only: the first's verdict on a uchicago.edu token must not pass the second."""
    shared: dict[str, Any] = {"cache_secret": hashlib.sha256(b"one deployment").hexdigest()}
    lax = await make_gateway(**globus_settings(fake_globus, globus_domains=[], **shared))
    strict = await make_gateway(
        **globus_settings(fake_globus, globus_domains=["anl.gov"], **shared)
    )
    await live_site(lax.redis, ["open-model"])
    token = mint(fake_globus, "kim@uchicago.edu")
    assert (await lax.client.get("/v1/models", headers=bearer(token))).status_code == 200

    reply = await strict.client.get("/v1/models", headers=bearer(token))

    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "domain_not_allowed")


async def test_replicas_with_one_secret_share_their_cache(
    make_gateway: MakeGateway, api_key_for: ApiKeyFor
) -> None:
    """The seal does not cost the cache its point: a replica trusts another's sealed entry
    (shown by revoking the key in SQL alone: only the cache still knows it)."""
    shared = {"cache_secret": "the deployment's secret"}
    first = await make_gateway(**shared)
    second = await make_gateway(**shared)
    key = await api_key_for(first, "alice")
    assert (await first.client.get("/v1/models", headers=bearer(key))).status_code == 200
    engine = make_engine(first.settings.database_url)
    try:
        assert await apikeys.revoke_key(engine, key.split("-")[1]) is not None
    finally:
        await engine.dispose()
    refused = refused_entries("apikey")

    assert (await second.client.get("/v1/models", headers=bearer(key))).status_code == 200
    assert refused_entries("apikey") == refused
