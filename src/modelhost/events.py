"""A small in-process event bus: lifecycle changes and download progress, fanned out to the
admin API's server-sent-events stream. Slow subscribers lose events, never block the
publisher (each has a bounded queue; when it is full the oldest event is dropped)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

QUEUE_SIZE = 256


class EventBus:
    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()
        # Applied to every event's data before it is fanned out: the gateway sets it to remove
        # secrets (URL credentials, keys, env values) from errors and worker output.
        self.scrub: Callable[[Any], Any] | None = None

    def publish(self, kind: str, **data: Any) -> None:
        if not self._queues:
            return
        if self.scrub is not None:
            data = self.scrub(data)
        event = {"type": kind, "time": time.time(), **data}
        for queue in self._queues:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._queues)
