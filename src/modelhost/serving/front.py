"""The gateway's ASGI app: every request judged on its head first (`Front.gate`), then the
relayed /v1 routes, then everything else through FastAPI.

**The gate** (docs/security.md) refuses, from a request's method, path and headers alone: a
`Host` that is not an allowed name (421: DNS rebinding), a browser's state-changing request from
a foreign `Origin` (403: CSRF), a missing or wrong key for the route's role (401, 403), and any
request but `GET /health` while the server drains (503 with Retry-After). It runs once per
request, at the headers: the HTTP server calls it when a request's headers are complete, before
it reads or asks for the body, on the wire path and the ASGI path alike
(`protocol.GatewayProtocol`, which then sets `server_gates`); under another server (a test
client, say) `Front.__call__` calls it, and the relayed routes are then served through ASGI
only. It is on the path of every request: one pass over the headers, and nothing allocated
when the Host is one seen before and no key is configured.

**Relayed routes.** A chat, completion or embeddings request is matched by its exact path and
its `endpoint.RelayEndpoint` called without FastAPI. FastAPI's middleware stack, router and
request objects took about 10 % of the gateway's CPU per request before this path existed
(docs/benchmarks.md), and none of them does anything for these routes. The same endpoints are
offered to the HTTP server as `hot_routes` (`wire.HotRelay`), which calls them without going
through ASGI at all; `Front.__call__` serves them when the server does not (another server, a
test client, or uvicorn with its access log on). Every other request (admin API, audio,
models, health, a method or path the table does not hold) goes to the FastAPI app. With CORS
origins configured there are no hot routes for the server, and a request with an `Origin` goes
through FastAPI, whose CORS middleware answers preflights and adds the `Access-Control-*`
headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import unquote

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from modelhost.auth import MISSING, KeyGuard, route_role
from modelhost.errors import Forbidden, MisdirectedRequest, ModelhostError, ServiceUnavailable
from modelhost.serving.answers import Answer
from modelhost.serving.endpoint import RelayEndpoint
from modelhost.serving.wire import HotRelay
from modelhost.settings import Settings

# Methods that change nothing: a foreign Origin may send them (it cannot read the answer
# without CORS).
SAFE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS"))
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# Host header values already judged allowed, remembered up to this many.
HOST_CACHE = 256
# Retry-After of the 503s while the server drains (a restart takes a few seconds).
DRAIN_RETRY_AFTER = 5.0


class HostNames:
    """The names accepted in the Host header (any port): loopback names, `*.localhost`, the
    address the server binds (unless a wildcard address), and `settings.allowed_host_names`
    (`name`, `.domain` or `*.domain` for a domain and its subdomains, `*` for any)."""

    def __init__(self, bound: str = "127.0.0.1", allowed: Iterable[str] = ()) -> None:
        self.any = False
        self.names = set(LOOPBACK_NAMES)
        self.domains = ["localhost"]
        bound = bound.strip().lower()
        if bound not in ("", "0.0.0.0", "::", "[::]"):
            self.names.add(f"[{bound}]" if ":" in bound and not bound.startswith("[")
                           else bound)
        for name in allowed:
            name = name.strip().lower().rstrip(".")
            if name == "*":
                self.any = True
            elif name.startswith(("*.", ".")):
                self.domains.append(name.lstrip("*").lstrip("."))
            elif name:
                self.names.add(f"[{name}]" if ":" in name and not name.startswith("[")
                               else name)

    def allows(self, value: bytes) -> bool:
        if self.any:
            return True
        name = host_name(value)
        if name is None:
            return False
        if name in self.names:
            return True
        return any(name == d or name.endswith("." + d) for d in self.domains)


def host_name(value: bytes) -> str | None:
    """The name of a Host header value, lower-case, without port or final dot (None when it
    is malformed)."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        name, rest = text[:end + 1], text[end + 1:]
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            return None
        return name
    name, sep, port = text.rpartition(":")
    if not sep:
        name = text
    elif not port.isdigit() or ":" in name:
        return None
    name = name.rstrip(".") if name != "." else name
    return name or None


class Front:
    def __init__(self, app: FastAPI, guard: KeyGuard, routes: Mapping[str, RelayEndpoint],
                 settings: Settings | None = None) -> None:
        self.app = app
        self.guard = guard
        self.settings = settings
        # Set by the server on SIGTERM: new requests get 503, /ready too (graceful stop).
        self.draining = False
        # True when the HTTP server calls `gate` for every request itself (when its headers
        # are complete): `__call__` and the hot routes then do not call it again.
        self.server_gates = False
        self.hosts = HostNames(settings.api_host if settings else "127.0.0.1",
                               settings.allowed_host_names if settings else ())
        self._hosts_ok: set[bytes] = set()
        origins = settings.cors_origin_list if settings else []
        self.cors = bool(origins)
        self.any_origin = "*" in origins
        self.cors_origins = frozenset(o.lower().encode("latin-1") for o in origins)
        self.routes: dict[str, ASGIApp] = dict(routes)
        # With CORS on, /v1 requests go through `__call__`, where those of a browser are sent
        # to FastAPI's CORS middleware; the server's hot path would skip it.
        self.hot_routes = {} if self.cors else {
            path.encode("ascii"): HotRelay(endpoint)
            for path, endpoint in routes.items()}

    def gate(self, method: bytes, path: str, headers: Iterable[tuple[bytes, bytes]]
             ) -> Answer | None:
        """The refusal of a request judged on its head alone (wrong Host, foreign Origin,
        missing or wrong key for the route, draining), or None to go on. The server calls it
        when a request's headers are complete, before reading or asking for its body.
        `path` is the request's decoded path (ASGI's `scope["path"]`, no query string)."""
        host = origin = auth = site = None
        for name, value in headers:
            if name == b"authorization":
                if auth is None:
                    auth = value
            elif name == b"host":
                if host is None:
                    host = value
                elif value != host:
                    host = b"\x00"  # two different Hosts: none allowed
            elif name == b"origin":
                origin = value
            elif name == b"sec-fetch-site":
                site = value
        if host is not None and host not in self._hosts_ok:
            if not self.hosts.allows(host):
                return self._refuse(MisdirectedRequest(
                    f"Host '{host.decode('latin-1')[:100]}' is not served here: add it to "
                    "MODELHOST_ALLOWED_HOSTS if this server is meant to answer to that "
                    "name."), origin)
            if len(self._hosts_ok) < HOST_CACHE:
                self._hosts_ok.add(bytes(host))
        if ((origin is not None or site is not None) and method not in SAFE_METHODS
                and not self._same_or_allowed_origin(origin, host, site)):
            shown = origin.decode("latin-1")[:100] if origin is not None else "a cross-site page"
            return self._refuse(Forbidden(
                f"Requests from {shown} are refused: browsers may call this API only from "
                "its own origin or one listed in MODELHOST_CORS_ORIGINS.",
                code="origin_not_allowed"), origin)
        if self.draining and not (path == "/health" and method in SAFE_METHODS):
            return self._refuse(ServiceUnavailable(
                "The gateway is shutting down; retry shortly or on another instance.",
                retry_after=DRAIN_RETRY_AFTER), origin)
        guard = self.guard
        if guard.open:
            return None
        if "%" in path:  # a path that was not decoded: judge what the router will see
            path = unquote(path)
        needed = route_role(path)
        if needed == MISSING or (method == b"OPTIONS" and origin is not None):
            return None  # a route for anyone, or a CORS preflight (which carries no key)
        error = guard.judge(auth, needed)
        return None if error is None else self._refuse(error, origin)

    def _same_or_allowed_origin(self, origin: bytes | None, host: bytes | None,
                                site: bytes | None) -> bool:
        if origin is None:  # no Origin: trust the browser's Sec-Fetch-Site
            return site != b"cross-site"
        if self._cors_allows(origin):
            return True
        _, sep, rest = origin.partition(b"://")
        return bool(sep) and host is not None and rest.lower() == host.lower()

    def _cors_allows(self, origin: bytes) -> bool:
        return self.any_origin or origin.lower().rstrip(b"/") in self.cors_origins

    def _refuse(self, error: ModelhostError, origin: bytes | None) -> Answer:
        answer = self.guard.refusal(error)
        if origin is not None and self.cors and self._cors_allows(origin):
            # So that a listed origin's page can read why it was refused.
            answer.headers += [(b"access-control-allow-origin", bytes(origin)),
                               (b"vary", b"Origin")]
        return answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if not self.server_gates:
                refusal = self.gate(scope["method"].encode("latin-1"), scope["path"],
                                    scope["headers"])
                if refusal is not None:
                    await refusal(scope, receive, send)
                    return
            if scope["method"] == "POST":
                route = self.routes.get(scope["path"])
                if route is not None and not (self.cors and _has_origin(scope)):
                    await route(scope, receive, send)
                    return
        elif kind == "websocket":
            # No websocket route exists; refuse a foreign page's handshake all the same.
            refusal = self.gate(b"GET", scope["path"], scope["headers"])
            if refusal is not None:
                await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


def _has_origin(scope: Scope) -> bool:
    return any(name == b"origin" for name, _ in scope["headers"])
