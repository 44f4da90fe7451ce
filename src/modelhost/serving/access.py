"""The access log of the wire path's complete answers, written off the request path.

uvicorn writes an access line from inside each answer (`RequestResponseCycle.send`): a log
record made, filtered, formatted and written before the answer goes out, several times the
gateway's own cost of a relayed request. With `MODELHOST_ACCESS_LOG` on, the hot routes'
complete answers (`wire.HotCycle.answer`) are noted here instead (a tuple appended) and
written as uvicorn's own lines (`uvicorn.access`, the same format, with the request id and
the answer's time) a few times a second from a timer: the answer never waits for its line,
and a burst of requests costs one wake-up. (A line written later than one noted after it
keeps its own time: the file is in the order written.) Streams and every other route keep
uvicorn's line, written when the answer starts; a stream is the costly path already.

What is noted and not yet written when the process is killed outright (kill -9) is lost:
at most `FLUSH_SECONDS` of lines. A graceful stop writes them (`flush`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

FLUSH_SECONDS: Final = 0.25
# Past this many lines waiting, they are written at once (a bound on the memory they hold).
MAX_WAITING: Final = 10_000

Entry = tuple[float, tuple[str, int] | None, str, str, str, int, bytes]


class AccessBuffer:
    """Access lines noted by answers, written by a timer (module docstring)."""

    __slots__ = ("_handle", "_loop", "entries", "logger")

    def __init__(self, logger: logging.Logger, loop: asyncio.AbstractEventLoop) -> None:
        self.logger = logger
        self._loop = loop
        self.entries: list[Entry] = []
        self._handle: asyncio.TimerHandle | None = None

    def note(self, client: tuple[str, int] | None, method: str, path: str,
             http_version: str, status: int, request_id: bytes) -> None:
        """An answer went out (`client`: the scope's address and port, formatted later)."""
        entries = self.entries
        entries.append((time.time(), client, method, path, http_version, status,
                        request_id))
        if self._handle is None:
            self._handle = self._loop.call_later(FLUSH_SECONDS, self.flush)
        elif len(entries) >= MAX_WAITING:
            self.flush()

    def flush(self) -> None:
        """Write the lines noted so far."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        entries, self.entries = self.entries, []
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        for when, client, method, path, version, status, rid in entries:
            record = logger.makeRecord(
                logger.name, logging.INFO, __file__, 0, '%s - "%s %s HTTP/%s" %d',
                (f"{client[0]}:{client[1]}" if client else "-", method, path, version,
                 status), None, extra={"request_id": rid or None})
            # The answer's time, not the timer's.
            record.created, record.msecs = when, (when % 1) * 1000
            logger.handle(record)


def access_buffer(state: object, logger: logging.Logger,
                  loop: asyncio.AbstractEventLoop) -> AccessBuffer:
    """The server's one buffer (kept on its uvicorn `ServerState`)."""
    buffer: AccessBuffer | None = getattr(state, "access_buffer", None)
    if buffer is None:
        buffer = AccessBuffer(logger, loop)
        state.access_buffer = buffer  # type: ignore[attr-defined]
    return buffer
