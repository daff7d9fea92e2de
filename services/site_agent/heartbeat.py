"""The site's heartbeat: probe the instances, then tell the routers what is served and how busy."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
from faststream.rabbit import RabbitBroker

from schemas.messages import SiteHeartbeat
from services.common import topology
from services.common.broker import PUBLISH_ERRORS, publish
from services.site_agent.backends import Backends
from services.site_agent.settings import Settings

logger = logging.getLogger(__name__)


class Heartbeat:
    """Publishes a SiteHeartbeat every `settings.heartbeat_interval_s`."""

    def __init__(
        self,
        settings: Settings,
        broker: RabbitBroker,
        backends: Backends,
        client: httpx.AsyncClient,
    ) -> None:
        self._settings = settings
        self._broker = broker
        self._backends = backends
        self._client = client
        self._failing = False

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
        await self._backends.probe(self._client, self._settings.probe_timeout_s)
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
        """Beat every interval until cancelled; a failed beat is logged once per streak."""
        interval = self._settings.heartbeat_interval_s
        while True:
            started = time.monotonic()
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
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
