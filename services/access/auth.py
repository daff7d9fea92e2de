"""Who is calling: a bearer credential becomes a Principal (an API key or a Globus Auth token)."""

from __future__ import annotations

import msgspec
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas import names
from services.access import apikeys
from services.access.errors import Unauthenticated
from services.access.globus_auth import GlobusAuthenticator
from services.access.principal import Principal
from services.access.sealed import Sealer

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Principal)


def bearer_token(authorization: str | None) -> str:
    """Return the token of an `Authorization: Bearer …` header or raise 401."""
    if not authorization:
        raise Unauthenticated(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(
            "Malformed Authorization header; use 'Authorization: Bearer YOUR_KEY'.",
            code="invalid_api_key",
        )
    return token


class ApiKeyAuthenticator:
    """Resolve API keys through a Redis cache (by hash, bounded TTL, sealed) in front of SQL."""

    def __init__(
        self, engine: AsyncEngine, redis: Redis, cache_ttl_s: float, sealer: Sealer
    ) -> None:
        self._engine = engine
        self._redis = redis
        self._ttl_ms = max(1, int(cache_ttl_s * 1000))
        self._sealer = sealer

    async def authenticate(self, key: str) -> Principal:
        """Return the key's Principal or raise Unauthenticated (401)."""
        key_hash = apikeys.hash_key(key)
        cache_key = names.apikey_cache_key(key_hash)
        cached = await self._redis.get(cache_key)
        payload = self._sealer.open(cache_key, cached) if isinstance(cached, bytes) else None
        if payload is not None:
            return _decoder.decode(payload)
        record = await apikeys.find_key(self._engine, key_hash)
        if record is None:
            raise Unauthenticated("Incorrect API key provided.", code="invalid_api_key")
        principal = Principal(
            user_id=record.user_id, username=record.username, is_admin=record.is_admin
        )
        sealed = self._sealer.seal(cache_key, _encoder.encode(principal))
        await self._redis.set(cache_key, sealed, px=self._ttl_ms)
        return principal

    async def forget(self, key_hash: str) -> None:
        """Drop a key from the cache (after a revoke)."""
        await self._redis.delete(names.apikey_cache_key(key_hash))


class Authenticator:
    """One entry for every credential: our API keys by their prefix, else a Globus token."""

    def __init__(self, api_keys: ApiKeyAuthenticator, globus: GlobusAuthenticator | None) -> None:
        self.api_keys = api_keys
        self._globus = globus

    async def authenticate(self, authorization: str | None) -> Principal:
        """Return the caller's Principal; raise Unauthenticated (401) or Unavailable (503)."""
        token = bearer_token(authorization)
        if token.startswith(apikeys.KEY_PREFIX):
            return await self.api_keys.authenticate(token)
        if self._globus is None:
            raise Unauthenticated("Incorrect API key provided.", code="invalid_api_key")
        return await self._globus.authenticate(token)
