"""A lock on one Redis key, for "one active instance at a time" (e.g. `first sites supervise`)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

_EXTEND: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_DELETE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisLock:
    """A lock on one key: SET NX PX takes it, compare-and-extend keeps it, compare-and-delete
    gives it up. It counts as held only until the last confirmed expiry, measured from before the
    request, so a holder that cannot reach Redis stops acting before anyone else may start."""

    def __init__(
        self, redis: Redis, key: str, ttl_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._redis = redis
        self._key = key
        self._ttl_ms = int(ttl_s * 1000)
        self._clock = clock
        self._token = secrets.token_hex(16)
        self._held = False
        self._valid_until = 0.0
        self._extend = redis.register_script(_EXTEND)
        self._delete = redis.register_script(_DELETE)

    def valid(self) -> bool:
        """Tell whether the lock is certainly still ours."""
        return self._held and self._clock() < self._valid_until

    async def hold(self) -> bool:
        """Take the lock, or extend it if ours; tell whether it is ours now."""
        asked_at = self._clock()
        try:
            if self._held:
                ok = bool(await self._extend(keys=[self._key], args=[self._token, self._ttl_ms]))
            else:
                ok = bool(await self._redis.set(self._key, self._token, nx=True, px=self._ttl_ms))
        except RedisError as exc:
            logger.warning("supervisor lock: Redis failed (%s); held: %s", exc, self.valid())
            return self.valid()
        self._held = ok
        self._valid_until = asked_at + self._ttl_ms / 1000 if ok else 0.0
        return ok

    async def release(self) -> None:
        """Give the lock up if ours (if Redis fails, it expires by itself)."""
        if not self._held:
            return
        self._held = False
        try:
            await self._delete(keys=[self._key], args=[self._token])
        except RedisError as exc:
            logger.warning("supervisor lock: cannot release (%s); it expires by itself", exc)
