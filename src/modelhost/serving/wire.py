"""The wire path: the relayed routes served straight from the HTTP protocol, with every answer's
head and body in one write.

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
free and a connection to the worker is pooled: `call.Call.start`). If it cannot, the cycle's
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

A route that raises before answering gets the same last resort as on the ASGI path: a 500 in the
OpenAI error shape (`answers.last_resort`), not uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)

from modelhost.logs import request_id as bound_request_id
from modelhost.requestid import request_id
from modelhost.serving.access import AccessBuffer
from modelhost.serving.answers import Answer, error_answer, last_resort, too_large
from modelhost.serving.call import Call
from modelhost.serving.endpoint import RelayEndpoint
from modelhost.serving.stream import RelayStream


class Connection(Protocol):
    """What a `HotCycle` uses of its connection (`protocol.GatewayProtocol`)."""

    scope: Any
    transport: Any
    flow: Any
    logger: Any
    access_logger: Any
    access_log: bool
    access: AccessBuffer | None
    server_state: Any
    expect_100_continue: bool
    writer: CoalescingWriter
    headers: list[tuple[bytes, bytes]]

    def on_response_complete(self) -> None: ...

    def start_cycle(self, cycle: HotCycle) -> None: ...


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

    def __init__(self, protocol: Connection, route: HotRoute, keep_alive: bool) -> None:
        self.protocol = protocol
        super().__init__(
            scope=protocol.scope, transport=protocol.transport, flow=protocol.flow,
            logger=protocol.logger, access_logger=protocol.access_logger,
            access_log=protocol.access_log,  # uvicorn's line, for a stream (when on)
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
        self.given_id: bytes | None = None  # the client's X-Request-ID
        self.request_id = b""  # the request's id, once the route has it
        self.authorization: bytes | None = None  # whose usage it is (`modelhost.usage`)
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit():
                self.declared = int(value)
                self.too_large = self.declared > self.limit
            elif name == b"x-request-id":
                self.given_id = value
            elif name == b"authorization" and self.authorization is None:
                self.authorization = value  # the first, as the gate judged it

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
        # An answer's headers are the gateway's own (`answers.Answer`) but for its content
        # type, which a worker may have given: that one alone is checked as uvicorn checks
        # every header (two pattern searches a header: a microsecond in all for four).
        name, value = headers[0]
        if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
            raise RuntimeError("Invalid HTTP header.")
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", body)
        self.response_started = self.response_complete = True
        if not self.disconnected:
            self.writer.write_now(b"".join(parts))
        access = self.protocol.access
        if access is not None:  # the line is written later, off the request's path
            scope = self.scope
            access.note(scope.get("client"), scope["method"], scope["path"],
                        scope["http_version"], status, self.request_id)
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
                # The last resort, in the OpenAI shape as on the ASGI path.
                answer = last_resort()
                self.answer(answer.status, answer.headers, answer.body)
            else:
                self.transport.close()
        else:
            if not self.response_complete and not self.disconnected:
                self.logger.error("A hot route returned without completing its answer.")
                self.transport.close()
        finally:
            self.on_response = lambda: None


def raise_in_step(exc: Exception) -> Step:
    """A step that raises `exc` (the cycle's task then logs it and answers 500)."""
    async def step(cycle: HotCycle) -> None:
        raise exc
    return step


class HotRelay:
    """A relayed route as the wire path calls it (a `HotRoute`): the endpoint's call, driven
    from the cycle. The gate has judged the request's head already (`protocol.py`)."""

    __slots__ = ("endpoint", "limit")

    def __init__(self, endpoint: RelayEndpoint) -> None:
        self.endpoint = endpoint
        self.limit = endpoint.max_request_bytes

    def start(self, cycle: HotCycle) -> bool:
        """Serve the request from callbacks if nothing has to be waited for
        (`RelayEndpoint.start`); False to be awaited instead."""
        if cycle.too_large:
            return False
        rid = cycle.request_id = request_id(cycle.given_id)
        return self.endpoint.start(bytes(cycle.body), _CycleReply(self, cycle), rid,
                                   cycle.authorization)

    async def __call__(self, cycle: HotCycle) -> None:
        rid = cycle.request_id = cycle.request_id or request_id(cycle.given_id)
        bound_request_id.set(rid)  # this task's lines carry it
        if cycle.too_large:
            answer: Answer | ASGIApp = error_answer(too_large(self.limit, cycle.declared),
                                                    {"x-request-id": rid.decode("latin-1")})
        else:
            answer = await self.endpoint.answer(cycle.take_body(), cycle.asgi()[0],
                                                lambda: cycle.disconnected, rid,
                                                cycle.authorization)
        await _deliver(cycle, answer)

    async def finish(self, cycle: HotCycle, call: Call,
                     step: Callable[[], Awaitable[Answer | RelayStream]]) -> None:
        bound_request_id.set(call.request_id)
        await _deliver(cycle, await self.endpoint.settle(step, cycle.asgi()[0], call))


async def _deliver(cycle: HotCycle, answer: Answer | ASGIApp) -> None:
    if isinstance(answer, Answer):
        cycle.answer(answer.status, answer.headers, answer.body)
    else:
        await answer(*cycle.asgi())


class _CycleReply:
    """`call.Reply` on a hot cycle."""

    __slots__ = ("cycle", "route")

    def __init__(self, route: HotRelay, cycle: HotCycle) -> None:
        self.route = route
        self.cycle = cycle

    def send(self, answer: Answer) -> None:
        try:
            self.cycle.answer(answer.status, answer.headers, answer.body)
        except Exception as exc:  # called from a callback, which must not raise
            self.cycle.go_on(raise_in_step(exc))

    def gone(self) -> bool:
        return self.cycle.disconnected

    def resume(self, call: Call, step: Callable[[], Awaitable[Answer | RelayStream]]) -> None:
        route = self.route
        self.cycle.go_on(lambda cycle: route.finish(cycle, call, step))
