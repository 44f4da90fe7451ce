"""The dashboard (docs/dashboard.md): server-rendered pages, sign-in, and the live streams.

Pages are Jinja2 templates with small vendored scripts (static/VENDORED.md); their data comes
from the admin API and /v1 through `bridge.Bridge` under the session cookie, and live updates
from one server-sent-events stream (`/ui/events`) built on the admin event bus. The gate
(`serving/front.py:Front.gate`) judges these routes as it judges every route (Host, a foreign
Origin on a state-changing request, draining); they need no API key of their own: a session
(sessions.py: in the state database, shared by every gateway using it), or none at all when
no key is configured (the loopback development server).

Nothing here runs unless a dashboard page asks: no hook on the request path, and the traffic
sampler (traffic.py) and the log tail run only while a page's stream is connected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import secrets
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Scope

from modelhost.auth import ADMIN, KeyGuard, key_id
from modelhost.config import UNION_TAGS, ModelSpec
from modelhost.dashboard.bridge import Bridge, csrf_failed, header, session_required
from modelhost.dashboard.logtail import tail
from modelhost.dashboard.sessions import COOKIE, Session, Sessions
from modelhost.dashboard.traffic import Traffic
from modelhost.errors import (
    InvalidRequest,
    ModelhostError,
    NotFound,
    dotted,
    validation_problems,
)
from modelhost.gateway import Gateway
from modelhost.metrics.requests import RequestMetrics
from modelhost.serving.answers import read_body
from modelhost.settings import Settings
from modelhost.workers.launchers import worker_log

log = logging.getLogger(__name__)

PREFIX = "/ui"
HERE = Path(__file__).parent
STATIC = HERE / "static"
LOGIN_COOKIE = "modelhost_login"  # the sign-in form's double-submit CSRF token
FORM_BYTES = 4096  # the sign-in and sign-out forms: a key, a token, a path
TICK_SECONDS = 2.0
PAGES = {"models": "Models", "gpus": "GPUs", "traffic": "Traffic", "settings": "Keys & settings",
         "playground": "Playground"}
# Pages may run only the scripts and styles they are served with.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; media-src 'self' blob:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def _error(exc: ModelhostError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def _safe_next(target: str | None, fallback: str) -> str:
    """Where to go after signing in: a path of this server only."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return fallback
    return target


class Dashboard:
    """The dashboard's routes: `/` and everything under `prefix`. `target()` is the
    gateway's outermost app (`Front`), which the bridge calls for the API's routes."""

    def __init__(self, gateway: Gateway, guard: KeyGuard, calls: RequestMetrics,
                 settings: Settings, target: Callable[[], ASGIApp], prefix: str = PREFIX
                 ) -> None:
        self.prefix = "/" + prefix.strip("/")
        self.gateway = gateway
        self.guard = guard
        self.settings = settings
        self.target = target
        self.sessions = Sessions(lambda: getattr(gateway, "persistence", None),
                                 settings.admin_api_keys)
        # No key configured: one session for everyone (the development server on loopback);
        # its CSRF token still guards the forms against other local pages.
        self.open_session = Session(None, "anonymous")
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined)
        self.traffic = Traffic(calls.collect, self._tokens)

    # ----------------------------------------------------------------------- sessions

    async def session_of(self, scope: Scope) -> Session | None:
        if self.guard.open:
            return self.open_session
        raw = header(scope, b"cookie")
        if not raw:
            return None
        for part in raw.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                return await self.sessions.get(value)
        return None

    def _cookie(self, request: Request, response: Response, name: str, value: str,
                max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")

    # ----------------------------------------------------------------------- routes

    def routes(self) -> list[BaseRoute]:
        p = self.prefix
        admin = Bridge(p + "/api", "/api/admin", self.session_of, self.target)
        v1 = Bridge(p + "/v1", "/v1", self.session_of, self.target)
        return [
            Route("/", self.page, methods=["GET"]),
            Route(p + "/login", self.login_page, methods=["GET"]),
            Route(p + "/login", self.login, methods=["POST"]),
            Route(p + "/logout", self.logout, methods=["POST"]),
            Route(p + "/static/{name:path}", self.static, methods=["GET"]),
            Route(p + "/events", self.events, methods=["GET"]),
            Route(p + "/logs/{model_id:path}", self.logs, methods=["GET"]),
            Route(p + "/check-spec/{model_id:path}", self.check_spec, methods=["POST"]),
            Route(p + "/api/{rest:path}", admin, methods=["GET", "POST", "PUT", "DELETE"]),
            Route(p + "/v1/{rest:path}", v1, methods=["GET", "POST"]),
            Route(p + "/{page}", self.page, methods=["GET"]),
        ]

    def render(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(prefix=self.prefix, pages=PAGES, **context)
        return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)

    async def page(self, request: Request) -> Response:
        name = request.path_params.get("page", "models")
        if name not in PAGES:
            return _error(NotFound(f"no dashboard page '{name}'"))
        session = await self.session_of(request.scope)
        if session is None:
            query = urlencode({"next": request.url.path})
            return RedirectResponse(f"{self.prefix}/login?{query}", status_code=303)
        return self.render(f"{name}.html", page=name, csrf=session.csrf, actor=session.actor,
                           open=self.guard.open)

    async def login_page(self, request: Request, error: str | None = None,
                         status: int = 200) -> Response:
        after = _safe_next(request.query_params.get("next"), self.prefix + "/models")
        if self.guard.open:
            return RedirectResponse(after, 303)
        token = request.cookies.get(LOGIN_COOKIE) or _token()
        response = self.render("login.html", status=status, page="login", csrf=token,
                               next=after,
                               error=error, admin=self.guard.admin_configured, actor=None,
                               open=False)
        self._cookie(request, response, LOGIN_COOKIE, token, 3600)
        return response

    async def login(self, request: Request) -> Response:
        if self.guard.open:
            return RedirectResponse(self.prefix + "/models", 303)
        fields = await _form(request)
        presented, expected = fields.get("csrf", ""), request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not _same(presented, expected):
            return await self.login_page(request, "The sign-in form expired: try again.", 400)
        key = fields.get("key", "").strip()
        role = self.guard.role(b"Bearer " + key.encode("latin-1", "replace")) if key else 0
        if role <= 0 or not role & ADMIN:
            return await self.login_page(request, "That is not an admin key of this gateway.",
                                         401)
        try:
            sid, _ = await self.sessions.open(key, key_id(key))
        except Exception as exc:
            log.error("cannot record a dashboard session: %s", exc)
            return await self.login_page(request, "The session could not be recorded (the "
                                         "state database): try again.", 503)
        target = _safe_next(fields.get("next"), self.prefix + "/models")
        response = RedirectResponse(target, status_code=303)
        self._cookie(request, response, COOKIE, sid, None)
        response.delete_cookie(LOGIN_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def logout(self, request: Request) -> Response:
        session = await self.session_of(request.scope)
        token = (await _form(request)).get("csrf")
        if session is None or not session.csrf_ok(token):
            return _error(csrf_failed() if session is not None else session_required())
        await self.sessions.close(request.cookies.get(COOKIE))
        response = RedirectResponse(self.prefix + "/login", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        path = (STATIC / name).resolve()
        if STATIC.resolve() not in path.parents or not path.is_file():
            return _error(NotFound(f"no static file '{name}'"))
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=kind, headers={
            "Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})

    async def check_spec(self, request: Request) -> Response:
        """A spec validated like the models file, every problem by field (the add/edit
        form shows each next to its input); the admin API's own checks after that."""
        session = await self.session_of(request.scope)
        if session is None:
            return _error(session_required())
        if not session.csrf_ok(request.headers.get("x-csrf-token")):
            return _error(csrf_failed())
        model_id = request.path_params["model_id"]
        body = await read_body(request.scope, request.receive,
                               self.settings.max_admin_body_bytes)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return _error(InvalidRequest("the spec must be a JSON object"))
        data.setdefault("id", model_id)
        try:
            ModelSpec.model_validate(data)
        except ValidationError as exc:
            problems = validation_problems(exc.errors(), drop=UNION_TAGS)
            return JSONResponse({"valid": False, "errors": [
                {"field": dotted(loc) or "spec", "message": self.gateway.scrub(msg)}
                for loc, msg in problems]})
        try:
            self.gateway.validate_spec(model_id, data)
        except ModelhostError as exc:
            return JSONResponse({"valid": False, "errors": [
                {"field": exc.param or "spec", "message": exc.message}]})
        return JSONResponse({"valid": True, "errors": []})

    # ----------------------------------------------------------------------- live

    async def events(self, request: Request) -> Response:
        if await self.session_of(request.scope) is None:
            return _error(session_required())
        return StreamingResponse(self._stream(request.scope), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def _stream(self, scope: Scope) -> AsyncIterator[bytes]:
        """The page's live updates; they end with the session (signed out, here or on
        another gateway, or expired), checked at every tick."""
        gateway = self.gateway
        async with gateway.events.subscribe() as queue, self.traffic.watch() as samples:
            yield _sse("snapshot", {"models": gateway.cards(), "gpus": gateway.gpus(),
                                    "traffic": list(self.traffic.history),
                                    "interval": self.traffic.interval})
            next_tick = time.monotonic() + TICK_SECONDS
            while True:
                wait = max(0.0, next_tick - time.monotonic())
                try:
                    event = await asyncio.wait_for(queue.get(), wait)
                    yield _sse(event["type"], event)
                except TimeoutError:
                    next_tick = time.monotonic() + TICK_SECONDS
                    if await self.session_of(scope) is None:
                        return
                    gpus = gateway.gpus()
                    for gpu in gpus["gpus"]:
                        gpu.pop("history", None)
                    yield _sse("tick", {"models": gateway.cards(), "gpus": gpus})
                while not samples.empty():
                    yield _sse("traffic", samples.get_nowait())

    async def logs(self, request: Request) -> Response:
        if await self.session_of(request.scope) is None:
            return _error(session_required())
        model = self.gateway.model(request.path_params["model_id"])
        path = worker_log(self.settings.logs_path, model.spec.id)

        async def lines() -> AsyncIterator[bytes]:
            async for text in tail(path):
                yield _sse("log", {"text": self.gateway.scrub(text)})

        return StreamingResponse(lines(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _tokens(self) -> dict[str, float]:
        """Completion tokens counted so far this hour, by model (the usage table)."""
        hour = time.time() // 3600 * 3600
        since = datetime.fromtimestamp(hour, UTC)
        rows = await self.gateway.persistence.now(
            lambda store: store.usage_sums(since=since, until=None, key=None, model=None,
                                           group_by=["model"]))
        return {str(r.model): float(r.counts[2]) for r in rows}


async def _form(request: Request) -> dict[str, str]:
    """A small URL-encoded form (413 past FORM_BYTES; anything else reads as empty)."""
    if not request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"):
        return {}
    body = await read_body(request.scope, request.receive, FORM_BYTES)
    return dict(parse_qsl(body.decode("utf-8", "replace"), max_num_fields=8))


def _token() -> str:
    return secrets.token_urlsafe(32)


def _same(a: str, b: str) -> bool:
    return secrets.compare_digest(a.encode(), b.encode())


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n".encode()

