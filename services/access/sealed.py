"""Cache entries that a writer of Redis cannot forge.

Redis is shared with components that must not decide who a caller is (a site agent on a
compute node writes streams there), so what the admitting components cache — API-key
principals, Globus verdicts — is sealed: `HMAC-SHA256(secret, policy ‖ key ‖ payload)` in front
of the payload. The secret is held only by the admitting components (gateway, router, batch
worker: `FIRST_ACCESS_CACHE_SECRET`). Binding the key stops an entry being copied under another
credential's hash (an admin's principal under the attacker's key); binding the policy stops a
component that judges differently (other Globus domains, audience, scope) from trusting
another's verdict. A forged, moved or stale entry is ignored — the caller is resolved again
from SQL or Globus — and logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Final

from prometheus_client import Counter

logger = logging.getLogger(__name__)

_MAC_BYTES: Final = 32

REFUSED_ENTRIES: Final = Counter(
    "first_access_cache_entries_refused",
    "Cached principals or verdicts ignored because their seal did not verify (forged, moved "
    "under another key, or written under another policy or secret), by cache",
    ["cache"],
)
for _cache in ("apikey", "globus"):
    REFUSED_ENTRIES.labels(_cache)


def policy_digest(*parts: object) -> bytes:
    """Return a digest of what a verdict depends on (settings that change the decision)."""
    text = "\0".join(repr(part) for part in parts)
    return hashlib.sha256(text.encode()).digest()


class Sealer:
    """Seal and open one cache's entries under one secret and one policy."""

    def __init__(self, secret: bytes, cache: str, policy: bytes = b"") -> None:
        if not secret:
            raise ValueError("a cache seal needs a non-empty secret")
        self._secret = secret
        self._cache = cache
        self._context = cache.encode() + b"\0" + policy + b"\0"

    def _mac(self, key: str, payload: bytes) -> bytes:
        message = self._context + key.encode() + b"\0" + payload
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def seal(self, key: str, payload: bytes) -> bytes:
        """Return what to store under `key`: the seal, then `payload`."""
        return self._mac(key, payload) + payload

    def open(self, key: str, stored: bytes) -> bytes | None:
        """Return the payload stored under `key` if its seal verifies, else None (logged)."""
        mac, payload = stored[:_MAC_BYTES], stored[_MAC_BYTES:]
        if len(mac) == _MAC_BYTES and hmac.compare_digest(mac, self._mac(key, payload)):
            return payload
        REFUSED_ENTRIES.labels(self._cache).inc()
        logger.warning("ignored a %s cache entry whose seal does not verify: %s", self._cache, key)
        return None
