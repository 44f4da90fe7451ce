"""The registry: every model (its owner, `model.Model`), the GPU scheduler they share, the
idle reaper, start and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from modelhost.catalog import Catalog
from modelhost.config import ModelSpec
from modelhost.errors import ModelNotFound
from modelhost.gpu.inventory import GpuMonitor
from modelhost.gpu.scheduler import Scheduler
from modelhost.registry.lifecycle import State
from modelhost.registry.model import Listener, Model, ModelContext, Target

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, catalog: Catalog, ctx: ModelContext, *, lazy: bool = True,
                 reap_interval: float = 1.0, gpus: GpuMonitor | None = None) -> None:
        self.gpus = gpus if gpus is not None else GpuMonitor()
        self.catalog = catalog
        self.lazy = lazy
        self.reap_interval = reap_interval
        self.ctx = ctx
        self.listeners: list[Listener] = []
        self.models: dict[str, Model] = {}
        # Placement and evictions, over these models (the same dict, kept up to date).
        self.scheduler = Scheduler(self.gpus, self.models)
        self.rebuild()
        self._reaper: asyncio.Task[None] | None = None

    def resolve(self, name: str) -> ModelSpec:
        spec = self.catalog.get(name)
        if spec is None:
            raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        return spec

    def model(self, name: str) -> Model:
        return self.models[self.resolve(name).id]

    def rebuild(self) -> None:
        """Make a `Model` for every model of the catalog (before `start`)."""
        self.models.clear()
        self.models.update({s.id: self._new(s) for s in self.catalog.models})

    def _new(self, spec: ModelSpec) -> Model:
        model = Model(spec, self.ctx, self.scheduler)
        model.listeners.extend(self.listeners)
        return model

    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)
        for model in self.models.values():
            model.listeners.append(listener)

    async def start(self) -> None:
        self.gpus.start()
        self.gpus.start_sampling()
        await asyncio.gather(*(model.start() for model in self.models.values()))
        for model in self.models.values():
            if model.spec.required or not self.lazy:
                model.want(Target.ready)
        self._reaper = asyncio.create_task(self._reap(), name="idle-reaper")

    async def put(self, spec: ModelSpec) -> Model:
        """Add a model, or replace one (its worker, if any, is stopped; a model that was
        wanted ready loads again with the new spec)."""
        self.catalog.put(spec)  # raises ValueError when a name clashes
        old = self.models.get(spec.id)
        reload = old is not None and old.target is Target.ready
        if old is not None:
            await old.close()
        model = self._new(spec)
        self.models[spec.id] = model
        await model.start()
        if reload or spec.required:
            model.want(Target.ready)
        return model

    async def remove(self, model_id: str) -> None:
        model = self.models.pop(model_id)
        self.catalog.remove(model_id)
        await model.close()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(model.close() for model in self.models.values()))
        await self.gpus.stop()

    def not_ready_required(self) -> list[str]:
        return [model.spec.id for model in self.models.values()
                if model.spec.required and model.state is not State.ready]

    async def _reap(self) -> None:
        """Unload models idle for longer than their idle_ttl; never a busy one."""
        while True:
            await asyncio.sleep(self.reap_interval)
            now = time.monotonic()
            for model in self.models.values():
                ttl = model.spec.idle_ttl
                if ttl <= 0 or model.spec.required or model.state is not State.ready:
                    continue
                if model.busy:
                    continue
                if now - model.last_used > ttl:
                    log.info("model %s idle for %.0f s: unloading", model.spec.id,
                             now - model.last_used)
                    model.want(Target.stopped)
