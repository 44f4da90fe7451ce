"""Connections to a worker: one exchange at a time on each, pooled per origin, written with as
few system calls as an exchange allows.

Why not aiohttp: the profile of the relay (docs/benchmarks.md) put 40 % of the gateway's CPU per
request in aiohttp's client, most of it in machinery a relay to a loopback worker does not use
(cookie jars, redirects, tracing hooks, a per-request timer tree, its own stream reader). This
client does only what the relay needs, on asyncio's protocol layer:

- connections are pooled per origin and reused (keep-alive), most recently used first
  (`_Pool`); one idle longer than `KEEPALIVE` is not reused;
- a request with a bytes body is written with a single `transport.write`; files and
  multipart forms (audio uploads) are streamed with back-pressure (`_send`);
- the answer is parsed by httptools in `_Connection`'s callbacks and handed to its
  `UpstreamResponse` (response.py);
- connecting times out after `CONNECT_TIMEOUT`; `connect_to` addresses (checked when the model
  was loaded, against DNS rebinding) are tried in order instead of resolving the host again;
- an https base is spoken over TLS with the system's default context, checking the name.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO
from urllib.parse import urlsplit

import httptools

from modelhost.upstream.errors import UpstreamClosed, UpstreamProtocolError
from modelhost.upstream.multipart import Body, Multipart
from modelhost.upstream.response import UpstreamResponse

CONNECT_TIMEOUT = 10.0
KEEPALIVE = 30.0  # an idle pooled connection older than this is not reused
MAX_IDLE = 64  # idle connections kept per origin
FILE_CHUNK = 256 * 1024


@dataclass(frozen=True)
class _Origin:
    key: tuple[str, str, int]
    host: str
    port: int
    ssl: ssl.SSLContext | None
    host_header: bytes
    prefix: bytes  # the base URL's path, prepended to every request path



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
