"""Whether an instance serves: its /health answers 200 and its /v1/models lists the model."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from services.site_agent.backends import backend_session
from services.site_agent.instance_keys import bearer

logger = logging.getLogger(__name__)


async def probe_instance(
    url: str,
    model: str,
    timeout_s: float,
    *,
    key: str = "",
    http: aiohttp.ClientSession | None = None,
) -> bool:
    """Tell whether the instance at `url` is up and serves `model`; both GETs within `timeout_s`.

    `key` is the instance's key (sent as `Authorization: Bearer`). `http` is a session to
    reuse (one of backends.backend_session); without it, one is made for this probe.
    """
    if http is None:
        async with backend_session(2, aiohttp.ClientTimeout(total=timeout_s)) as own:
            return await probe_instance(url, model, timeout_s, key=key, http=own)
    base = url.rstrip("/")
    headers = bearer(key)
    try:
        async with asyncio.timeout(timeout_s):
            async with http.get(f"{base}/health", headers=headers) as health:
                await health.read()  # to its end, so that the connection is reused
                if health.status != 200:
                    logger.debug("%s/health answered %d", base, health.status)
                    return False
            async with http.get(f"{base}/v1/models", headers=headers) as models:
                if models.status != 200:
                    logger.debug("%s/v1/models answered %d", base, models.status)
                    return False
                body = await models.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        # Refused, reset, silent or garbled: not serving (yet). The caller retries.
        logger.debug("probe of %s failed: %s: %s", base, type(exc).__name__, exc)
        return False
    served = body.get("data") if isinstance(body, dict) else None
    if not isinstance(served, list):
        return False
    return any(isinstance(entry, dict) and entry.get("id") == model for entry in served)
