"""The registry: every model's runtime and admission, the idle reaper, start and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from modelhost.admission import Admission
from modelhost.catalog import Catalog
from modelhost.config import ModelSpec
from modelhost.errors import ModelNotFound
from modelhost.registry.lifecycle import State
from modelhost.registry.runtime import ModelRuntime, RuntimeContext

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, catalog: Catalog, ctx: RuntimeContext, *, lazy: bool = True,
                 reap_interval: float = 1.0) -> None:
        self.catalog = catalog
        self.lazy = lazy
        self.reap_interval = reap_interval
        self.runtimes: dict[str, ModelRuntime] = {
            s.id: ModelRuntime(s, ctx) for s in catalog.models}
        self.admissions = {s.id: Admission(s.id, s.max_concurrency, s.max_queue)
                           for s in catalog.models}
        self._reaper: asyncio.Task[None] | None = None

    def resolve(self, name: str) -> ModelSpec:
        spec = self.catalog.get(name)
        if spec is None:
            raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        return spec

    def runtime(self, name: str) -> ModelRuntime:
        return self.runtimes[self.resolve(name).id]

    async def start(self) -> None:
        await asyncio.gather(*(rt.start() for rt in self.runtimes.values()))
        for rt in self.runtimes.values():
            if rt.spec.required or not self.lazy:
                rt.want_ready()
        self._reaper = asyncio.create_task(self._reap(), name="idle-reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(rt.close() for rt in self.runtimes.values()))

    def not_ready_required(self) -> list[str]:
        return [rt.spec.id for rt in self.runtimes.values()
                if rt.spec.required and rt.state is not State.ready]

    async def _reap(self) -> None:
        """Unload models idle for longer than their idle_ttl; never a busy one."""
        while True:
            await asyncio.sleep(self.reap_interval)
            now = time.monotonic()
            for rt in self.runtimes.values():
                ttl = rt.spec.idle_ttl
                if ttl <= 0 or rt.spec.required or rt.state is not State.ready:
                    continue
                busy = self.admissions[rt.spec.id]
                if busy.active or busy.waiting:
                    continue
                if now - rt.last_used > ttl:
                    log.info("model %s idle for %.0f s: unloading", rt.spec.id, now - rt.last_used)
                    rt.unload()
