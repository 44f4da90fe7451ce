"""Per-model admission: at most `max_concurrency` requests at the worker, a bounded queue."""

from __future__ import annotations

import asyncio
import collections

from modelhost.errors import Overloaded


class Admission:
    """Slots for one model's worker. A released slot goes to the longest-waiting request
    (first come, first served); a new request never overtakes one that is queued."""

    def __init__(self, model_id: str, limit: int, max_queue: int) -> None:
        self.model_id = model_id
        self.limit = limit
        self.max_queue = max_queue
        self.active = 0
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def try_acquire(self) -> bool:
        """Take a slot if one is free now (and nobody is queued for it); never waits."""
        if self.active < self.limit and not self._queue:
            self.active += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, queueing if all are busy; 429 when the queue is full.

        Every successful acquire must be matched by exactly one `release`.
        """
        if self.try_acquire():
            return
        if len(self._queue) >= self.max_queue:
            raise Overloaded(
                f"model '{self.model_id}' has {len(self._queue)} requests waiting "
                f"(max_queue {self.max_queue}); retry later", retry_after=1)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            await waiter  # `release` hands its slot over: `active` already counts us
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot in the same instant we were cancelled
            elif waiter in self._queue:
                self._queue.remove(waiter)
            raise

    def release(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1
