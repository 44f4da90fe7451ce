"""The GPU scheduler: which GPUs a worker about to start gets, and which idle models make room.

One per gateway (DESIGN §4), given the GPU monitor and the gateway's models, and handed to
each model, which asks it (`await scheduler.place(model)`) just before its worker starts.
It measures (NVML, `inventory`), describes what is loaded as `Resident`s (memory measured
over each worker's process group where NVML can attribute it, else estimated), asks the pure
`placement.place`, unloads the idle models the answer names (each through its own owner,
waiting until its worker is gone), and returns the GPUs.

The models are seen through `Tenant`, only what placement needs of one, so that this module
does not depend on the registry (which depends on it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from modelhost.config import ModelSpec
from modelhost.gpu.inventory import GpuMonitor, gpu_states
from modelhost.gpu.placement import Demand, Resident, estimate_bytes_per_gpu, place

log = logging.getLogger(__name__)


class Tenant(Protocol):
    """A model as the scheduler sees it (`registry.model.Model`)."""

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def weights(self) -> Path | None: ...

    @property
    def pin(self) -> tuple[int, ...] | None:
        """The GPUs a load request pinned (None: the spec's `gpus`, or any)."""

    @property
    def gpus(self) -> list[int]:
        """Where its worker runs now."""

    @property
    def holds_gpus(self) -> bool:
        """Its worker is on GPUs, starting or ready."""

    @property
    def starting(self) -> bool: ...

    @property
    def busy(self) -> bool:
        """Requests at its worker or queued for it."""

    @property
    def last_used(self) -> float: ...

    @property
    def worker_pid(self) -> int | None:
        """The worker's process group leader on this machine (None: none, or not local)."""

    async def evict(self) -> None:
        """Unload it to make room; return once its worker is gone."""


class Scheduler:
    def __init__(self, monitor: GpuMonitor, tenants: Mapping[str, Tenant]) -> None:
        self.monitor = monitor
        self.tenants = tenants  # the registry's models (a live view)

    async def place(self, tenant: Tenant) -> list[int]:
        """Choose the GPUs of a worker about to start: the pinned ones (a load request's
        `gpu_device_ids`, else the spec's `gpus`) or `gpu_count` GPUs with enough measured
        free memory, evicting idle models (least recently used first) to make room.
        `PlacementError` when it cannot be done."""
        spec = tenant.spec
        pinned = tenant.pin if tenant.pin is not None else \
            tuple(spec.gpus) if spec.gpus is not None else None
        count = len(pinned) if pinned is not None else spec.gpu_count
        if count == 0:
            return []
        monitor = self.monitor
        samples = await monitor.sample_now() if monitor.available else []
        states = gpu_states(samples)
        largest = max((g.memory_total for g in states), default=0)
        need = estimate_bytes_per_gpu(spec.backend.value, weights_bytes(tenant.weights),
                                      spec.engine_args, largest, count)
        placement = place(Demand(spec.id, pinned, count, need), states,
                          self._residents(exclude=tenant), monitor.unavailable_reason)
        for model_id in placement.evict:
            log.info("evicting idle model %s to make room for %s", model_id, spec.id)
            await self.tenants[model_id].evict()
        return list(placement.gpus)

    def _residents(self, exclude: Tenant) -> list[Resident]:
        residents = []
        for tenant in self.tenants.values():
            if tenant is exclude or not tenant.holds_gpus:
                continue
            spec = tenant.spec
            used: dict[int, int] = {}
            if tenant.worker_pid is not None:
                used = self.monitor.memory_used_by(_group_pids(tenant.worker_pid))
            # A required model is never evicted either: /ready depends on it.
            busy = tenant.busy or tenant.starting or spec.required
            per_gpu = max(used.values(), default=0) or estimate_bytes_per_gpu(
                spec.backend.value, weights_bytes(tenant.weights), spec.engine_args,
                0, len(tenant.gpus))
            residents.append(Resident(spec.id, tuple(tenant.gpus), per_gpu, busy,
                                      tenant.last_used))
        return residents


def weights_bytes(weights: Path | None) -> int:
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
