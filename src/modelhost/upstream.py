"""A lean HTTP/1.1 client for the relay's hot path: the gateway talking to its workers.

Why not aiohttp: the profile of the relay (docs/benchmarks.md) put 40 % of the gateway's CPU per
request in aiohttp's client, most of it in machinery a relay to a loopback worker does not use
(cookie jars, redirects, tracing hooks, a per-request timer tree, its own stream reader). This
client does only what the relay needs, on asyncio's protocol layer:

- connections are pooled per origin and reused (keep-alive), most recently used first;
- a request with a bytes body is written with a single `transport.write`; files and
  multipart forms (audio uploads) are streamed with back-pressure;
- responses are parsed by httptools (llhttp, the parser uvicorn uses) as bytes arrive. A
  body read whole (`read()`, or a `Listener`: a non-streamed answer) is collected as the
  pieces it arrives in and joined once at the end, up to a cap past which the exchange fails
  (`AnswerTooLarge`) and its connection is aborted; a body read as it arrives (`chunks()`: a
  stream) is never buffered beyond a high-water mark: reading from the worker pauses while the
  client is slower than the worker;
- timeouts: connecting (10 s); silence from the worker (`idle_timeout`, 600 s without a byte
  by default: a long generation is legitimate; a worker that says nothing at all is not); and
  an overall deadline per exchange (`request_timeout`, which a stream's relay lifts). All are
  checked by one timer for all connections (`_sweep`), not one per request, which also asks
  an exchange followed without a task whether its client is still there (`abandoned`);
- a pooled connection the worker closed just as a request went out is retried once on a new
  connection, if not a byte of the answer had arrived;
- `close()` on a response aborts its connection, which is how a worker learns that the client
  went away (it stops generating).

Every failure is an `OSError` (`ConnectionError`, `TimeoutError`, `ssl.SSLError`), so callers
catch one thing.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import secrets
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import urlsplit

import httptools

CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0  # seconds of silence from the worker while an answer is awaited
REQUEST_TIMEOUT = 900.0  # seconds an exchange may take in all (unless lifted: a stream)
KEEPALIVE = 30.0  # an idle pooled connection older than this is not reused
MAX_IDLE = 64  # idle connections kept per origin
HIGH_WATER = 256 * 1024  # buffered answer bytes past which reading from the worker pauses
LOW_WATER = 64 * 1024
FILE_CHUNK = 256 * 1024


class UpstreamClosed(ConnectionError):
    """The worker closed the connection before its answer was complete."""


class UpstreamProtocolError(ConnectionError):
    """The worker's answer was not valid HTTP/1.1."""


class Abandoned(UpstreamClosed):
    """Whoever wanted the answer has gone (`UpstreamResponse.abandoned`)."""


class AnswerTooLarge(ConnectionError):
    """The answer's body, read whole, went past the cap it was read with."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the answer exceeds {limit} bytes")
        self.limit = limit


class UpstreamTimeout(TimeoutError):
    """The exchange ran past its deadline (`idle` False) or the worker was silent for too
    long (`idle` True); `seconds` is the limit that was passed."""

    def __init__(self, seconds: float, idle: bool) -> None:
        super().__init__(f"the worker sent nothing for {seconds:g} s" if idle
                         else f"no complete answer within {seconds:g} s")
        self.seconds = seconds
        self.idle = idle


@dataclass
class Multipart:
    """A multipart/form-data body the gateway composes: text fields and one file, streamed
    from disk when sent."""

    fields: list[tuple[str, str]] = field(default_factory=list)
    file_field: str = "file"
    file_path: Path | None = None
    filename: str = "file"
    file_type: str = "application/octet-stream"
    boundary: str = field(default_factory=lambda: "modelhost-" + secrets.token_hex(12))

    def add(self, name: str, value: str) -> None:
        self.fields.append((name, value))

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _pieces(self) -> tuple[bytes, bytes]:
        """The bytes before and after the file's content."""
        head = bytearray()
        for name, value in self.fields:
            head += (f"--{self.boundary}\r\nContent-Disposition: form-data; "
                     f"name=\"{_quote(name)}\"\r\n\r\n").encode() + value.encode() + b"\r\n"
        tail = f"--{self.boundary}--\r\n".encode()
        if self.file_path is None:
            return bytes(head), tail
        head += (f"--{self.boundary}\r\nContent-Disposition: form-data; "
                 f"name=\"{_quote(self.file_field)}\"; filename=\"{_quote(self.filename)}\"\r\n"
                 f"Content-Type: {self.file_type}\r\n\r\n").encode()
        return bytes(head), b"\r\n" + tail


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace(
        "\n", "%0A")


Body = bytes | IO[bytes] | Multipart


@dataclass(frozen=True)
class _Origin:
    key: tuple[str, str, int]
    host: str
    port: int
    ssl: ssl.SSLContext | None
    host_header: bytes
    prefix: bytes  # the base URL's path, prepended to every request path


class UpstreamResponse:
    """An answer being received. `status` and `raw_headers` are known when `request()`
    returns; the body arrives through `read()` or `chunks()`. Exactly one of
    `release()` (after the body was read to the end) or `close()` must follow; both are
    idempotent, and `read()` / a finished `chunks()` release by themselves.

    Until a consumer says how it reads the body, bytes are buffered up to the high-water mark
    and reading from the worker pauses there; `collect(limit)` (what `read()` and a
    `Listener` that wants the whole body do) lifts that, up to `limit` bytes. `deadline` is
    the loop time by which the exchange must be over (`math.inf`: none)."""

    __slots__ = ("_buffer", "_check_at", "_collect", "_conn", "_done", "_error", "_head",
                 "_raw_headers", "_received", "_size", "_waiter", "abandoned", "deadline",
                 "keep_alive", "listener", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status = 0
        self.keep_alive = False
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._buffer: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._done = False
        self._error: BaseException | None = None
        self._received = False  # any byte of the answer at all
        self._collect = 0  # the cap of a body read whole; 0 while it is flow-controlled
        self._check_at = HIGH_WATER  # buffered bytes past which `_overflow` judges
        self.deadline = math.inf
        # Asked by the sweeper (about once a second) whether whoever wanted the answer has
        # gone; if so, the exchange fails and its connection is aborted (the worker stops).
        self.abandoned: Callable[[], bool] | None = None
        self._head: asyncio.Future[None] = conn.loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        # Told, from the connection's callbacks, of the head, the end and a failure (for an
        # answer relayed without a task); None once an awaiting consumer takes over.
        self.listener: Listener | None = None

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers as received, in order."""
        return self._raw_headers

    @property
    def head_received(self) -> bool:
        """Whether the status and headers are in."""
        return self._head.done() and not self._head.cancelled() and \
            self._head.exception() is None

    def take_body(self) -> bytes:
        """The body received so far (all of it, once the listener is told it is done)."""
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._size = 0
        return data

    # ------------------------------------------------------------------ consumer side
    def collect(self, limit: int) -> None:
        """Read the whole body, without flow control, up to `limit` bytes (0: no cap); past
        them the exchange fails with `AnswerTooLarge` and the connection is aborted (the
        worker stops)."""
        self._collect = self._check_at = limit if limit > 0 else sys.maxsize
        if self._size > self._check_at:
            self._overflow()
        conn = self._conn
        if conn is not None and conn.reading_paused:
            conn.resume_reading()

    async def read(self, limit: int = 0) -> bytes:
        """The whole body (at most `limit` bytes, 0: no cap: see `collect`); then the
        connection goes back to the pool."""
        try:
            await self.complete(limit)
            return self.take_body()
        finally:
            self.release()

    async def complete(self, limit: int = 0) -> int:
        """Wait until the whole body is in (at most `limit` bytes: see `collect`), and
        return its size; it stays buffered, in the pieces it arrived in, for `take_body()`
        or `chunks()`. On a failure, `close()` is the caller's."""
        if not self._done and self._error is None:
            self.collect(limit)
        while not self._done:
            if self._error is not None:
                raise self._error
            await self._wait()
        if self._error is not None:
            raise self._error
        return self._size

    @property
    def buffered(self) -> int:
        """Bytes of the body received and not yet handed on."""
        return self._size

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, in the pieces it arrives in."""
        conn = self._conn
        self._collect = 0
        self._check_at = HIGH_WATER
        while True:
            if self._buffer:
                chunk = self._buffer.popleft()
                self._size -= len(chunk)
                if conn is not None and conn.reading_paused and self._size <= LOW_WATER:
                    conn.resume_reading()
                yield chunk
            elif self._error is not None:
                raise self._error
            elif self._done:
                self.release()
                return
            else:
                await self._wait()

    def release(self) -> None:
        """Give the connection back to the pool if the answer is complete and the worker
        keeps it alive; otherwise close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.response = None
        if self._done and self._error is None and self.keep_alive and not conn.closed:
            if conn.reading_paused:  # paused at the high-water mark as the answer ended
                conn.resume_reading()
            conn.pool.put(conn)
        else:
            conn.abort()

    def close(self) -> None:
        """Abort the connection: the worker sees the client go away and stops."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.response = None
            conn.abort()
        if not self._done and self._error is None:
            self._error = UpstreamClosed("the answer was abandoned")
        self._wake()

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ connection side
    def _feed(self, chunk: bytes) -> None:
        self._buffer.append(chunk)
        self._size += len(chunk)
        if self._size > self._check_at:
            self._overflow()
        if not self._collect:  # a body read whole wakes its reader once, at the end
            self._wake()

    def _overflow(self) -> None:
        """More is buffered than the consumer wants: pause reading (a flow-controlled body)
        or fail (a body read whole, past its cap)."""
        conn = self._conn
        if not self._collect:
            if conn is not None and not conn.reading_paused:
                conn.pause_reading()
            return
        self._buffer.clear()
        self._size = 0
        self._fail(AnswerTooLarge(self._collect))
        if conn is not None:
            self._conn = None
            conn.response = None
            conn.abort()

    def _finish(self) -> None:
        self._done = True
        if self.listener is not None:
            self.listener.done(self)
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._done or self._error is not None:
            return
        self._error = exc
        if not self._head.done():
            self._head.set_exception(exc)
            self._head.exception()  # retrieved: whoever awaits it re-raises
        if self.listener is not None:
            self.listener.failed(self, exc)
        self._wake()


class Listener(Protocol):
    """Follows an answer from the connection's callbacks, without a task (`UpstreamClient.
    start`). Each call happens inside the connection's `data_received` (or `connection_lost`),
    so it must not raise; setting `resp.listener = None` hands the answer to an awaiting
    consumer (`read()`, `chunks()`), which finds everything received so far."""

    def head(self, resp: UpstreamResponse) -> None:
        """The status and headers are in (`status`, `raw_headers`)."""

    def done(self, resp: UpstreamResponse) -> None:
        """The whole body is in (`take_body()`); `release()` gives the connection back."""

    def failed(self, resp: UpstreamResponse, exc: BaseException) -> None:
        """The exchange failed (`head_received` says whether before the head was in)."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a worker, one exchange at a time."""

    def __init__(self, pool: _Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reading_paused = False
        self.last_io = 0.0  # when the worker last sent a byte (or the exchange started)
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None:  # bytes nobody asked for: this connection cannot be trusted
            self.abort()
            return
        resp._received = True
        self.last_io = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            resp._fail(UpstreamProtocolError(f"invalid HTTP answer from the worker: {exc}"))
            self.abort()

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        resp = self.response
        if resp is not None:
            reason = f": {exc}" if exc else ""
            resp._fail(UpstreamClosed(f"the worker closed the connection{reason}"))
        self._wake_drain(exc or UpstreamClosed("the worker closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain(None)

    # ---------------------------------------------------------------- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        resp = self.response
        if resp is None:
            return
        resp.status = self.parser.get_status_code()
        if 100 <= resp.status < 200 and resp.status != 101:
            return  # an interim answer (100 Continue): the real one follows
        resp.keep_alive = self.parser.should_keep_alive()
        if not resp._head.done():
            resp._head.set_result(None)
        if resp.listener is not None:
            resp.listener.head(resp)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        resp = self.response
        if resp is None:
            return
        if 100 <= resp.status < 200 and resp.status != 101:
            resp._raw_headers.clear()
            return
        resp._finish()

    # ---------------------------------------------------------------- our side
    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def start(self, resp: UpstreamResponse) -> None:
        self.response = resp
        self.last_io = self.loop.time()

    def silent_for(self, now: float) -> float:
        """Seconds the worker has kept this exchange waiting (0 when none is under way, or
        when it is us not reading)."""
        if self.response is None or self.closed or self.reading_paused:
            return 0.0
        return now - self.last_io

    async def drain(self) -> None:
        if self.closed:
            raise UpstreamClosed("the worker closed the connection")
        if not self._write_paused:
            return
        self._drain = self.loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    def _wake_drain(self, exc: BaseException | None) -> None:
        waiter = self._drain
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)


class _Pool:
    """Idle connections to one origin, most recently used first."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.idle: list[_Connection] = []
        self.all: set[_Connection] = set()
        self.connect_to: tuple[str, ...] | None = None

    def put(self, conn: _Connection) -> None:
        if len(self.idle) >= MAX_IDLE:
            conn.abort()
            return
        conn.idle_since = conn.loop.time()
        self.idle.append(conn)

    def take(self, now: float) -> _Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE:
                return conn
            conn.abort()
        return None

    def forget(self, conn: _Connection) -> None:
        self.all.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def close(self) -> None:
        for conn in list(self.all):
            conn.abort()
        self.idle.clear()


class UpstreamClient:
    """Pooled HTTP/1.1 connections to the workers (and remote servers)."""

    def __init__(self, idle_timeout: float = IDLE_TIMEOUT,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self._pools: dict[str, _Pool] = {}
        self._heads: dict[tuple[str, str, tuple[tuple[str, str], ...]], bytes] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(self, base: str, method: str, path: str, headers: Mapping[str, str],
                      body: Body = b"", connect_to: tuple[str, ...] | None = None,
                      abandoned: Callable[[], bool] | None = None) -> UpstreamResponse:
        """Send a request to `base` (a URL with an optional path prefix) + `path` and return
        once the answer's status and headers are in. `connect_to`: the addresses new
        connections go to (tried in order) instead of resolving the URL's host again
        (addresses checked when the model was loaded, against DNS rebinding); Host and TLS
        keep the name."""
        pool = self._pools.get(base)
        if pool is None:
            pool = self._pools[base] = _Pool(_origin(base))
        if connect_to != pool.connect_to:
            pool.close()  # connections to the address checked before are not reused
            pool.connect_to = connect_to
        loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)
        head = self._head(pool, method, path, headers, _length(body))
        for attempt in (1, 2):
            conn = pool.take(loop.time())
            reused = conn is not None
            if conn is None:
                conn = await _connect(pool, loop)
            resp = UpstreamResponse(conn)
            resp.deadline = loop.time() + self.request_timeout
            resp.abandoned = abandoned
            conn.start(resp)
            try:
                await _send(conn, head, body)
                await resp._head
                return resp
            except OSError as exc:
                resp.close()
                if reused and attempt == 1 and not resp._received and \
                        not isinstance(exc, TimeoutError):
                    continue  # a pooled connection the worker had just closed
                raise
            except BaseException:
                resp.close()  # cancelled: nobody will read this answer
                raise
        raise AssertionError("unreachable")

    def start(self, base: str, method: str, path: str, headers: Mapping[str, str],
              body: bytes, listener: Listener, limit: int = 0) -> UpstreamResponse | None:
        """Send a request now, without waiting, on an idle pooled connection to `base`, and
        follow its answer with `listener`, its body collected whole up to `limit` bytes (see
        `UpstreamResponse.collect`); None (nothing sent) when no idle connection is at hand
        (`request()` then opens one)."""
        pool = self._pools.get(base)
        if pool is None:
            return None
        loop = asyncio.get_running_loop()
        conn = pool.take(loop.time())
        if conn is None:
            return None
        if conn.transport is None:
            conn.abort()
            return None
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)
        resp = UpstreamResponse(conn)
        resp.listener = listener
        resp._collect = resp._check_at = limit if limit > 0 else sys.maxsize
        conn.start(resp)
        resp.deadline = conn.last_io + self.request_timeout
        conn.transport.write(self._head(pool, method, path, headers, len(body)) + body)
        return resp

    def _head(self, pool: _Pool, method: str, path: str, headers: Mapping[str, str],
              length: int) -> bytes:
        """The request's head (status line and headers), cached per method, path and
        headers, with its Content-Length."""
        key = (method, path, tuple(headers.items()))
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) > 1024:
                self._heads.clear()
            head = self._heads[key] = _head(method, pool.origin, path, headers)
        return head + b"%d\r\n\r\n" % length

    @property
    def _sweep_every(self) -> float:
        return min(1.0, self.idle_timeout / 4, self.request_timeout / 4)

    def _sweep(self) -> None:
        """Fail every exchange past its deadline, or whose worker has sent nothing for
        `idle_timeout` seconds, and abort its connection (the worker stops). One timer for all
        connections, not one per request (a timer costs as much as parsing)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        busy = False
        for pool in self._pools.values():
            for conn in list(pool.all):
                resp = conn.response
                if resp is None:
                    continue
                busy = True
                error: OSError
                if now >= resp.deadline:
                    error = UpstreamTimeout(self.request_timeout, idle=False)
                elif conn.silent_for(now) >= self.idle_timeout:
                    error = UpstreamTimeout(self.idle_timeout, idle=True)
                elif resp.abandoned is not None and resp.abandoned():
                    error = Abandoned("the client went away")
                else:
                    continue
                resp._fail(error)
                conn.abort()
        self._sweeper = loop.call_later(self._sweep_every, self._sweep) if busy else None

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def _origin(base: str) -> _Origin:
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {base!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    default = port == (443 if tls else 80)
    host = parts.hostname
    host_header = (f"[{host}]" if ":" in host else host) + ("" if default else f":{port}")
    return _Origin(key=(parts.scheme, host, port), host=host, port=port,
                   ssl=ssl.create_default_context() if tls else None,
                   host_header=host_header.encode("idna"),
                   prefix=parts.path.rstrip("/").encode())


async def _connect(pool: _Pool, loop: asyncio.AbstractEventLoop) -> _Connection:
    origin = pool.origin
    hosts = pool.connect_to or (origin.host,)
    for index, host in enumerate(hosts):
        try:
            _, proto = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(pool, loop), host, origin.port, ssl=origin.ssl,
                server_hostname=origin.host if origin.ssl else None), CONNECT_TIMEOUT)
        except TimeoutError:
            if index + 1 < len(hosts):
                continue
            raise TimeoutError(f"connecting to {origin.host}:{origin.port} timed out after "
                               f"{CONNECT_TIMEOUT:g} s") from None
        except OSError:
            if index + 1 < len(hosts):
                continue
            raise
        pool.all.add(proto)
        return proto
    raise AssertionError("unreachable")


def _length(body: Body) -> int:
    if isinstance(body, bytes):
        return len(body)
    if isinstance(body, Multipart):
        before, after = body._pieces()
        size = os.stat(body.file_path).st_size if body.file_path is not None else 0
        return len(before) + size + len(after)
    position = body.seek(0, os.SEEK_END)
    body.seek(0)
    return position


def _head(method: str, origin: _Origin, path: str, headers: Mapping[str, str]) -> bytes:
    """A request's head up to the Content-Length value."""
    lines = [f"{method} ".encode() + origin.prefix + path.encode() + b" HTTP/1.1",
             b"Host: " + origin.host_header]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} contains a line break")
        lines.append(f"{name}: {value}".encode("latin-1"))
    lines.append(b"Content-Length: ")
    return b"\r\n".join(lines)


async def _send(conn: _Connection, head: bytes, body: Body) -> None:
    transport = conn.transport
    if transport is None or conn.closed:
        raise UpstreamClosed("the worker closed the connection")
    if isinstance(body, bytes):
        transport.write(head + body)
        return
    if isinstance(body, Multipart):
        before, after = body._pieces()
        transport.write(head + before)
        if body.file_path is not None:
            # A local spool file: opening it does not block.
            with open(body.file_path, "rb") as file:  # noqa: ASYNC230
                await _send_file(conn, file)
        transport.write(after)
        return
    transport.write(head)
    body.seek(0)
    await _send_file(conn, body)


async def _send_file(conn: _Connection, file: IO[bytes]) -> None:
    while chunk := file.read(FILE_CHUNK):
        if conn.closed or conn.transport is None:
            raise UpstreamClosed("the worker closed the connection")
        conn.transport.write(chunk)
        await conn.drain()
