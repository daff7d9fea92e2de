"""Cancellation of running requests: the gateway sets `first:cancel:<id>` and publishes the id.

The watcher listens on the pub/sub channel for immediacy and, because pub/sub drops messages
while its connection is down, also checks the cancel keys of watched requests every
`poll_s`; so a cancel is seen within about `poll_s` even across a Redis reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import names

logger = logging.getLogger(__name__)


class CancelWatcher:
    """Hands out an asyncio.Event per running request, set when the request is cancelled."""

    def __init__(self, redis: Redis, poll_s: float) -> None:
        self._redis = redis
        self._poll_s = poll_s
        self._watched: dict[str, asyncio.Event] = {}

    @contextlib.contextmanager
    def watch(self, request_id: str) -> Iterator[asyncio.Event]:
        """Return an event set when `request_id` is cancelled, for the block's duration."""
        event = asyncio.Event()
        self._watched[request_id] = event
        try:
            yield event
        finally:
            if self._watched.get(request_id) is event:
                del self._watched[request_id]

    def _cancel(self, request_id: str) -> None:
        event = self._watched.get(request_id)
        if event is not None and not event.is_set():
            logger.info("cancel received", extra={"request_id": request_id})
            event.set()

    async def poll(self) -> None:
        """Check every watched request's cancel key."""
        ids = list(self._watched)
        if not ids:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.exists(names.cancel_key(request_id))
            found = await pipe.execute()
        for request_id, exists in zip(ids, found, strict=True):
            if exists:
                self._cancel(request_id)

    async def run(self) -> None:
        """Listen and poll until cancelled; a Redis failure is retried after `poll_s`."""
        while True:
            try:
                await self._listen()
            except (RedisError, OSError) as exc:
                logger.warning("cancel listener lost Redis, retrying: %s", exc)
                await asyncio.sleep(self._poll_s)

    async def _listen(self) -> None:
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(names.CANCEL_CHANNEL)
            await self.poll()  # catch up on what was published while unsubscribed
            next_poll = time.monotonic() + self._poll_s
            while True:
                wait = max(0.0, next_poll - time.monotonic())
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                if message is not None and message.get("type") == "message":
                    data = message["data"]
                    self._cancel(data.decode() if isinstance(data, bytes) else str(data))
                if time.monotonic() >= next_poll:
                    await self.poll()
                    next_poll = time.monotonic() + self._poll_s
