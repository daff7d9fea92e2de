"""The router's view of sites: the latest heartbeat of each, mirrored to Redis for gateways.

Each router replica builds its own registry from its own heartbeat queue; the Redis hash
`names.REGISTRY_KEY` (site_id -> msgpack SiteHeartbeat) is a shared mirror that every replica
writes and sweeps, and that gateways read to list served models.

`sent` counts what this replica dispatched to a site since that site's last heartbeat arrived:
work the heartbeat cannot show yet. A heartbeat resets the count, on the approximation that a
heartbeat received after a dispatch reflects it (true once the agent has taken the message).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Final, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import names
from schemas.codec import DecodeError, encode, heartbeat_decoder
from schemas.messages import SiteHeartbeat
from services.router.heartbeats import stamp
from services.router.policy import is_live

logger = logging.getLogger(__name__)

# Delete a mirrored heartbeat only if nobody replaced it since we read it.
_DELETE_IF_UNCHANGED: Final = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


class Registry:
    """Latest heartbeat per site, dispatches not yet reflected, and the Redis mirror."""

    def __init__(
        self,
        redis: Redis,
        ttl_s: float,
        *,
        skew_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._skew_s = skew_s
        self._clock = clock
        self._beats: dict[str, SiteHeartbeat] = {}
        self._sent: dict[str, int] = {}
        self.last_interactive = 0.0
        """When this replica last dispatched an interactive request (epoch s; 0: never)."""
        self._updated = asyncio.Event()
        self._listeners: list[Callable[[], object]] = []
        self._delete_if_unchanged = redis.register_script(_DELETE_IF_UNCHANGED)

    @property
    def ttl_s(self) -> float:
        """How long a heartbeat keeps its site live."""
        return self._ttl_s

    def sites(self) -> list[SiteHeartbeat]:
        """Return the latest heartbeat of every known site (live or not)."""
        return list(self._beats.values())

    def get(self, site_id: str) -> SiteHeartbeat | None:
        """Return one site's latest heartbeat."""
        return self._beats.get(site_id)

    def sent(self) -> Mapping[str, int]:
        """Return, per site, the dispatches its last heartbeat does not reflect yet."""
        return dict(self._sent)

    def record_sent(self, site_id: str) -> None:
        """Count one dispatch to `site_id`."""
        self._sent[site_id] = self._sent.get(site_id, 0) + 1

    def remember(self, heartbeat: SiteHeartbeat) -> bool:
        """Keep `heartbeat` (stamped: see `observe`) if it is newer than the one held; tell
        whether it was kept."""
        held = self._beats.get(heartbeat.site_id)
        if held is not None and held.sent_at > heartbeat.sent_at:
            return False
        self._beats[heartbeat.site_id] = heartbeat
        self._sent.pop(heartbeat.site_id, None)
        updated, self._updated = self._updated, asyncio.Event()
        updated.set()
        for listener in self._listeners:
            listener()
        return True

    def add_listener(self, listener: Callable[[], object]) -> None:
        """Call `listener` (synchronously, so it must not block) on every kept heartbeat."""
        self._listeners.append(listener)

    async def observe(self, heartbeat: SiteHeartbeat) -> None:
        """Remember a heartbeat received now (its publisher checked) and mirror it to Redis.

        It is stamped first: received now by this router's clock, which alone says how long the
        site stays live, and its `sent_at` clamped to within the skew of now.
        """
        heartbeat = stamp(heartbeat, self._clock(), self._skew_s)
        if not self.remember(heartbeat):
            return
        try:
            await self._redis.hset(names.REGISTRY_KEY, heartbeat.site_id, encode(heartbeat))
        except RedisError as exc:
            logger.warning("registry: cannot mirror heartbeat of %s: %s", heartbeat.site_id, exc)

    async def wait_update(self, within_s: float) -> bool:
        """Wait (at most `within_s`) for the next kept heartbeat; tell whether one came."""
        try:
            await asyncio.wait_for(self._updated.wait(), max(0.0, within_s))
        except TimeoutError:
            return False
        return True

    async def _mirrored(self) -> dict[bytes, bytes]:
        # The client does not decode responses: fields and values are bytes.
        return cast(dict[bytes, bytes], await self._redis.hgetall(names.REGISTRY_KEY))

    async def load(self) -> int:
        """Seed the registry from the Redis mirror (live sites only); return how many."""
        mirrored = await self._mirrored()
        now = self._clock()
        loaded = 0
        for field, raw in mirrored.items():
            try:
                heartbeat = heartbeat_decoder.decode(raw)
            except DecodeError:
                logger.warning("registry: undecodable mirrored heartbeat for %r", field)
                continue
            if is_live(heartbeat, now, self._ttl_s) and self.remember(heartbeat):
                loaded += 1
        return loaded

    async def sweep(self) -> list[str]:
        """Forget expired sites here and in the Redis mirror; return the site ids forgotten."""
        now = self._clock()
        gone = [s for s, hb in self._beats.items() if not is_live(hb, now, self._ttl_s)]
        for site_id in gone:
            del self._beats[site_id]
            self._sent.pop(site_id, None)
        mirrored = await self._mirrored()
        for field, raw in mirrored.items():
            try:
                live = is_live(heartbeat_decoder.decode(raw), now, self._ttl_s)
            except DecodeError:
                live = False
            if not live:
                await self._delete_if_unchanged(keys=[names.REGISTRY_KEY], args=[field, raw])
        if gone:
            logger.info("registry: sites expired: %s", ", ".join(sorted(gone)))
        return gone

    async def run_sweeper(
        self, interval_s: float, on_gone: Callable[[list[str]], object] | None = None
    ) -> None:
        """Sweep every `interval_s` until cancelled, telling `on_gone` which sites expired;
        a Redis failure waits for the next round."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                gone = await self.sweep()
            except RedisError as exc:
                logger.warning("registry: sweep failed: %s", exc)
                continue
            if gone and on_gone is not None:
                on_gone(gone)
