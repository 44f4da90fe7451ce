"""The registry: every model (its owner, `model.Model`), the idle reaper, start and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path

from modelhost.catalog import Catalog
from modelhost.config import ModelSpec
from modelhost.errors import ModelNotFound
from modelhost.gpu.inventory import GpuMonitor, gpu_states
from modelhost.gpu.placement import Demand, Resident, estimate_bytes_per_gpu, place
from modelhost.registry.lifecycle import State
from modelhost.registry.model import Listener, Model, ModelContext, Target

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, catalog: Catalog, ctx: ModelContext, *, lazy: bool = True,
                 reap_interval: float = 1.0, gpus: GpuMonitor | None = None) -> None:
        self.gpus = gpus if gpus is not None else GpuMonitor()
        ctx = dataclasses.replace(ctx, place=self.place)
        self.catalog = catalog
        self.lazy = lazy
        self.reap_interval = reap_interval
        self.ctx = ctx
        self.listeners: list[Listener] = []
        self.models: dict[str, Model] = {}
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
        self.models = {s.id: Model(s, self.ctx) for s in self.catalog.models}
        for rt in self.models.values():
            rt.listeners.extend(self.listeners)

    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)
        for rt in self.models.values():
            rt.listeners.append(listener)

    async def place(self, rt: Model) -> list[int]:
        """Choose the GPUs of a worker about to start: the pinned ones (a load request's
        `gpu_device_ids`, else the spec's `gpus`) or `gpu_count` GPUs with enough measured
        free memory, evicting idle models (least recently used first) to make room."""
        spec = rt.spec
        pinned = rt.gpu_override if rt.gpu_override is not None else spec.gpus
        count = len(pinned) if pinned is not None else spec.gpu_count
        if count == 0:
            return []
        samples = await self.gpus.sample_now() if self.gpus.available else []
        states = gpu_states(samples)
        largest = max((g.memory_total for g in states), default=0)
        need = estimate_bytes_per_gpu(spec.backend.value, _weights_bytes(rt.weights),
                                      spec.engine_args, largest, count)
        placement = place(Demand(spec.id, tuple(pinned) if pinned is not None else None,
                                 count, need),
                          states, self._residents(exclude=rt), self.gpus.unavailable_reason)
        for model_id in placement.evict:
            victim = self.models[model_id]
            log.info("evicting idle model %s to make room for %s", model_id, spec.id)
            victim.unload()
            await victim.wait_for({State.cached, State.failed, State.absent})
        return list(placement.gpus)

    def _residents(self, exclude: Model) -> list[Resident]:
        residents = []
        for rt in self.models.values():
            if rt is exclude or not rt.gpus or rt.state not in (State.ready, State.starting):
                continue
            used: dict[int, int] = {}
            if rt.worker is not None and rt.worker.pid is not None:
                used = self.gpus.memory_used_by(_group_pids(rt.worker.pid))
            # A required model is never evicted either: /ready depends on it.
            busy = rt.busy or \
                rt.state is State.starting or rt.spec.required
            per_gpu = max(used.values(), default=0) or estimate_bytes_per_gpu(
                rt.spec.backend.value, _weights_bytes(rt.weights), rt.spec.engine_args,
                0, len(rt.gpus))
            residents.append(Resident(rt.spec.id, tuple(rt.gpus), per_gpu, busy,
                                      rt.last_used))
        return residents

    async def start(self) -> None:
        self.gpus.start()
        self.gpus.start_sampling()
        await asyncio.gather(*(rt.start() for rt in self.models.values()))
        for rt in self.models.values():
            if rt.spec.required or not self.lazy:
                rt.want_ready()
        self._reaper = asyncio.create_task(self._reap(), name="idle-reaper")

    async def put(self, spec: ModelSpec) -> Model:
        """Add a model, or replace one (its worker, if any, is stopped; a model that was
        wanted ready loads again with the new spec)."""
        self.catalog.put(spec)  # raises ValueError when a name clashes
        old = self.models.get(spec.id)
        reload = old is not None and old.target is Target.ready
        if old is not None:
            await old.close()
        rt = Model(spec, self.ctx)
        rt.listeners.extend(self.listeners)
        self.models[spec.id] = rt
        await rt.start()
        if reload or spec.required:
            rt.want(Target.ready)
        return rt

    async def remove(self, model_id: str) -> None:
        rt = self.models.pop(model_id)
        self.catalog.remove(model_id)
        await rt.close()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(rt.close() for rt in self.models.values()))
        await self.gpus.stop()

    def not_ready_required(self) -> list[str]:
        return [rt.spec.id for rt in self.models.values()
                if rt.spec.required and rt.state is not State.ready]

    async def _reap(self) -> None:
        """Unload models idle for longer than their idle_ttl; never a busy one."""
        while True:
            await asyncio.sleep(self.reap_interval)
            now = time.monotonic()
            for rt in self.models.values():
                ttl = rt.spec.idle_ttl
                if ttl <= 0 or rt.spec.required or rt.state is not State.ready:
                    continue
                if rt.busy:
                    continue
                if now - rt.last_used > ttl:
                    log.info("model %s idle for %.0f s: unloading", rt.spec.id, now - rt.last_used)
                    rt.unload()


def _weights_bytes(weights: Path | None) -> int:
    if weights is None:
        return 0
    if weights.is_file():
        return weights.stat().st_size
    return sum(p.stat().st_size for p in weights.rglob("*") if p.is_file())


def _group_pids(pgid: int) -> set[int]:
    """The processes of a worker's process group (the shim, the engine, its children)."""
    pids = {pgid}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                    if int(stat[2]) == pgid:
                        pids.add(int(entry))
    return pids
