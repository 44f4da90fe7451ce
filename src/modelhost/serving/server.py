"""The HTTP server: uvicorn's, with a drain before its shutdown.

**Graceful stop.** `GatewayServer` (uvicorn's server) takes SIGTERM or SIGINT as the start of a
drain: the app's `draining` flag is set at once (its gate then answers 503 to new requests,
`/ready` 503), connections are still accepted, and requests in flight, streams included,
may finish for `drain_timeout` seconds; then uvicorn's shutdown runs (the app's lifespan stops
the workers). A second signal ends the drain at once.
"""

from __future__ import annotations

import logging
import socket
import time
from types import FrameType

import uvicorn
from uvicorn.config import Config

from modelhost.serving.protocol import front_of, in_flight

log = logging.getLogger(__name__)


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

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        buffer = getattr(self.server_state, "access_buffer", None)
        if buffer is not None:  # the access lines noted last (`access.py`)
            buffer.flush()
