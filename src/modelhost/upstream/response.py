"""An answer from a worker as it arrives: `UpstreamResponse`, and `Listener` for one followed
without a task.

Responses are parsed by httptools (llhttp, the parser uvicorn uses) as bytes arrive, in the
connection's callbacks (`connection._Connection`), which feed the answer here. A body read
whole (`read()`, or a `Listener`: a non-streamed answer) is collected as the pieces it
arrives in and joined once at the end, up to a cap past which the exchange fails
(`AnswerTooLarge`) and its connection is aborted; a body read as it arrives (`chunks()`: a
stream) is never buffered beyond a high-water mark: reading from the worker pauses while the
client is slower than the worker.

`close()` on a response aborts its connection, which is how a worker learns that the client
went away (it stops generating).
"""

from __future__ import annotations

import asyncio
import collections
import math
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from modelhost.upstream.errors import AnswerTooLarge, UpstreamClosed

HIGH_WATER = 256 * 1024  # buffered answer bytes past which reading from the worker pauses
LOW_WATER = 64 * 1024


class _Recycler(Protocol):
    def put(self, conn: Any) -> None: ...


class _Link(Protocol):
    """What an answer needs of the connection it arrives on (`connection._Connection`, which
    imports this module: said here as a protocol, so that the two modules form no circle)."""

    response: UpstreamResponse | None

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def pool(self) -> _Recycler: ...
    @property
    def closed(self) -> bool: ...
    @property
    def reading_paused(self) -> bool: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def abort(self) -> None: ...


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

    def __init__(self, conn: _Link) -> None:
        self._conn: _Link | None = conn
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

