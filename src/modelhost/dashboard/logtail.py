"""A worker's log file followed while a dashboard page shows it.

The worker's output goes to `workers/launchers.py:worker_log` (`<log dir>/workers/<model>.log`),
which rotates past its size limit. `tail` gives its last `START_BYTES`, then what is appended,
polled every `POLL_SECONDS` while the caller reads (a page's event stream is open); a file
that shrank or was replaced (rotation) is read again from its start.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

START_BYTES = 16 * 1024
CHUNK_BYTES = 64 * 1024
POLL_SECONDS = 1.0


async def tail(path: Path, poll: float = POLL_SECONDS) -> AsyncIterator[str]:
    offset: int | None = None
    inode: int | None = None
    while True:
        try:
            stat = os.stat(path)
        except OSError:
            stat = None
        if stat is not None:
            if offset is None:
                offset = max(0, stat.st_size - START_BYTES)
            elif stat.st_ino != inode or stat.st_size < offset:
                offset = 0  # rotated: the new file from its start
            inode = stat.st_ino
            if stat.st_size > offset:
                data = await asyncio.to_thread(_read, path, offset, CHUNK_BYTES)
                offset += len(data)
                text = data.decode("utf-8", "replace")
                if text:
                    yield text
                    continue  # more may be waiting: read again before sleeping
        elif offset is None:
            offset = 0
        await asyncio.sleep(poll)


def _read(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)
