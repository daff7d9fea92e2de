"""Moving work off a dead site: what waits in its queues goes to live sites.

When a site's heartbeats stop for the TTL, the registry forgets it and the router stops
choosing it. What was already in its queues — requests it had not started, and the ones it
was running, which RabbitMQ puts back when the agent's connection dies — would wait there
until the site came back. The mover takes them (basic.get, acked only after the new publish
is confirmed) and publishes each to a live site with `moved_from` set: the new site waits out
the dead site's claim (nobody renews it), then runs the request if nothing reached the client
yet, or ends it with an error event if something did (billing what was delivered), or — if it
expired meanwhile — with a cancelled Final. A request that no live site serves stays where it
is and is looked at again next round.

Several router replicas may move the same queue at once: each message goes to one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import ChannelNotFoundEntity

from schemas import names
from schemas.codec import DecodeError, run_inference_decoder
from schemas.messages import RunInference
from services.common.broker import PUBLISH_ERRORS
from services.router import metrics
from services.router.handlers import Deps, dispatch
from services.router.policy import choose_site

logger = logging.getLogger(__name__)

FORGET_AFTER_S = 3600.0
"""A site dead this long is no longer watched (its queues keep what is left)."""
BATCH = 256
"""Messages moved per queue per round, so one dead site cannot starve the rest."""


class Mover:
    """Watches the sites this router saw die and empties their queues into live sites."""

    def __init__(self, deps: Deps, get_timeout_s: float = 5.0) -> None:
        self._deps = deps
        self._dead: dict[str, float] = {}
        self._get_timeout_s = get_timeout_s
        self._connection: AbstractConnection | None = None
        self.stopping = False
        """Set when the router stops: no more rounds, no new connection (see `run_mover`)."""

    async def _open_channel(self) -> AbstractChannel:
        """A channel of the mover's own connection: RabbitMQ closes a channel that looks for a
        queue that does not exist, and the broker's shared one carries the router's consumers.

        A plain (not robust) connection, made again when it broke: it is used once per round,
        and a robust one's reconnect machinery could outlive the router's shutdown."""
        timeout = self._deps.settings.publish_timeout_s
        if self._connection is None or self._connection.is_closed:
            self._connection = await aio_pika.connect(
                self._deps.settings.rabbit_url, timeout=timeout
            )
        return await asyncio.wait_for(self._connection.channel(), timeout)

    async def close(self) -> None:
        """Stop for good and close the connection (bounded)."""
        self.stopping = True
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(TimeoutError, *PUBLISH_ERRORS):
                await asyncio.wait_for(connection.close(), self._deps.settings.publish_timeout_s)

    def sites_gone(self, site_ids: Iterable[str]) -> None:
        """Note sites whose heartbeats stopped (the registry's sweep found them expired)."""
        now = time.time()
        for site_id in site_ids:
            self._dead.setdefault(site_id, now)

    def watched(self) -> list[str]:
        return sorted(self._dead)

    async def round(self) -> int:
        """Move what waits in every dead site's queues; return how many requests moved."""
        if self.stopping:
            return 0
        now = time.time()
        moved = 0
        for site_id, since in list(self._dead.items()):
            if self._deps.registry.get(site_id) is not None or now - since > FORGET_AFTER_S:
                del self._dead[site_id]  # back alive, or given up on
                continue
            for priority in names.PRIORITIES:
                moved += await self._drain(site_id, names.site_queue(site_id, priority))
        return moved

    async def _drain(self, site_id: str, queue_name: str) -> int:
        channel = await self._open_channel()
        moved = 0
        try:
            try:
                queue = await channel.get_queue(queue_name, ensure=True)  # passive
            except ChannelNotFoundEntity:
                logger.info("dead site %s has no queue %s", site_id, queue_name)
                return 0
            while moved < BATCH:
                message = await queue.get(no_ack=False, fail=False, timeout=self._get_timeout_s)
                if message is None:
                    break
                if not await self._move(site_id, message):
                    break  # nowhere to go now: it went back to the queue; next round
                moved += 1
        finally:
            if not channel.is_closed:
                await channel.close()
        if moved:
            logger.info("moved %d request(s) off dead site %s (%s)", moved, site_id, queue_name)
        return moved

    async def _move(self, dead_site: str, message: AbstractIncomingMessage) -> bool:
        """Publish one request to a live site and ack it; False if it was put back."""
        try:
            request: RunInference = run_inference_decoder.decode(message.body)
        except DecodeError:
            await message.reject(requeue=False)  # dead-lettered, like any poison message
            return True
        deps = self._deps
        moved = msgspec.structs.replace(request, moved_from=dead_site)
        site_id = choose_site(
            moved,
            [hb for hb in deps.registry.sites() if hb.site_id != dead_site],
            time.time(),
            deps.registry.ttl_s,
            deps.registry.sent(),
            policy=deps.settings.policy,
            state=deps.policy,
        )
        if site_id is None:
            await message.nack(requeue=True)
            return False
        try:
            await dispatch(deps, moved, site_id)
        except PUBLISH_ERRORS as exc:
            logger.warning("could not move %s to %s: %r", request.request_id, site_id, exc)
            await message.nack(requeue=True)
            return False
        metrics.MOVED.inc()
        await message.ack()
        return True
