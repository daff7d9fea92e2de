"""Count every HTTP response by route and status, and log one access line per API request."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.logging import fresh_context
from services.gateway import metrics

logger = logging.getLogger(__name__)

QUIET_PATHS = frozenset(("/health", "/ready", "/metrics"))
"""Probed and scraped all the time: counted, never logged."""
UNMATCHED = "unmatched"
"""The endpoint label of requests no route matched (keeps the label set bounded)."""


class ObserveRequests:
    """Pure ASGI middleware (a streamed response is observed after its last byte)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # what the outer error middleware answers if the app raises
        request_id: str | None = None

        async def observe_start(message: Message) -> None:
            nonlocal status, request_id
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"x-request-id":
                        request_id = value.decode("latin-1")
            await send(message)

        with fresh_context():
            try:
                await self.app(scope, receive, observe_start)
            finally:
                self._observe(scope, status, request_id, time.monotonic() - started)

    @staticmethod
    def _observe(scope: Scope, status: int, request_id: str | None, elapsed_s: float) -> None:
        endpoint = getattr(scope.get("route"), "path", UNMATCHED)
        metrics.REQUESTS.labels(endpoint, str(status)).inc()
        if scope["path"] not in QUIET_PATHS:
            extra = {"request_id": request_id} if request_id else None
            logger.info(
                "%s %s %d in %.3f s", scope["method"], scope["path"], status, elapsed_s, extra=extra
            )
