"""`UpstreamClient`: the gateway's HTTP/1.1 client to its workers and to remote servers.

What it adds to its connections (connection.py) and answers (response.py):

- timeouts: connecting (`connection.CONNECT_TIMEOUT`, 10 s); silence from the worker
  (`idle_timeout`, 600 s without a byte by default: a long generation is legitimate; a worker
  that says nothing at all is not); and an overall deadline per exchange (`request_timeout`,
  which a stream's relay lifts). All are checked by one timer for all connections (`_sweep`),
  not one per request, which also asks an exchange followed without a task whether its client
  is still there (`abandoned`);
- a pooled connection the worker closed just as a request went out is retried once on a new
  connection, if not a byte of the answer had arrived;
- two ways to send: `request()` awaits the answer's head; `start()` sends on an idle pooled
  connection at once and follows the answer with a `Listener`, without a task (the fast path
  of a non-streamed answer);
- `get_status()`: a readiness probe's GET, for the gateway's own calls (a worker starting, a
  remote server checked), so that they need no other HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Mapping

from modelhost.upstream.connection import _connect, _head, _origin, _Pool, _send
from modelhost.upstream.errors import Abandoned, AnswerTooLarge, UpstreamTimeout
from modelhost.upstream.multipart import Body, _length
from modelhost.upstream.response import Listener, UpstreamResponse

IDLE_TIMEOUT = 600.0  # seconds of silence from the worker while an answer is awaited
REQUEST_TIMEOUT = 900.0  # seconds an exchange may take in all (unless lifted: a stream)
PROBE_BODY = 1024 * 1024  # bytes of a probe's answer read (to reuse its connection)


class UpstreamClient:
    """Pooled HTTP/1.1 connections to the workers (and remote servers)."""

    def __init__(self, idle_timeout: float = IDLE_TIMEOUT,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self._pools: dict[str, _Pool] = {}
        self._heads: dict[tuple[_Pool, str, str, tuple[tuple[str, str], ...]], bytes] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(self, base: str, method: str, path: str, headers: Mapping[str, str],
                      body: Body = b"", connect_to: tuple[str, ...] | None = None,
                      abandoned: Callable[[], bool] | None = None, extra: bytes = b""
                      ) -> UpstreamResponse:
        """Send a request to `base` (a URL with an optional path prefix) + `path` and return
        once the answer's status and headers are in. `connect_to`: the addresses new
        connections go to (tried in order) instead of resolving the URL's host again
        (addresses checked when the model was loaded, against DNS rebinding); Host and TLS
        keep the name. `extra`: header lines (each ending in CRLF) that differ from request
        to request (a request id), added to the cached head."""
        pool = self._pools.get(base)
        if pool is None:
            pool = self._pools[base] = _Pool(_origin(base))
        if connect_to != pool.connect_to:
            pool.close()  # connections to the address checked before are not reused
            pool.connect_to = connect_to
        loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)
        head = self._head(pool, method, path, headers, _length(body), extra)
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
              body: bytes, listener: Listener, limit: int = 0, extra: bytes = b""
              ) -> UpstreamResponse | None:
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
        conn.transport.write(self._head(pool, method, path, headers, len(body), extra) + body)
        return resp

    async def get_status(self, base: str, path: str, headers: Mapping[str, str] | None = None,
                         timeout: float = 5.0, connect_to: tuple[str, ...] | None = None
                         ) -> int:
        """The status of `GET base + path` within `timeout` seconds in all (connecting, the
        head and the body): a readiness probe. A redirect is not followed (its 3xx is the
        answer). The body is read and dropped, so the connection goes back to the pool; one
        past `PROBE_BODY` bytes is not read (its connection is closed), the status stands.
        Every failure is an `OSError`, a timeout a `TimeoutError`, as with `request()`."""
        async with asyncio.timeout(timeout):
            resp = await self.request(base, "GET", path, headers or {}, connect_to=connect_to)
            with contextlib.suppress(AnswerTooLarge):  # its connection closed: status stands
                await resp.read(PROBE_BODY)  # released or closed, whatever happens
        return resp.status

    def _head(self, pool: _Pool, method: str, path: str, headers: Mapping[str, str],
              length: int, extra: bytes = b"") -> bytes:
        """The request's head (status line and headers), cached per origin (its Host and
        path prefix), method, path and headers, with its Content-Length and `extra`."""
        key = (pool, method, path, tuple(headers.items()))
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) > 1024:
                self._heads.clear()
            head = self._heads[key] = _head(method, pool.origin, path, headers)
        return head + b"%d\r\n%s\r\n" % (length, extra)

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
        self._heads.clear()


