"""Per-model admission: at most `max_concurrency` requests at the worker, a bounded queue."""

from __future__ import annotations

import asyncio

from modelhost.errors import Overloaded


class Admission:
    def __init__(self, model_id: str, limit: int, max_queue: int) -> None:
        self.model_id = model_id
        self.limit = limit
        self.max_queue = max_queue
        self.active = 0
        self.waiting = 0
        self._sem = asyncio.Semaphore(limit)

    async def acquire(self) -> None:
        """Take a slot, queueing if all are busy; 429 when the queue is full.

        Every successful acquire must be matched by exactly one `release`.
        """
        if self._sem.locked():
            if self.waiting >= self.max_queue:
                raise Overloaded(
                    f"model '{self.model_id}' has {self.waiting} requests waiting "
                    f"(max_queue {self.max_queue}); retry later", retry_after=1)
            self.waiting += 1
            try:
                await self._sem.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._sem.acquire()
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._sem.release()
