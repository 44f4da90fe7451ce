"""uvicorn's HTTP protocol, tuned for a relay: the gate on every request's head, the wire
path for the relayed routes, receive and write deadlines, a connection cap.

**The gate.** When a request's headers are complete, the app's `gate` (`Front.gate`: Host,
Origin, key, draining) judges its head, on every route, hot or not, also where the hot path is
off (the app's `server_gates` is set so that it does not ask again). A refusal is written at
once with `connection: close`: no `100 Continue`, no byte of the body read into memory, the
connection let go after it (`GatewayProtocol.let_go`); behind an answer still in progress on
the same connection (pipelining), in its turn.

**Deadlines and the connection cap** are judged here (`GatewayProtocol.judge`) at the sweeps of
`limits.Watch`, which says what they are and why they cost no timer per request; a connection
past one, or refused, is let go (`GatewayProtocol.let_go`): answered, then closed after a
linger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, cast

import httptools
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.middleware.message_logger import MessageLoggerMiddleware
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
from uvicorn.server import ServerState

from modelhost.errors import error_body
from modelhost.serving.access import AccessBuffer, access_buffer
from modelhost.serving.answers import Answer
from modelhost.serving.limits import (
    BODY,
    HEAD,
    IDLE,
    MAX_HEAD_BYTES,
    Limits,
    answer_bytes,
    error_head_and_body,
    reset,
    watch_of,
)
from modelhost.serving.wire import CoalescingWriter, HotCycle, HotRoute, raise_in_step

log = logging.getLogger(__name__)


def front_of(app: Any) -> Any:
    """The app behind uvicorn's own wrappers (proxy headers, trace logging)."""
    while isinstance(app, (ProxyHeadersMiddleware, MessageLoggerMiddleware)):
        app = app.app
    return app


def hot_routes_of(app: Any) -> Mapping[bytes, HotRoute]:
    """The hot routes the app offers (by exact path), looking through uvicorn's proxy-headers
    middleware; none behind any other wrapper (trace logging's, say)."""
    while isinstance(app, ProxyHeadersMiddleware):
        app = app.app
    routes: Mapping[bytes, HotRoute] = getattr(app, "hot_routes", {})
    return routes


Gate = Callable[[bytes, str, list[tuple[bytes, bytes]]], Answer | None]


def request_path(url: bytes) -> str:
    """The path of a request target, as uvicorn puts it in the ASGI scope."""
    path: str = httptools.parse_url(url).path.decode("ascii")
    return urllib.parse.unquote(path) if "%" in path else path


GATE_FAILED = Answer(json.dumps(error_body("The gateway failed to process the request.",
                                           "server_error")).encode(), 500)


def _nothing() -> None:
    pass


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with hot routes, the app's gate, receive and write
    deadlines, a connection cap, and a `CoalescingWriter` transport."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.writer: CoalescingWriter = None  # type: ignore[assignment]
        self.hot: Mapping[bytes, HotRoute] = {}
        if self.limit_concurrency is None:
            self.hot = hot_routes_of(self.app)
        # The hot routes' complete answers note their access lines here (`access.py`).
        self.access: AccessBuffer | None = access_buffer(
            server_state, self.access_logger, self.loop) if self.access_log else None
        front = front_of(self.app)
        self.gate: Gate | None = getattr(front, "gate", None)
        if self.gate is not None and hasattr(front, "server_gates"):
            front.server_gates = True  # the app need not call its gate again
        self.watch = watch_of(server_state, front, self.loop)
        # Receive deadlines: what is being received since when (a `Watch.now` stamp), the
        # bytes of reads that ended inside a head; the write deadline: the unsent bytes and
        # `resume_writing` calls seen at the last sweep, and since when nothing drained.
        self.phase = HEAD
        self.since = 0.0
        self.head_bytes = 0
        self.unsent = 0
        self.resumed = 0
        self.resumed_seen = 0
        self.stalled_since = 0.0
        self.let_go_already = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.writer = CoalescingWriter(self.transport, self.loop)
        self.transport = self.writer  # type: ignore[assignment]
        watch = self.watch
        self.since = watch.opened()
        limits = watch.limits
        if limits is not None and len(self.connections) > limits.max_connections:
            log.warning("%d connections open: refusing a new one (MODELHOST_MAX_CONNECTIONS)",
                        len(self.connections) - 1)
            self.let_go(error_head_and_body(
                503, self.server_state.default_headers,
                f"The gateway has too many open connections ({limits.max_connections}); "
                "retry later.", "service_unavailable", "too_many_connections",
                ((b"retry-after", b"1"),)))

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.phase == HEAD and not self.let_go_already:  # the read ended inside a head
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self.let_go(error_head_and_body(
                    431, self.server_state.default_headers,
                    f"The request's line and headers exceed {MAX_HEAD_BYTES} bytes.",
                    "invalid_request_error", "request_header_fields_too_large"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.phase == IDLE:  # not the connection's first request: from its first byte
            self.since = self.watch.now
            self.phase = HEAD

    def on_headers_complete(self) -> None:
        if self.let_go_already:  # a pipelined request after a refusal, in the same read
            return
        self.phase = BODY
        self.since = self.watch.now
        self.head_bytes = 0
        url = self.url
        method = self.parser.get_method()
        route = self.hot.get(url)
        hot = route is not None and method == b"POST" and not self.parser.should_upgrade()
        gate = self.gate
        if gate is not None:
            path = url.decode("ascii") if hot else request_path(url)
            try:
                refusal = gate(method, path, self.headers)
            except Exception:
                log.exception("the gate failed on %s %s", method.decode("latin-1"), path)
                refusal = GATE_FAILED
            if refusal is not None:
                self.refuse(refusal, method, path)
                return
        if not hot:
            super().on_headers_complete()
            return
        assert route is not None
        http_version = self.parser.get_http_version()
        scope = self.scope
        scope["method"] = "POST"
        scope["http_version"] = http_version
        scope["path"] = path if gate is not None else url.decode("ascii")
        scope["raw_path"] = url
        scope["query_string"] = b""
        keep_alive = http_version != "1.0" and self.parser.should_keep_alive()
        existing = self.cycle
        cycle = self.cycle = HotCycle(self, route, keep_alive)
        if existing is None or existing.response_complete:
            if self.expect_100_continue or cycle.too_large:
                self._start_asgi_task(cycle, self.app)
            else:
                cycle.deferred = True
        else:
            # A pipelined request waits for the one before it to be answered.
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))

    def refuse(self, answer: Answer, method: bytes, path: str) -> None:
        """Answer a request refused on its head, and let the connection go; behind an answer
        still in progress (pipelining), in its turn."""
        scope = self.scope
        scope["method"] = method.decode("ascii")
        scope["http_version"] = self.parser.get_http_version()
        scope["path"] = path
        scope["raw_path"], _, scope["query_string"] = self.url.partition(b"?")
        existing = self.cycle
        cycle = self.cycle = RequestResponseCycle(
            scope=scope, transport=self.transport, flow=self.flow, logger=self.logger,
            access_logger=self.access_logger, access_log=self.access_log,
            default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
            expect_100_continue=False, keep_alive=False, on_response=self.on_response_complete)
        if existing is None or existing.response_complete:
            # What the parser still delivers of this request is ignored (a complete cycle).
            cycle.response_started = cycle.response_complete = True
            if self.access_log:
                self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(scope),
                                        scope["method"], get_path_with_query_string(scope),
                                        scope["http_version"], answer.status)
            self.let_go(answer_bytes(answer.status, self.server_state.default_headers,
                                     answer.headers, answer.body))
        else:
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, cast(ASGI3Application, answer)))

    def start_cycle(self, cycle: HotCycle) -> None:
        self._start_asgi_task(cycle, self.app)

    def on_message_complete(self) -> None:
        self.phase = IDLE
        cycle = self.cycle
        if type(cycle) is not HotCycle or not cycle.deferred:
            super().on_message_complete()
            return
        cycle.deferred = False
        cycle.more_body = False
        try:
            started = cycle.route.start(cycle)
        except Exception as exc:
            cycle.go_on(raise_in_step(exc))
            return
        if not started:
            self._start_asgi_task(cycle, self.app)

    def on_body(self, body: bytes) -> None:
        self.since = self.watch.now
        cycle = self.cycle
        if type(cycle) is HotCycle:
            cycle.feed(body)
        else:
            super().on_body(body)

    def resume_writing(self) -> None:
        self.resumed += 1
        super().resume_writing()

    def handle_websocket_upgrade(self) -> None:
        if not self.let_go_already:
            super().handle_websocket_upgrade()

    def let_go(self, answer: bytes) -> None:
        """Send `answer` (a complete answer with `connection: close`, or nothing) and leave
        the connection: it is no longer this protocol's nor counted as open, the request in
        progress sees a disconnect, and the socket is closed after a linger (`Watch.linger`).
        """
        if self.let_go_already:
            return
        self.let_go_already = True
        self.phase = IDLE
        self.connections.discard(self)
        self._unset_keepalive_if_required()
        cycle = self.cycle
        if cycle is not None:
            cycle.on_response = _nothing
            if not cycle.response_complete:
                cycle.disconnected = True
            cycle.message_event.set()
        self.pipeline.clear()
        self.flow.resume_writing()  # a task waiting to write wakes and sees the disconnect
        self.flow.read_paused = False  # the transport reads on (`Watch.linger`)
        writer = self.writer
        writer.flush()
        self.watch.linger(writer.transport, answer)

    def judge(self, now: float, limits: Limits) -> None:
        """Apply the deadlines at a sweep (`Watch.sweep`)."""
        transport = self.writer.transport
        # The transport holds bytes only once the kernel's buffers for the client are full.
        # Progress: it holds fewer than at the last sweep, or it went under its low-water mark
        # since (`resume_writing`). A client reading slower than its answer is produced still
        # drains it once the transport pauses its writer (past 64 KiB).
        unsent = transport.get_write_buffer_size()
        if unsent:
            if not self.unsent or unsent < self.unsent or self.resumed != self.resumed_seen:
                self.stalled_since = now
            elif now - self.stalled_since > limits.write_timeout + limits.tick:
                log.info("%s: the client read nothing of its answer for %g s: disconnected",
                         self._peer(), limits.write_timeout)
                reset(transport)
                return
            self.resumed_seen = self.resumed
        self.unsent = unsent
        phase = self.phase
        if phase == IDLE or transport.is_closing():
            return
        cycle = self.cycle
        if (self.flow.read_paused  # not the client's wait: ours
                or (phase == HEAD and cycle is not None and not cycle.response_complete)
                or (phase == BODY and cycle is not None and cycle.waiting_for_100_continue)):
            self.since = now
            return
        if phase == HEAD:
            limit, what = limits.header_timeout, "headers were not received"
        else:
            limit, what = limits.body_timeout, "body stopped arriving"
        if now - self.since <= limit + limits.tick:
            return
        log.info("%s: the request's %s within %g s: disconnected", self._peer(), what, limit)
        answered = phase == BODY and cycle is not None and cycle.response_started
        self.let_go(b"" if answered else error_head_and_body(
            408, self.server_state.default_headers,
            f"The request's {what} within {limit:g} s.", "invalid_request_error",
            "request_timeout"))

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"


def in_flight(server_state: ServerState) -> list[HttpToolsProtocol]:
    """The connections with a request in progress (being received or answered)."""
    return [conn for conn in server_state.connections
            if isinstance(conn, HttpToolsProtocol) and conn.cycle is not None
            and not conn.cycle.response_complete]
