"""The application factory: nothing is created at import time.

Who may call what is decided ahead of FastAPI, by `front.Front.gate` (docs/security.md). What
is left here: CORS (Starlette's middleware, only when origins are configured) and a size limit
on the admin API's bodies (`AdminBodyLimit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelhost import __version__
from modelhost.api.admin import admin_router
from modelhost.api.audio import AudioRoutes
from modelhost.api.audit import AuditLog
from modelhost.api.health import health_routes
from modelhost.api.lifecycle import http_error
from modelhost.api.metrics import metrics_routes
from modelhost.api.openai import OpenAIRoutes
from modelhost.auth import ADMIN_PREFIXES, KeyGuard
from modelhost.catalog import Catalog
from modelhost.cluster.changes import Follower
from modelhost.cluster.launcher import ClusterContext
from modelhost.cluster.lifecycle import SharedLifecycle
from modelhost.cluster.member import Member
from modelhost.dashboard import Dashboard
from modelhost.downloads import Downloader
from modelhost.errors import ModelhostError, RequestTooLarge, error_body, validation_message
from modelhost.events import EventBus
from modelhost.gateway import Gateway
from modelhost.hub import HubService
from modelhost.hubtoken import resolve_token
from modelhost.metrics import Metrics
from modelhost.metrics.requests import RequestMetrics
from modelhost.persistence import Persistence
from modelhost.registry.errors import LifecycleError
from modelhost.registry.lifecycle import State
from modelhost.registry.model import Model, ModelContext
from modelhost.registry.registry import Registry
from modelhost.serving.answers import ClientGone, error_answer, last_resort, read_body
from modelhost.serving.call import Relay
from modelhost.serving.front import Front
from modelhost.settings import Settings
from modelhost.upstream import UpstreamClient
from modelhost.usage import Ledger

log = logging.getLogger(__name__)


async def _modelhost_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ModelhostError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _lifecycle_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LifecycleError)
    return await _modelhost_error(request, http_error(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Unknown route: {request.method} {request.url.path}"
    else:
        message = str(exc.detail)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(error_body(message, kind), status_code=exc.status_code,
                        headers=exc.headers)


async def _invalid_body(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        return JSONResponse(error_body("We could not parse the JSON body of your request.",
                                       "invalid_request_error"), status_code=400)
    message, param = validation_message(errors, drop={"body"})
    return JSONResponse(error_body(message or "invalid request", "invalid_request_error", param),
                        status_code=400)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    answer = last_resort()
    return Response(answer.body, answer.status, media_type="application/json")


class AdminBodyLimit:
    """Refuses an admin API body past `limit` bytes with 413 (whatever Content-Length says,
    counted while it is read), before any route parses it. The body, at most `limit` bytes,
    is read here and handed on whole."""

    def __init__(self, app: ASGIApp, limit: int, prefixes: tuple[str, ...] = ADMIN_PREFIXES
                 ) -> None:
        self.app = app
        self.limit = limit
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS")
                or not scope["path"].startswith(self.prefixes)):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, self.limit)
        except RequestTooLarge as exc:
            # The rest of the body is not read: the connection cannot be used again.
            await error_answer(exc, {"Connection": "close"})(scope, receive, send)
            return
        except ClientGone:
            return
        given = False

        async def replay() -> Message:
            nonlocal given
            if given:
                return await receive()
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


TAGS = [
    {"name": "models", "description": "Models: state, placement, load, unload, specs."},
    {"name": "downloads", "description": "Hugging Face downloads and the model cache."},
    {"name": "gpus", "description": "GPU inventory and live figures (NVML)."},
    {"name": "events", "description": "Server-sent events of state changes and progress."},
    {"name": "audit", "description": "The audit log of admin actions."},
]


@contextlib.contextmanager
def _on_hangup(gateway: Gateway) -> Iterator[None]:
    """SIGHUP reloads the models file (`Gateway.reload`), as `modelhost reload` does, while
    the app runs. Only where the app runs on the main thread's loop (`modelhost serve`);
    elsewhere (a test server in a thread) signals are not this app's to take."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        log.info("SIGHUP: reloading the models file")
        try:
            await gateway.reload()
        except ModelhostError as exc:  # an invalid file: logged by the reload
            log.error("SIGHUP: reload refused: %s", exc.message)
        except Exception:
            log.exception("SIGHUP: reload failed")

    def hangup() -> None:
        task = loop.create_task(reload(), name="sighup-reload")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, hangup)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        yield  # not the main thread, or no SIGHUP on this platform
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in tasks:
            task.cancel()


def _ray_cluster(settings: Settings) -> Any:
    """The gateway's Ray cluster (`workers.ray_launcher.RayCluster`), from the settings."""
    from modelhost.workers.ray_launcher import RayCluster, RayOptions
    assert settings.ray_address is not None
    return RayCluster(RayOptions(
        address=settings.ray_address, namespace=settings.ray_namespace,
        node_ip=settings.ray_node_ip, num_cpus=settings.ray_worker_cpus,
        resources=settings.ray_resources, placement_timeout=settings.ray_placement_timeout,
        heartbeat=settings.ray_heartbeat, lost_after=settings.ray_lost_after))


def build_app(settings: Settings, catalog: Catalog | None = None) -> Front:
    if catalog is None:
        catalog = Catalog.from_file(settings.config_file)
    events = EventBus()
    persistence = Persistence(settings.database)

    def hf_token() -> str | None:
        return resolve_token(settings.huggingface_token, settings.model_cache_dir)

    hub = HubService(Downloader(settings.model_cache_dir, hf_token), persistence, events)
    # The gateway's one HTTP client: the relay's, and remote servers' readiness probes.
    client = UpstreamClient(idle_timeout=settings.idle_timeout,
                            request_timeout=settings.request_timeout)
    ctx = ModelContext(cache_dir=settings.model_cache_dir, log_dir=settings.logs_path,
                       stop_timeout=settings.stop_timeout, hf_token=hf_token,
                       download=hub.download, max_audio_seconds=settings.max_audio_seconds,
                       worker_log_bytes=settings.worker_log_bytes,
                       worker_log_backups=settings.worker_log_backups, client=client,
                       worker_host=settings.worker_host,
                       worker_advertised_host=settings.worker_advertise_host)
    # Workers on a Ray cluster (docs/scale-out.md); Ray is imported only when one is set.
    ray = _ray_cluster(settings) if settings.ray_address else None
    if ray is not None:
        ctx = dataclasses.replace(ctx, ray=ray)
    # Several gateways sharing PostgreSQL (docs/scale-out.md): one owns each model's worker,
    # the others relay to it; downloads run once. Nothing of it on SQLite.
    member = Member(settings.database, persistence) if Member.wanted(settings.database) \
        else None
    if member is not None:
        ctx = ClusterContext(**vars(ctx), member=member)
        ctx = dataclasses.replace(ctx, download=member.download(hub.download,
                                                                  settings.model_cache_dir))
    registry = Registry(catalog, ctx, lazy=settings.lazy_load_models)
    if member is not None:  # unloads and idleness are the cluster's (cluster/lifecycle.py)
        registry.shared = SharedLifecycle(member, registry)

    def publish_state(rt: Model, previous: State) -> None:
        events.publish("state", model=rt.spec.id, state=rt.state.value,
                       previous=previous.value, error=rt.last_error, gpus=rt.gpus)

    registry.add_listener(publish_state)
    # GET /metrics: this app's own CollectorRegistry (metrics.registry), never the global one.
    metrics = Metrics(registry, client)
    # The relayed calls' own tallies (status, duration, the gateway's part, first token).
    calls = RequestMetrics(lambda: {m.spec.id: m.spec.task.value
                                    for m in registry.models.values()})
    metrics.registry.register(calls)
    gateway = Gateway(registry, events, persistence, hub, settings)
    follower = Follower(gateway) if member is not None else None
    guard = KeyGuard(settings.api_keys, settings.admin_api_keys)
    # Usage by key id and model, flushed to the state database once a second.
    ledger = Ledger(guard.actor, persistence)
    relay = Relay(settings.load_wait_timeout, max_answer_bytes=settings.max_answer_bytes,
                  request_timeout=settings.request_timeout, idle_timeout=settings.idle_timeout,
                  client=client, metrics=calls, usage=ledger)
    openai = OpenAIRoutes(registry, relay, settings.max_request_bytes)
    audio = AudioRoutes(registry, relay, settings.max_upload_bytes,
                        max_parts=settings.max_multipart_parts,
                        max_part_header_bytes=settings.max_part_header_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if ray is not None:  # a wrong address fails the start, saying why
            await ray.connect()
        await gateway.start()
        if member is not None and follower is not None:
            member.on_change = follower.heard
            await member.start()
        ledger.start()
        # What exists now lives as long as the process: keep the collector from walking it
        # again and again (a full collection of it is a pause that requests would feel).
        gc.collect()
        gc.freeze()
        try:
            with _on_hangup(gateway):
                yield
        finally:
            await ledger.stop()  # what was counted goes to the database before it closes
            if member is not None and follower is not None:
                member.on_change = None
                await follower.close()
            await gateway.close()
            if member is not None:
                await member.stop()  # its locks go once the workers they guard are stopped
            if ray is not None:
                await ray.close()  # any worker still on the cluster
            await relay.close()

    # CORS only for the origins configured (none: off). Keys go in the Authorization header,
    # never in cookies: no credentials. Any request header (the OpenAI SDKs send their own).
    cors = [Middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                       allow_methods=["GET", "POST", "PUT", "DELETE"],
                       allow_headers=["*"],
                       expose_headers=["Retry-After"], max_age=600)
            ] if settings.cors_origin_list else []
    app = FastAPI(
        title="modelhost", version=__version__, openapi_tags=TAGS,
        routes=[*health_routes(registry, lambda: front.draining), *openai.routes(),
                *audio.routes(), *metrics_routes(metrics),
                # The web console (/ and /ui/...): its calls reach the API through `front`.
                *Dashboard(gateway, guard, calls, settings, lambda: front,
                          prefix=settings.dashboard_prefix).routes()],
        middleware=[*cors, Middleware(AuditLog, gateway=gateway, guard=guard),
                    Middleware(AdminBodyLimit, limit=settings.max_admin_body_bytes)],
        exception_handlers={ModelhostError: _modelhost_error, HTTPException: _http_error,
                            LifecycleError: _lifecycle_error,
                            RequestValidationError: _invalid_body, Exception: _unexpected},
        lifespan=lifespan,
    )
    app.include_router(admin_router(gateway))
    front = Front(app, guard, openai.relay_endpoints, settings)
    return front
