"""What admits a request, whichever door it came through (HTTP at the gateway, `first.ingress`
at the router): who is calling, the body's checks, the catalogue and its access policy, the
limits, and the job it becomes. `Access` bundles them, built once per process by `build_access`."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.messages import Endpoint, IngressRequest, RunInference
from schemas.names import Priority
from services.access.auth import ApiKeyAuthenticator, Authenticator
from services.access.errors import NotFound
from services.access.globus_auth import globus_from_settings
from services.access.policy import may_use
from services.access.principal import Principal
from services.access.quotas import Quotas
from services.access.request_ids import RequestIds, check_id
from services.access.sealed import Sealer
from services.access.settings import AccessSettings, CatalogueModel
from services.access.validation import AnyRequest, check_max_tokens, include_usage, parse_body

logger = logging.getLogger(__name__)


def model_not_found(model: str) -> NotFound:
    return NotFound(
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def check_request(
    endpoint: Endpoint,
    body: bytes,
    principal: Principal,
    catalogue: dict[str, CatalogueModel],
    max_tokens_cap: int | None,
) -> tuple[AnyRequest, CatalogueModel]:
    """Return the parsed body and its catalogue entry, or raise the ApiError to answer."""
    parsed = parse_body(endpoint, body)
    check_max_tokens(parsed, max_tokens_cap)
    entry = catalogue.get(parsed.model)
    if entry is None or not may_use(principal, entry):
        raise model_not_found(parsed.model)  # a model the caller may not use does not exist
    return parsed, entry


def job_for(
    principal: Principal,
    endpoint: Endpoint,
    parsed: AnyRequest,
    body: bytes,
    entry: CatalogueModel,
    *,
    request_id: str,
    priority: Priority,
    created_at: float,
    expires_at: float,
    reply_to: str = "",
) -> RunInference:
    """Return the RunInference an admitted request travels as (no credential in it)."""
    return RunInference(
        request_id=request_id,
        user_id=principal.user_id,
        username=principal.username,
        groups=principal.groups,
        model=parsed.model,
        endpoint=endpoint,
        priority=priority,
        stream=bool(getattr(parsed, "stream", False)),
        include_usage=include_usage(parsed),
        body=body,
        created_at=created_at,
        expires_at=expires_at,
        allowed_sites=tuple(entry.sites),
        reply_to=reply_to,
    )


@dataclass(frozen=True)
class Access:
    """Who may ask for what, as one process applies it (built once by `build_access`)."""

    settings: AccessSettings
    authenticator: Authenticator
    quotas: Quotas
    catalogue: dict[str, CatalogueModel]
    request_ids: RequestIds

    def check(
        self, endpoint: Endpoint, body: bytes, principal: Principal
    ) -> tuple[AnyRequest, CatalogueModel]:
        """Return the parsed body and its catalogue entry, or raise the ApiError to answer."""
        return check_request(
            endpoint, body, principal, self.catalogue, self.settings.max_tokens_cap
        )

    async def admit_ingress(
        self, ingress: IngressRequest, credential: str | None, *, first_record_timeout_s: float
    ) -> RunInference:
        """Admit a direct producer's request as the gateway would admit it over HTTP.

        Return the RunInference to route, or raise the ApiError the gateway would answer.
        """
        principal = await self.authenticator.authenticate(
            None if credential is None else f"Bearer {credential}"
        )
        now = time.time()
        check_id(ingress.request_id, now, self.settings.request_id_skew_s)
        parsed, entry = self.check(ingress.endpoint, ingress.body, principal)
        await self.request_ids.reserve_for(
            ingress.request_id, principal.user_id, ingress.endpoint, ingress.body
        )
        await self.quotas.admit(principal)  # last: a refused request counts against nothing
        return job_for(
            principal,
            ingress.endpoint,
            parsed,
            ingress.body,
            entry,
            request_id=ingress.request_id,
            priority=ingress.priority,
            created_at=ingress.created_at or now,
            expires_at=now + first_record_timeout_s,
            reply_to=ingress.reply_to,
        )


def cache_secret(settings: AccessSettings) -> bytes:
    """Return the secret that seals cached principals (a random one per process if unset)."""
    configured = settings.cache_secret.get_secret_value()
    if configured:
        return configured.encode()
    logger.warning(
        "FIRST_ACCESS_CACHE_SECRET is not set: cached principals serve this process only"
    )
    return secrets.token_bytes(32)


def build_access(settings: AccessSettings, redis: Redis, engine: AsyncEngine) -> Access:
    """Return the process's Access: API keys (SQL behind a Redis cache), Globus, limits."""
    secret = cache_secret(settings)
    return Access(
        settings=settings,
        authenticator=Authenticator(
            ApiKeyAuthenticator(
                engine, redis, settings.apikey_cache_ttl_s, Sealer(secret, "apikey")
            ),
            globus_from_settings(settings, redis, secret),
        ),
        quotas=Quotas(redis, settings),
        catalogue={m.name: m for m in settings.models},
        request_ids=RequestIds(redis, settings.request_id_skew_s),
    )
