"""uvicorn, tuned for a relay: the hot routes skip the ASGI stack, and every answer's head and
body leave in one write.

**Hot routes.** Chat, completions and embeddings requests (POST to an exact path that the app
lists in `hot_routes`) are served by `HotCycle`, straight from uvicorn's HTTP protocol: the
body is collected as the parser delivers it, the route is called with it, and a complete answer
is written as one buffer. Everything else, and these routes under any other method, with a query
string, or as a websocket upgrade, goes through uvicorn's own request cycle and the ASGI app.
The connection itself stays uvicorn's: keep-alive and its timeout, pipelining, flow control,
graceful shutdown and the connection and request bookkeeping are all its code. Measured against
the ASGI path in one benchmark run, at 500 req/s, this took the gateway's CPU per request from
355 to 310 µs and its added p50 from 0.57 to 0.48 ms (docs/benchmarks.md).

A hot route may also take a request without a task (`HotRoute.start`): its cycle is not
started when its head is parsed but when its body is complete, and the route is asked first
whether it can answer from callbacks alone (the relay can when the model is ready, a slot is
free and a connection to the worker is pooled: `relay.Exchange`). If it cannot, the cycle's
task is started then, as before.

The hot path is used only where nothing would see the difference: not when uvicorn's access log
is asked for (every request then goes through the ASGI path and gets its line), not at trace log
level (which wraps the app to log its messages), not with a concurrency limit. Behind a trusted
proxy the hot routes do not need the client's forwarded address, so uvicorn's proxy-headers
middleware is skipped for them.

**One write per answer.** uvicorn writes a response's status line and headers when the app
sends `http.response.start`, and the body in a second write when it sends `http.response.body`.
For a small JSON answer that is two system calls where one would do, and a client that wakes
twice to read one answer (about 50 µs at p50 on the benchmark's machine, for a relay whose whole
budget is 500 µs). `GatewayProtocol`'s transport is behind `CoalescingWriter`: a write is held
until the next write (sent together) or the end of the current event-loop iteration (sent
alone), whichever comes first. Nothing waits longer than that: the first event of a stream,
which may be followed by nothing for seconds, still leaves in the same iteration.

**The gate.** When a request's headers are complete, the app's `gate` (`Front.gate`: Host,
Origin, key, draining) judges its head, on every route, hot or not, also where the hot path is
off (the app's `server_gates` is set so that it does not ask again). A refusal is written at
once with `connection: close`: no `100 Continue`, no byte of the body read into memory, the
connection let go after it (`GatewayProtocol.let_go`); behind an answer still in progress on
the same connection (pipelining), in its turn.

**Deadlines and the connection cap** (`Watch`, when the app carries `Settings`): a request's
headers must be complete within `header_timeout` (from its first byte, or from the connection's
opening for the first request), a body may pause at most `body_timeout` between two pieces,
a head is at most `MAX_HEAD_BYTES`, and a client that reads nothing of its answer for
`write_timeout` is reset (which ends a relayed stream and frees its model's slot, and makes
the kernel drop what it still held for that client). Past a
receive deadline the client gets a 408 in the OpenAI error shape when nothing was answered
yet. Past `max_connections` open connections a new one is answered 503 at once. None of this
costs a timer per request: the protocol stamps its progress with a clock that one periodic
sweeper per server advances, and the sweeper judges every connection (a deadline fires
between its time and two ticks later; a tick is at most 1 s). uvicorn's own keep-alive
timeout still governs idle connections. Fed requests in-process, the protocol's own work per
hot request went from 6.8 to 7.4 µs with all of this (a trivial gate; best of 8 runs).

A connection that is let go (a refusal, a 408, a 503 past the cap) is not closed at once: the
answer is followed by a FIN, what the client still sends is read and dropped (never parsed or
kept) until it closes its side or `LINGER` seconds have passed. Closing a socket with unread
input sends a reset, which makes a client that is still sending its body lose the answer.

**Graceful stop.** `GatewayServer` (uvicorn's server) takes SIGTERM or SIGINT as the start of a
drain: the app's `draining` flag is set at once (its gate then answers 503 to new requests,
`/ready` 503), connections are still accepted, and requests in flight, streams included,
may finish for `drain_timeout` seconds; then uvicorn's shutdown runs (the app's lifespan stops
the workers). A second signal ends the drain at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol, cast

import httptools
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.middleware.message_logger import MessageLoggerMiddleware
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
from uvicorn.server import ServerState

from modelhost.asgi import Answer
from modelhost.errors import error_body
from modelhost.settings import Settings

log = logging.getLogger(__name__)


class CoalescingWriter:
    """A transport whose writes within one event-loop iteration go out as one."""

    __slots__ = ("_loop", "_pending", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._pending: bytes | None = None

    def write(self, data: bytes) -> None:
        pending = self._pending
        if pending is None:
            self._pending = data
            self._loop.call_soon(self.flush)
        else:
            self._pending = None
            self.transport.write(pending + data)

    def write_now(self, data: bytes) -> None:
        """Write `data` at once, after anything still held."""
        pending = self._pending
        if pending is not None:
            self._pending = None
            data = pending + data
        self.transport.write(data)

    def flush(self) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            if not self.transport.is_closing():
                self.transport.write(pending)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class HotRoute(Protocol):
    """A route served by `HotCycle`.

    `start` is called first, from the parser's callback, once the request body is complete:
    it may take the request (True) and answer it later with `cycle.answer(...)` from any
    callback, or go on in a task with `cycle.go_on(...)`; no task is started for it. If it
    returns False, `__call__` is awaited in a task, as it is straight away when the body is
    over `limit` bytes or the client waits for `100 Continue`. `__call__` answers with
    `cycle.answer(...)` or through the cycle's ASGI `send`/`receive` (a stream)."""

    limit: int

    def start(self, cycle: HotCycle) -> bool: ...

    async def __call__(self, cycle: HotCycle) -> None: ...


Step = Callable[["HotCycle"], Awaitable[None]]


class HotCycle(RequestResponseCycle):
    """One request on a hot route: uvicorn's request cycle, run without the ASGI app.

    The body is collected in full (up to the route's limit, past which the rest is dropped
    and `too_large` is set) before the route is called. `answer()` writes a complete answer
    as one buffer; a stream uses the inherited ASGI `send` and `receive`, whose
    `http.disconnect` tells the route that the client left.
    """

    def __init__(self, protocol: GatewayProtocol, route: HotRoute, keep_alive: bool) -> None:
        self.protocol = protocol
        super().__init__(
            scope=protocol.scope, transport=protocol.transport, flow=protocol.flow,
            logger=protocol.logger, access_logger=protocol.access_logger, access_log=False,
            default_headers=protocol.server_state.default_headers,
            message_event=asyncio.Event(), expect_100_continue=protocol.expect_100_continue,
            keep_alive=keep_alive, on_response=protocol.on_response_complete)
        self.writer = protocol.writer
        self.route = route
        self.step: Step = route
        self.limit = route.limit
        self.deferred = False  # the route's `start` is called when the body is complete
        self.headers: list[tuple[bytes, bytes]] = protocol.headers
        self.declared: int | None = None
        self.too_large = False
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit():
                self.declared = int(value)
                self.too_large = self.declared > self.limit

    def feed(self, data: bytes) -> None:
        if self.response_complete or self.too_large:
            return
        if len(self.body) + len(data) > self.limit:
            self.too_large = True
            self.body = bytearray()
            self.message_event.set()
            if self.deferred:  # refuse it now, not when the client has sent it all
                self.deferred = False
                self.protocol.start_cycle(self)
        else:
            self.body += data

    def asgi(self) -> tuple[Scope, Receive, Send]:
        """The request's scope and the ASGI callables that answer it (for a stream)."""
        return (cast(Scope, self.scope), cast(Receive, self.receive),
                cast(Send, self.send))

    def take_body(self) -> bytes:
        body = bytes(self.body)
        self.body = bytearray()
        return body

    def go_on(self, step: Step) -> None:
        """Continue a request that the route's `start` took in a task: `step(cycle)` runs
        with the same error handling as the route (a 500 if it raises before answering)."""
        self.step = step
        self.protocol.start_cycle(self)

    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Send a complete answer (its headers include Content-Length) in one write."""
        if self.response_started:
            raise RuntimeError("the answer has already been started")
        parts = [STATUS_LINE[status]]
        for name, value in self.default_headers:
            parts += (name, b": ", value, b"\r\n")
        for name, value in headers:
            if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
                raise RuntimeError("Invalid HTTP header.")
            parts += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", body)
        self.response_started = self.response_complete = True
        if not self.disconnected:
            self.writer.write_now(b"".join(parts))
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    async def run_asgi(self, app: ASGI3Application) -> None:
        # `app` is the ASGI app that uvicorn's pipeline hands every cycle; this one runs its
        # own route instead.
        try:
            if self.more_body and not self.too_large:
                if self.waiting_for_100_continue:
                    self.waiting_for_100_continue = False
                    self.writer.write_now(b"HTTP/1.1 100 Continue\r\n\r\n")
                while self.more_body and not self.too_large and not self.disconnected:
                    self.flow.resume_reading()
                    self.message_event.clear()
                    await self.message_event.wait()
            self.message_event.clear()
            if self.disconnected and self.step is self.route:
                return  # (a step given by `go_on` owns a model's slot: it runs, and frees it)
            await self.step(self)
        except BaseException as exc:
            self.logger.error("Exception in a hot route", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        else:
            if not self.response_complete and not self.disconnected:
                self.logger.error("A hot route returned without completing its answer.")
                self.transport.close()
        finally:
            self.on_response = lambda: None


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

# What a connection is receiving: nothing (between requests, or while answering), a request's
# head, or its body.
IDLE, HEAD, BODY = 0, 1, 2
MAX_HEAD_BYTES = 64 * 1024  # a request line and headers past this: 431
LINGER = 2.0  # seconds a let-go connection drops what the client still sends, at most


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    body_timeout: float
    write_timeout: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.header_timeout, settings.body_timeout, settings.write_timeout,
                   settings.max_connections)

    @property
    def tick(self) -> float:
        return max(0.05, min(1.0, self.header_timeout / 4, self.body_timeout / 4,
                             self.write_timeout / 4, LINGER / 2))


class Watch:
    """The deadlines of one server's connections: a coarse clock, advanced by one periodic
    sweeper that runs while there are connections, and the connections that are let go.

    Protocols stamp their progress with `now` (an attribute read, not a clock read or a
    timer); the sweeper reads the clock once a tick and judges every connection."""

    def __init__(self, limits: Limits | None, connections: set[Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.connections = connections
        self.loop = loop
        self.now = loop.time()
        self.lingering: set[_Lingering] = set()
        self._timer: asyncio.TimerHandle | None = None

    def opened(self) -> float:
        """A connection was made: the time, with the sweeper running."""
        now = self.now = self.loop.time()
        if self._timer is None and self.limits is not None:
            self._timer = self.loop.call_later(self.limits.tick, self.sweep)
        return now

    def sweep(self) -> None:
        limits = self.limits
        assert limits is not None
        now = self.now = self.loop.time()
        for conn in list(self.connections):
            if isinstance(conn, GatewayProtocol):
                try:
                    conn.judge(now, limits)
                except Exception:  # one connection's trouble must not stop the deadlines
                    log.exception("checking the deadlines of a connection failed")
                    with contextlib.suppress(Exception):
                        conn.writer.transport.abort()
        for lingering in list(self.lingering):
            if now >= lingering.until:
                transport = lingering.transport
                if transport.get_write_buffer_size():
                    reset(transport)  # the client did not even read its answer
                else:
                    transport.close()
        if self.connections or self.lingering:
            self._timer = self.loop.call_later(limits.tick, self.sweep)
        else:
            self._timer = None

    def linger(self, transport: asyncio.Transport, answer: bytes) -> None:
        """Send `answer`, then a FIN; drop what arrives until the client closes or `LINGER`
        seconds have passed."""
        limit = self.limits.max_connections if self.limits is not None else 1024
        if len(self.lingering) >= limit or not _can_write_eof(transport):
            transport.write(answer)
            transport.close()
            return
        lingering = _Lingering(self, transport, self.loop.time() + LINGER)
        transport.set_protocol(lingering)
        self.lingering.add(lingering)
        transport.resume_reading()
        if answer:
            transport.write(answer)
        transport.write_eof()
        self.opened()


def _can_write_eof(transport: asyncio.Transport) -> bool:
    try:
        return transport.can_write_eof()
    except (AttributeError, NotImplementedError):  # a transport that cannot half-close
        return False


class _Lingering(asyncio.Protocol):
    """A connection that was let go: what the client sends is dropped."""

    def __init__(self, watch: Watch, transport: asyncio.Transport, until: float) -> None:
        self.watch = watch
        self.transport = transport
        self.until = until

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.watch.lingering.discard(self)


_watches: weakref.WeakKeyDictionary[ServerState, Watch] = weakref.WeakKeyDictionary()


def watch_of(server_state: ServerState, app: Any, loop: asyncio.AbstractEventLoop) -> Watch:
    """The server's `Watch`, made by its first connection; with deadlines and a connection cap
    when the app carries `Settings` (`Front.settings`)."""
    watch = _watches.get(server_state)
    if watch is None:
        settings = getattr(app, "settings", None)
        limits = Limits.of(settings) if isinstance(settings, Settings) else None
        watch = _watches[server_state] = Watch(limits, server_state.connections, loop)
    return watch


def error_head_and_body(status: int, default_headers: list[tuple[bytes, bytes]],
                        message: str, type_: str, code: str,
                        headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A complete answer in the OpenAI error shape, with `connection: close`."""
    body = json.dumps(error_body(message, type_, None, code)).encode()
    return answer_bytes(status, default_headers, [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
        *headers], body)


def answer_bytes(status: int, default_headers: list[tuple[bytes, bytes]],
                 headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A complete answer, with `connection: close`."""
    parts = [STATUS_LINE[status]]
    for name, value in (*default_headers, *headers):
        if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
            raise RuntimeError("Invalid HTTP header.")
        parts += (name, b": ", value, b"\r\n")
    parts += (b"connection: close\r\n\r\n", body)
    return b"".join(parts)


def request_path(url: bytes) -> str:
    """The path of a request target, as uvicorn puts it in the ASGI scope."""
    path: str = httptools.parse_url(url).path.decode("ascii")
    return urllib.parse.unquote(path) if "%" in path else path


def reset(transport: asyncio.Transport) -> None:
    """Abort a connection with a reset, so that the kernel drops what it still holds for the
    client too (a plain abort closes the socket, and the kernel goes on sending its buffer)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


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
        if not config.access_log and self.limit_concurrency is None:
            self.hot = hot_routes_of(self.app)
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


class GatewayServer(uvicorn.Server):
    """uvicorn's server with a drain before its shutdown (graceful stop, module docstring)."""

    def __init__(self, config: Config, drain_timeout: float) -> None:
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self.drain_until: float | None = None
        self.drained = self.announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit and self.drain_until is None
        super().handle_exit(sig, frame)  # records the signal (raised again at the end)
        if first:
            self.should_exit = False
            self.drain_until = time.monotonic() + self.drain_timeout
            front = front_of(getattr(self.config, "loaded_app", None))
            if hasattr(front, "draining"):
                front.draining = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and not self.drained:
            if not self.announced:  # here, not in the signal handler
                self.announced = True
                log.info("stopping: draining (new requests get 503) for at most %g s",
                         self.drain_timeout)
            busy = in_flight(self.server_state)
            if not busy and not self.server_state.tasks:
                log.info("drained: no request in flight")
                self.drained = self.should_exit = True
            elif self.should_exit or time.monotonic() >= self.drain_until:
                log.warning("%d request(s) still in flight %s: cut off", len(busy),
                            "at a second signal" if self.should_exit else
                            f"after the drain timeout ({self.drain_timeout:g} s)")
                for conn in busy:
                    conn.transport.abort()
                self.drained = self.should_exit = True
        return await super().on_tick(counter)


def raise_in_step(exc: Exception) -> Step:
    """A step that raises `exc` (the cycle's task then logs it and answers 500)."""
    async def step(cycle: HotCycle) -> None:
        raise exc
    return step
