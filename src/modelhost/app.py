"""The application factory: nothing is created at import time."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from modelhost.api.health import health_routes
from modelhost.api.openai import OpenAIRoutes
from modelhost.auth import APIKeyMiddleware
from modelhost.catalog import Catalog
from modelhost.errors import ModelhostError, error_body
from modelhost.registry.registry import Registry
from modelhost.registry.runtime import RuntimeContext
from modelhost.relay import Relay
from modelhost.settings import Settings

log = logging.getLogger(__name__)


async def _modelhost_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ModelhostError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Unknown route: {request.method} {request.url.path}"
    else:
        message = str(exc.detail)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(error_body(message, kind), status_code=exc.status_code,
                        headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("The gateway failed to process the request.",
                                   "server_error"), status_code=500)


def build_app(settings: Settings, catalog: Catalog | None = None) -> Starlette:
    if catalog is None:
        catalog = Catalog.from_file(settings.config_file)
    ctx = RuntimeContext(cache_dir=settings.model_cache_dir, log_dir=settings.logs_path,
                         stop_timeout=settings.stop_timeout,
                         hf_token=lambda: settings.huggingface_token)
    registry = Registry(catalog, ctx, lazy=settings.lazy_load_models)
    relay = Relay(settings.load_wait_timeout)
    openai = OpenAIRoutes(registry, relay, settings.max_request_bytes)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await relay.open()
        await registry.start()
        try:
            yield
        finally:
            await registry.close()
            await relay.close()

    app = Starlette(
        routes=[*health_routes(registry), *openai.routes()],
        middleware=[Middleware(APIKeyMiddleware, keys=settings.api_keys)],
        exception_handlers={ModelhostError: _modelhost_error, HTTPException: _http_error,
                            Exception: _unexpected},
        lifespan=lifespan,
    )
    return app
