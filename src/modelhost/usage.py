"""Usage by key and model: counted in memory per request, written to the state database once
a second.

A relayed call that ends adds what it used to the `Ledger` (`add`: a dict lookup and five
additions, no lock, no task, no write): one request, the prompt and completion tokens its
answer reported, the audio seconds a speech worker reported, the inputs of an embeddings
request. Counts are kept per (key id, model, hour). Once a second (and at shutdown) what
accumulated is handed whole to the state database's writer (`Persistence.later`), which adds
it to the ``usage`` table in one transaction (``db/usage.py``); a write that fails is kept
for the next. A restart loses at most the last second's counts, and a gateway killed
outright (kill -9) the same.

A key is named by its id (`auth.key_id`, through `KeyGuard.actor`: ``anonymous`` when no
key is configured or sent), never by the key itself. The id of an Authorization value is
computed once and cached: only keys the gate accepted reach a call, so the cache holds at
most one entry per configured key (it is cleared past `MAX_KEYS`, in case).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Final

from modelhost.db.store import Store
from modelhost.db.usage import Counts
from modelhost.persistence import Persistence

log = logging.getLogger(__name__)

FLUSH_SECONDS: Final = 1.0
MAX_KEYS: Final = 4096
ANONYMOUS: Final = "anonymous"

Key = tuple[str, str, int]


class Ledger:
    """Usage counted in memory, flushed to the state database (module docstring)."""

    __slots__ = ("_actor", "_counts", "_ids", "_persistence", "_task")

    def __init__(self, actor: Callable[[bytes | None], str] | None = None,
                 persistence: Persistence | None = None) -> None:
        self._actor = actor
        self._persistence = persistence
        self._counts: dict[Key, Counts] = {}
        self._ids: dict[bytes, str] = {}
        self._task: asyncio.Task[None] | None = None

    def who(self, authorization: bytes | None) -> str:
        """The key id of an Authorization header's value (cached)."""
        if authorization is None or self._actor is None:
            return ANONYMOUS
        ids = self._ids
        found = ids.get(authorization)
        if found is None:
            if len(ids) >= MAX_KEYS:
                ids.clear()
            found = ids[authorization] = self._actor(authorization)
        return found

    def add(self, key: str, model: str, prompt: int = 0, completion: int = 0,
            audio: float = 0.0, inputs: int = 0) -> None:
        """One request of `key` (id) to `model`, and what it used."""
        bucket = (key, model, int(time.time()) // 3600)
        counts = self._counts.get(bucket)
        if counts is None:
            self._counts[bucket] = [1, prompt, completion, audio, inputs]
            return
        counts[0] += 1
        counts[1] += prompt
        counts[2] += completion
        counts[3] += audio
        counts[4] += inputs

    def take(self) -> dict[Key, Counts]:
        """What was counted since the last take (and forget it)."""
        counts, self._counts = self._counts, {}
        return counts

    def flush(self) -> None:
        """Queue what was counted for the state database's writer."""
        persistence = self._persistence
        if not self._counts or persistence is None or persistence.store is None:
            return
        counts = self.take()
        loop = asyncio.get_running_loop()

        def write(store: Store) -> None:
            try:
                store.add_usage(counts)
            except Exception:  # kept for the next flush (and logged by the writer)
                loop.call_soon_threadsafe(self._merge, counts)
                raise

        persistence.later(write)

    def _merge(self, counts: dict[Key, Counts]) -> None:
        for bucket, values in counts.items():
            mine = self._counts.setdefault(bucket, [0, 0, 0, 0.0, 0])
            for i, value in enumerate(values):
                mine[i] += value

    def start(self) -> None:
        """Flush once a second from now on (one task for the gateway)."""
        if self._task is None and self._persistence is not None:
            self._task = asyncio.create_task(self._run(), name="usage-flush")

    async def stop(self) -> None:
        """Stop flushing once a second, and flush what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                self.flush()
            except Exception:  # never stop counting
                log.exception("usage flush failed")
