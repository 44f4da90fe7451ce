"""The registry: every model (its owner, `model.Model`), the GPU scheduler they share, the
idle reaper, start and shutdown.

A blue-green update (`rollout`) runs a second version of a model beside the one that serves:
the versions out of service (`extras`: the new one on trial, the old one standing by) are
seen by GPU placement like any worker, and `switch` makes one of them the served one, in one
step with the catalog, so that a request resolves either the old version or the new one,
never a mix.

Several gateways sharing a PostgreSQL database (`shared`: `cluster.lifecycle`) unload a
model together: an unload asked here (`unloading`, before the model is told to stop) is
announced to the others, and the idle reaper unloads a model only once no gateway has used
it for its `idle_ttl`. Alone (SQLite), `shared` is None and none of this runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Protocol

from modelhost.catalog import Catalog
from modelhost.config import ModelSpec
from modelhost.errors import ModelNotFound
from modelhost.gpu.inventory import GpuMonitor
from modelhost.gpu.scheduler import Scheduler, Tenant
from modelhost.registry.lifecycle import State
from modelhost.registry.model import Listener, Model, ModelContext, Target
from modelhost.registry.tenants import seen_by

log = logging.getLogger(__name__)


class Shared(Protocol):
    """What gateways sharing a database do together (`cluster.lifecycle.SharedLifecycle`)."""

    async def unloading(self, model: Model) -> None:
        """The model is about to be unloaded here: every other gateway unloads it too."""

    async def tick(self, models: Iterable[Model]) -> None:
        """Every `reap_interval`: record which models this gateway used."""

    async def idle(self, model: Model, ttl: float) -> bool:
        """Whether no gateway used the model for `ttl` seconds."""

    async def close(self) -> None: ...


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
        # The versions a rollout runs beside the served ones (not served, never evicted).
        self.extras: list[Model] = []
        # Placement and evictions, over every version (`VersionScheduler`).
        self.scheduler: Scheduler = VersionScheduler(self)
        self.rebuild()
        self._reaper: asyncio.Task[None] | None = None
        self.shared: Shared | None = None

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

    def _new(self, spec: ModelSpec, listening: bool = True) -> Model:
        model = Model(spec, self.ctx, self.scheduler)
        if listening:
            model.listeners.extend(self.listeners)
        return model

    def version(self, spec: ModelSpec) -> Model:
        """A version of a model beside the served one (a rollout's): seen by placement, not
        served, nobody listening to it until it is switched in. Start it."""
        model = self._new(spec, listening=False)
        self.extras.append(model)
        return model

    def switch(self, model: Model) -> Model | None:
        """Serve `model` (a version in `extras`) under its id and names, at once: the catalog
        and the served models change in the same step. Returns the version it replaces, now
        in `extras` (its requests in flight go on), or None."""
        spec = model.spec
        self.catalog.put(spec)  # raises ValueError when a name clashes: nothing changed
        old = self.models.get(spec.id)
        self.extras.remove(model)
        if old is not None:
            old.listeners = []  # its later states are no longer the model's
            self.extras.append(old)
        model.listeners = list(self.listeners)
        self.models[spec.id] = model
        return old

    async def drop(self, model: Model) -> None:
        """Stop a version out of service (its owner, then its worker) and forget it."""
        model.listeners = []
        await model.close()
        if model in self.extras:
            self.extras.remove(model)

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

    async def unloading(self, model: Model) -> None:
        """An unload was asked for (admin API, idle reaper): with other gateways, tell them
        first, so that each one stops the model and none takes it over."""
        if self.shared is not None:
            await self.shared.unloading(model)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self.shared is not None:
            await self.shared.close()
        await asyncio.gather(*(model.close() for model in [*self.models.values(),
                                                           *self.extras]))
        await self.gpus.stop()

    def not_ready_required(self) -> list[str]:
        return [model.spec.id for model in self.models.values()
                if model.spec.required and model.state is not State.ready]

    async def _reap(self) -> None:
        """Unload models idle for longer than their idle_ttl; never a busy one (nor, with
        other gateways, one that another gateway used within its idle_ttl)."""
        while True:
            await asyncio.sleep(self.reap_interval)
            shared = self.shared
            if shared is not None:
                await shared.tick(self.models.values())
            now = time.monotonic()
            for model in list(self.models.values()):
                ttl = model.spec.idle_ttl
                if ttl <= 0 or model.spec.required or model.state is not State.ready:
                    continue
                if model.busy or now - model.last_used <= ttl:
                    continue
                if shared is not None and not await shared.idle(model, ttl):
                    continue  # used through another gateway
                if model.state is not State.ready or model.busy or \
                        time.monotonic() - model.last_used <= ttl:
                    continue  # used or changed meanwhile
                log.info("model %s idle for %.0f s: unloading", model.spec.id,
                         now - model.last_used)
                await self.unloading(model)
                model.want(Target.stopped)


class VersionScheduler(Scheduler):
    """The registry's scheduler: placement sees every worker, a rollout's versions and the
    models' extra replicas included.

    Placement knows a model by its id, and two versions of one model share it: each place
    is asked over the models as the one placed sees them (`tenants.seen_by`: the other
    versions renamed)."""

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry.gpus, registry.models)
        self.registry = registry

    async def place(self, tenant: Tenant) -> list[int]:
        models = [*self.registry.models.values(), *self.registry.extras]
        # A model's extra replicas hold GPUs of their own (`registry.replicas`); placing one
        # never evicts the model it is a replica of.
        replicas = [r for m in models if m.replicas is not None for r in m.replicas.extra]
        kept = next((m for m in models if m.replicas is not None and any(
            r is tenant for r in m.replicas.extra)), None)
        seen = seen_by(tenant, [*models, *replicas], kept=kept)
        return await Scheduler(self.monitor, seen).place(tenant)
