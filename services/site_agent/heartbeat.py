"""The site's heartbeat: probe the instances, then tell the routers what is served and how busy."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

import aiohttp
from faststream.rabbit import RabbitBroker

from schemas.messages import SiteHeartbeat
from services.common import topology
from services.common.broker import PUBLISH_ERRORS, publish
from services.site_agent.backends import Backends, SessionOwner, backend_session
from services.site_agent.settings import Settings

logger = logging.getLogger(__name__)

NUDGE_DEBOUNCE_S: Final = 0.02
"""After a request finishes, the extra heartbeat waits this long: requests finishing together
(a batch of equal answers) make one heartbeat, not one each."""


class Heartbeat(SessionOwner):
    """Publishes a SiteHeartbeat every `settings.heartbeat_interval_s`.

    Probing needs `async with heartbeat:`, which opens its HTTP session to the instances
    (aiohttp binds it to the running loop); `build` does not.
    """

    def __init__(self, settings: Settings, broker: RabbitBroker, backends: Backends) -> None:
        self._settings = settings
        self._broker = broker
        self._backends = backends
        self._failing = False
        self._nudged = asyncio.Event()

    def nudge(self) -> None:
        """Ask for a heartbeat soon (debounced): a request finished, so a slot is free. Routers
        dispatch held batch work on heartbeats; waiting for the next periodic one would leave
        the slot idle for up to an interval."""
        self._nudged.set()

    def _open_session(self) -> aiohttp.ClientSession:
        # Its own session, not the forwarder's: a probe must not wait behind requests for a
        # connection. Unlimited: one probe per instance is in flight at a time.
        timeout = aiohttp.ClientTimeout(total=self._settings.probe_timeout_s)
        return backend_session(0, timeout)

    async def probe(self) -> None:
        """Refresh the instances' health and load."""
        if self._http is None:
            raise RuntimeError("Heartbeat probed outside `async with`")
        await self._backends.probe(self._http, self._settings.probe_timeout_s)

    def build(self, now: float) -> SiteHeartbeat:
        """Return the heartbeat for the instances' last probed state."""
        return SiteHeartbeat(
            site_id=self._settings.site_id,
            agent_id=self._settings.agent_id,
            sent_at=now,
            interval_s=self._settings.heartbeat_interval_s,
            models=self._backends.statuses(self._settings.max_concurrency_per_instance),
        )

    async def beat(self) -> SiteHeartbeat:
        """Probe the instances and publish one heartbeat; return it.

        Raises what `publish` raises (e.g. no router is bound to the heartbeats exchange).
        """
        await self.probe()
        heartbeat = self.build(time.time())
        await publish(
            self._broker,
            heartbeat,
            exchange=topology.HEARTBEATS,
            routing_key="",
            timeout=self._settings.publish_timeout_s,
        )
        return heartbeat

    async def run(self) -> None:
        """Beat every interval, and soon after a nudge, until cancelled; a failed beat is
        logged once per streak."""
        interval = self._settings.heartbeat_interval_s
        while True:
            started = time.monotonic()
            self._nudged.clear()
            try:
                await self.beat()
            except PUBLISH_ERRORS as exc:
                if not self._failing:
                    logger.warning("heartbeat not delivered (no router bound?): %r", exc)
                self._failing = True
            else:
                if self._failing:
                    logger.info("heartbeats delivered again")
                self._failing = False
            left = max(0.0, interval - (time.monotonic() - started))
            # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancel that comes as the
            # nudge is set, and the agent's shutdown then waited for this loop forever.
            try:
                async with asyncio.timeout(left):
                    await self._nudged.wait()
            except TimeoutError:  # the interval ran out: the periodic beat
                continue
            await asyncio.sleep(NUDGE_DEBOUNCE_S)
