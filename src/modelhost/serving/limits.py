"""Deadlines and the connection cap of the HTTP server, checked without a timer per request,
and the connections let go (answered, then closed after a linger).

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

"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import weakref
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE
from uvicorn.server import ServerState

from modelhost.errors import error_body
from modelhost.settings import Settings

log = logging.getLogger(__name__)


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
            judge = getattr(conn, "judge", None)  # a connection of `protocol.GatewayProtocol`
            if judge is not None:
                try:
                    judge(now, limits)
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


def reset(transport: asyncio.Transport) -> None:
    """Abort a connection with a reset, so that the kernel drops what it still holds for the
    client too (a plain abort closes the socket, and the kernel goes on sending its buffer)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
