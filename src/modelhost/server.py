"""uvicorn, tuned for a relay: every answer's head and body leave in one write.

uvicorn writes a response's status line and headers when the app sends `http.response.start`,
and the body in a second write when it sends `http.response.body`. For a small JSON answer that
is two system calls where one would do, and a client that wakes twice to read one answer (about
50 µs at p50 on the benchmark's machine, for a relay whose whole budget is 500 µs).
`GatewayProtocol` is uvicorn's httptools protocol with its transport behind `CoalescingWriter`:
a write is held until the next write (sent together) or the end of the current event-loop
iteration (sent alone), whichever comes first. Nothing waits longer than that: the first event of
a stream, which may be followed by nothing for seconds, still leaves in the same iteration.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a `CoalescingWriter`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.transport = CoalescingWriter(self.transport, self.loop)  # type: ignore[assignment]
