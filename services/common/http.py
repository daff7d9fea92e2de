"""The operational HTTP surface every service has: /health, /ready, /metrics; and serving it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

logger = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[object]]
READY_CHECK_TIMEOUT_S = 2.0


async def _run_check(check: ReadyCheck) -> str:
    try:
        await asyncio.wait_for(check(), READY_CHECK_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported below
        return f"error: {type(exc).__name__}: {exc}"[:300]
    return "ok"


def add_ops_routes(app: FastAPI, checks: Mapping[str, ReadyCheck]) -> None:
    """Add /health (process alive), /ready (dependencies reachable) and /metrics."""

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", include_in_schema=False)
    async def ready() -> JSONResponse:
        names = list(checks)
        results = await asyncio.gather(*(_run_check(checks[n]) for n in names))
        status = dict(zip(names, results, strict=True))
        ok = all(r == "ok" for r in results)
        return JSONResponse({"ready": ok, "checks": status}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def serve(app: FastAPI, host: str, port: int, uds: str | None = None) -> None:
    """Run `app` with uvicorn in the foreground until SIGINT/SIGTERM (on `uds` if given)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        uds=uds,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
