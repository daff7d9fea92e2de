"""The gateway's view of live sites: the router's mirror of heartbeats in Redis, cached briefly."""

from __future__ import annotations

import logging
import time
from typing import Any

from redis.asyncio import Redis

from schemas import names
from schemas.codec import DecodeError, heartbeat_decoder
from schemas.messages import SiteHeartbeat

logger = logging.getLogger(__name__)


def serving_sites(
    sites: list[SiteHeartbeat], model: str, now: float, ttl_s: float, allowed: list[str]
) -> list[SiteHeartbeat]:
    """Return the live sites that list `model` (any state) and may serve it.

    Live by the time the router received the site's heartbeat (the router's clock), as the
    router judges it; never by `sent_at`, the site's own clock.
    """
    return [
        site
        for site in sites
        if now - site.received_at < ttl_s
        and (not allowed or site.site_id in allowed)
        and any(m.model == model for m in site.models)
    ]


_STATE_ORDER = ("hot", "starting", "draining", "cold")


def site_states(sites: list[SiteHeartbeat], model: str) -> dict[str, str]:
    """Return each site's state of `model` (cold, starting, hot or draining)."""
    return {
        site.site_id: status.state
        for site in sites
        for status in site.models
        if status.model == model
    }


def overall_state(states: dict[str, str]) -> str:
    """Return the most useful state among sites: hot if any site has it hot, and so on."""
    return min(states.values(), key=_STATE_ORDER.index, default="cold")


class RegistryView:
    """Reads `first:registry` at most every `cache_s` seconds."""

    def __init__(self, redis: Redis, cache_s: float) -> None:
        self._redis = redis
        self._cache_s = cache_s
        self._read_at = -1.0
        self._sites: list[SiteHeartbeat] = []

    async def sites(self) -> list[SiteHeartbeat]:
        """Return the last heartbeat of every site the router mirrored."""
        now = time.monotonic()
        if now - self._read_at >= self._cache_s:
            raw: dict[Any, Any] = await self._redis.hgetall(names.REGISTRY_KEY)
            sites = []
            for field, value in raw.items():
                try:
                    sites.append(heartbeat_decoder.decode(value))
                except DecodeError:
                    logger.warning("registry: undecodable heartbeat for %r", field)
            self._sites = sites
            self._read_at = now
        return self._sites
