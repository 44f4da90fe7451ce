"""What the gateway remembers across restarts (DESIGN §5), kept in the state database.

* Specs: the models file's and the built-in models are recorded (actor `config-file`); models
  added or changed through the admin API (source `api`) are restored at start. An id declared
  in the models file belongs to the file (the API refuses to change it, and a file that
  comes to declare an API model's id takes it over). Every change is a new revision.
* Desired states: a model that starts is recorded `loaded` (with the GPUs asked for), one
  that is unloaded (admin or idle TTL) `unloaded`; a shutdown changes nothing. At start,
  models recorded `loaded` are loaded again.

Database calls are synchronous and short; they run in a thread, in order, from one writer
task, so the event loop never waits on the disk and writes never reorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from modelhost.config import ModelSpec
from modelhost.db.store import Store

log = logging.getLogger(__name__)


class Persistence:
    def __init__(self, url: str) -> None:
        self.url = url
        self.store: Store | None = None
        self._queue: asyncio.Queue[Callable[[Store], Any]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    async def open(self) -> Store:
        store = await asyncio.to_thread(Store.open, self.url)
        await asyncio.to_thread(store.migrate)
        self.store = store
        self._writer = asyncio.create_task(self._write_loop(), name="db-writer")
        return store

    async def close(self) -> None:
        if self._writer is not None:
            await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self.store is not None:
            self.store.close()

    def later(self, write: Callable[[Store], Any]) -> None:
        """Queue a write; it runs after every write queued before it."""
        self._queue.put_nowait(write)

    async def now(self, call: Callable[[Store], Any]) -> Any:
        """Run a call after the queued writes, and return its result."""
        assert self.store is not None
        await self._queue.join()
        return await asyncio.to_thread(call, self.store)

    async def _write_loop(self) -> None:
        assert self.store is not None
        while True:
            write = await self._queue.get()
            try:
                await asyncio.to_thread(write, self.store)
            except Exception:  # a failed write is logged; the gateway keeps serving
                log.exception("state database write failed")
            finally:
                self._queue.task_done()

    async def record_specs(self, specs: list[ModelSpec], actor: str, source: str) -> None:
        def write(store: Store) -> None:
            for spec in specs:
                store.upsert_model(spec_json(spec), spec.id, source=source, actor=actor)

        await self.now(write)

    async def api_specs(self) -> list[ModelSpec]:
        """Models added or changed through the admin API, still valid with this version."""
        rows = await self.now(lambda store: store.models())
        specs = []
        for row in rows:
            if row.source != "api":
                continue
            try:
                specs.append(ModelSpec.model_validate_json(row.spec_json))
            except ValidationError as exc:
                log.error("stored spec of model %s is no longer valid, skipped: %s",
                          row.model_id, exc)
        return specs


def spec_json(spec: ModelSpec) -> str:
    return json.dumps(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=True)
