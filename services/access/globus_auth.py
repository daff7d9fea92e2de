"""Globus Auth access tokens: introspection through globus-sdk, checks, and a Redis cache.

The gateway is a Globus Auth resource server with a confidential client. A bearer token is
introspected (`oauth2_token_introspect(token, include="identity_set")`); globus-sdk checks
nothing itself, so `check_introspection` (pure) does: `active`, expiry, audience, scope, and
the identity provider's domain (the part after `@` of the username) against an allow-list.
Group membership, when a policy needs it, comes from a dependent token for Globus Groups
(`oauth2_get_dependent_tokens` → `GroupsClient.get_my_groups`), as globus-sdk does it.

Verdicts — the Principal, or the reason for refusing — are cached in Redis under a SHA-256 of
the token (never the token), for at most `cache_ttl_s` and never past the token's expiry: a
token revoked at Globus stops working within that TTL, on every gateway replica at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import globus_sdk
import msgspec
from globus_sdk.transport import RequestsTransport, RetryConfig
from redis.asyncio import Redis

from schemas import names
from services.access.errors import Unauthenticated, Unavailable
from services.access.principal import Principal
from services.access.sealed import Sealer, policy_digest
from services.access.settings import AccessSettings

logger = logging.getLogger(__name__)

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    """Why a token is refused (cached like a Principal, so bad tokens do not hammer Globus)."""

    code: str
    message: str


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """What the cache holds for one token hash."""

    principal: Principal | None = None
    refusal: Refusal | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Verdict)


def token_hash(token: str) -> str:
    """Return the hex SHA-256 that stands for a token in Redis and logs."""
    return hashlib.sha256(token.encode()).hexdigest()


def domain_of(username: str) -> str:
    """Return the identity provider's domain of a Globus username (`jo@anl.gov` → `anl.gov`)."""
    return username.rpartition("@")[2].lower() if "@" in username else ""


def check_introspection(
    data: Mapping[str, Any],
    *,
    now: float,
    audience: str,
    required_scope: str,
    domains: frozenset[str],
) -> Principal | Refusal:
    """Decide on one introspection response (pure). Groups are filled in later if needed."""
    if not data.get("active"):
        return Refusal(code="invalid_token", message="The access token is not active.")
    exp = data.get("exp")
    if not isinstance(exp, int | float) or exp <= now:
        return Refusal(code="token_expired", message="The access token has expired.")
    aud = data.get("aud") or []
    auds = {aud} if isinstance(aud, str) else set(aud)
    if audience and audience not in auds:
        return Refusal(
            code="invalid_audience", message="The access token was not issued for this service."
        )
    scopes = str(data.get("scope") or "").split()
    if required_scope and required_scope not in scopes:
        return Refusal(
            code="insufficient_scope",
            message=f"The access token lacks the scope `{required_scope}`.",
        )
    username = str(data.get("username") or "")
    sub = str(data.get("sub") or "")
    if not sub or not username:
        return Refusal(code="invalid_token", message="The access token names no identity.")
    domain = domain_of(username)
    if domains and domain not in domains:
        return Refusal(
            code="domain_not_allowed",
            message=f"Identities from `{domain or 'this provider'}` may not use this service.",
        )
    identity_set = tuple(str(i) for i in data.get("identity_set") or ())
    return Principal(
        user_id=sub,
        username=username,
        domain=domain,
        identity_set=identity_set,
        expires_at=float(exp),
    )


class GlobusClient:
    """The blocking globus-sdk calls (run in a worker thread), each with a timeout."""

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        *,
        auth_url: str | None,
        groups_url: str | None,
        timeout_s: float,
    ) -> None:
        self._transport = RequestsTransport(http_timeout=timeout_s)
        # One retry on 5xx/429: a slow Globus must not hold a request for long.
        self._retry = RetryConfig(max_retries=1, max_sleep=1)
        self._auth = globus_sdk.ConfidentialAppAuthClient(
            client_id,
            client_secret,
            base_url=auth_url,
            transport=self._transport,
            retry_config=self._retry,
        )
        self._groups_url = groups_url

    def introspect(self, token: str) -> dict[str, Any]:
        response = self._auth.oauth2_token_introspect(token, include="identity_set")
        data: dict[str, Any] = dict(response.data)
        return data

    def group_ids(self, token: str) -> tuple[str, ...]:
        dependent = self._auth.oauth2_get_dependent_tokens(token)
        groups_token = dependent.by_resource_server[GROUPS_RESOURCE_SERVER]["access_token"]
        groups = globus_sdk.GroupsClient(
            base_url=self._groups_url,
            authorizer=globus_sdk.AccessTokenAuthorizer(groups_token),
            transport=self._transport,
            retry_config=self._retry,
        )
        return tuple(str(group["id"]) for group in groups.get_my_groups())


class GlobusAuthenticator:
    """Resolve Globus access tokens to Principals through the Redis cache."""

    def __init__(
        self,
        client: GlobusClient,
        redis: Redis,
        *,
        audience: str,
        required_scope: str,
        domains: frozenset[str],
        cache_ttl_s: float,
        timeout_s: float,
        want_groups: bool,
        secret: bytes,
    ) -> None:
        self._client = client
        self._redis = redis
        self._audience = audience
        self._scope = required_scope
        self._domains = domains
        self._ttl_s = cache_ttl_s
        self._timeout_s = timeout_s
        self._want_groups = want_groups
        # A verdict holds only for the policy that produced it: another component judging
        # with other domains, audience, scope or group needs must not reuse it.
        policy = policy_digest(audience, required_scope, sorted(domains))
        self._sealer = Sealer(secret, "globus", policy + bytes([want_groups]))

    async def authenticate(self, token: str) -> Principal:
        """Return the caller's Principal; raise Unauthenticated (401) or Unavailable (503)."""
        key = names.globus_cache_key(token_hash(token))
        cached = await self._redis.get(key)
        payload = self._sealer.open(key, cached) if isinstance(cached, bytes) else None
        verdict = _decoder.decode(payload) if payload is not None else None
        now = time.time()
        if verdict is None or _expired(verdict.principal, now):
            verdict = await self._introspect(token, now)
            ttl_s = self._ttl_s
            if verdict.principal is not None and verdict.principal.expires_at is not None:
                ttl_s = min(ttl_s, verdict.principal.expires_at - now)
            if ttl_s > 0:
                sealed = self._sealer.seal(key, _encoder.encode(verdict))
                await self._redis.set(key, sealed, px=max(1, int(ttl_s * 1000)))
        if verdict.principal is None:
            refusal = verdict.refusal or Refusal(code="invalid_token", message="Token refused.")
            raise Unauthenticated(refusal.message, code=refusal.code)
        return verdict.principal

    async def _introspect(self, token: str, now: float) -> Verdict:
        # Introspection authenticates *our* client: Globus refusing it is a configuration
        # error (503 and logged), never the caller's fault.
        data = await self._call(self._client.introspect, token, refused_means_token=False)
        decided = check_introspection(
            data,
            now=now,
            audience=self._audience,
            required_scope=self._scope,
            domains=self._domains,
        )
        if isinstance(decided, Refusal):
            logger.info("globus token refused: %s", decided.code)
            return Verdict(refusal=decided)
        if self._want_groups:
            # The dependent grant is made with the caller's token: a refusal is about that token.
            groups = await self._call(self._client.group_ids, token, refused_means_token=True)
            if groups is None:
                return Verdict(
                    refusal=Refusal(code="invalid_token", message="Globus Auth refused the token.")
                )
            decided = msgspec.structs.replace(decided, groups=groups)
        return Verdict(principal=decided)

    async def _call(self, fn: Any, token: str, *, refused_means_token: bool) -> Any:
        """Run one blocking globus-sdk call in a thread, bounded; None if Globus refused it."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, token), self._timeout_s)
        except globus_sdk.GlobusAPIError as exc:
            if refused_means_token and exc.http_status in (400, 401, 403):
                logger.info("globus refused the dependent grant: %s", exc.http_status)
                return None
            raise _unavailable(f"Globus answered {exc.http_status} ({exc.code})") from exc
        except (globus_sdk.NetworkError, TimeoutError, OSError) as exc:
            raise _unavailable(type(exc).__name__) from exc


def _expired(principal: Principal | None, now: float) -> bool:
    expires_at = None if principal is None else principal.expires_at
    return expires_at is not None and expires_at <= now


def _unavailable(why: str) -> Unavailable:
    logger.error("globus auth unavailable: %s", why)
    return Unavailable(
        "Globus Auth could not be reached to check the token; retry later.",
        code="auth_unavailable",
        headers={"retry-after": "5"},
    )


def globus_from_settings(
    settings: AccessSettings, redis: Redis, secret: bytes
) -> GlobusAuthenticator | None:
    """Return the Globus token path if a confidential client is configured."""
    if not settings.globus_client_id:
        return None
    client = GlobusClient(
        settings.globus_client_id,
        settings.globus_client_secret.get_secret_value(),
        auth_url=settings.globus_auth_url,
        groups_url=settings.globus_groups_url,
        timeout_s=settings.globus_timeout_s,
    )
    return GlobusAuthenticator(
        client,
        redis,
        audience=settings.globus_audience or settings.globus_client_id,
        required_scope=settings.globus_required_scope,
        domains=frozenset(d.lower() for d in settings.globus_domains),
        cache_ttl_s=settings.globus_cache_ttl_s,
        timeout_s=settings.globus_timeout_s,
        # Group lookups cost two more calls to Globus per cache miss: only when a policy needs them.
        want_groups=any(m.groups for m in settings.models),
        secret=secret,
    )
