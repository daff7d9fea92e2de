"""Build the gateway's FastAPI app from Settings (nothing connects at import)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from schemas.records import ErrorInfo
from services.access import apikeys
from services.access.admission import build_access
from services.access.errors import ApiError
from services.access.settings import AccessSettings
from services.accounting import ledger
from services.common import topology
from services.common.broker import make_broker
from services.common.db import make_engine
from services.common.http import add_ops_routes
from services.common.redis import make_redis
from services.gateway import batch_db
from services.gateway.batch_routes import router as batch_router
from services.gateway.errors import error_response
from services.gateway.filestore import DirectoryStore
from services.gateway.inference import Gateway
from services.gateway.middleware import ObserveRequests
from services.gateway.registry import RegistryView
from services.gateway.routes import OPENAPI_COMPONENTS, router
from services.gateway.settings import Settings
from services.gateway.streams import StreamReader
from services.gateway.usage_routes import router as usage_router

logger = logging.getLogger(__name__)


def create_app(settings: Settings, access: AccessSettings) -> FastAPI:
    """Return the gateway app; its lifespan connects to RabbitMQ, Redis and SQL.

    `access` is who may ask for what (services/access), the same settings the router admits
    direct producers with.
    """
    broker = make_broker(settings.rabbit_url)
    redis = make_redis(settings.redis_url)
    engine = make_engine(settings.database_url)
    # API keys may live elsewhere than files and batches; one engine when they do not.
    keys_engine = (
        engine if access.database_url == settings.database_url else make_engine(access.database_url)
    )
    gate = build_access(access, redis, keys_engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await apikeys.create_schema(keys_engine)
        await ledger.create_schema(engine)  # the report reads it, even before any usage
        await batch_db.create_schema(engine)
        await broker.connect()
        await topology.prepare(
            broker, declare=settings.declare_topology, timeout_s=settings.publish_timeout_s
        )
        reader = StreamReader(
            settings.redis_url, redis, settings.read_block_ms, settings.redis_give_up_s
        )
        await reader.start()
        app.state.gateway = Gateway(
            settings=settings,
            broker=broker,
            redis=redis,
            engine=engine,
            reader=reader,
            registry=RegistryView(redis, settings.registry_cache_s),
            access=gate,
        )
        app.state.authenticator = gate.authenticator
        try:
            yield
        finally:
            await reader.stop()
            await broker.stop()
            await redis.aclose()
            await engine.dispose()
            if keys_engine is not engine:
                await keys_engine.dispose()

    app = FastAPI(title="FIRST gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    _document_bodies(app)
    app.add_middleware(ObserveRequests)
    app.include_router(router)
    app.include_router(usage_router)
    app.include_router(batch_router)
    app.state.file_store = DirectoryStore(settings.batch_dir)
    _add_error_handlers(app)

    async def check_db() -> None:
        async with engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")

    async def check_broker() -> None:
        if not await broker.ping(timeout=2.0):
            raise ConnectionError("RabbitMQ unreachable")

    add_ops_routes(app, {"rabbitmq": check_broker, "redis": redis.ping, "database": check_db})
    return app


def _document_bodies(app: FastAPI) -> None:
    """Add the request bodies' schemas (see routes.py) to the app's OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # built once, then cached by FastAPI: extended once
        schema.setdefault("components", {}).setdefault("schemas", {}).update(OPENAPI_COMPONENTS)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.info(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        info = ErrorInfo(
            status=400,
            message=str(first.get("msg", "Invalid request")),
            type="invalid_request_error",
            param=param,
        )
        return error_response(info)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        info = ErrorInfo(
            status=exc.status_code, message=str(exc.detail), type="invalid_request_error", code=code
        )
        return error_response(info, dict(exc.headers or {}))

    @app.exception_handler(RedisError)
    async def redis_error(request: Request, exc: RedisError) -> JSONResponse:
        logger.error("Redis unavailable: %s", exc)
        info = ErrorInfo(
            status=503,
            message="The stream store is unavailable; retry later.",
            type="service_unavailable",
            code="redis_unavailable",
        )
        return error_response(info, {"retry-after": "1"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        info = ErrorInfo(
            status=500,
            message="Internal error; it has been logged.",
            type="server_error",
            code="internal_error",
        )
        return error_response(info)
