"""The GPU scheduler (`modelhost.gpu.scheduler`) over a fake NVML: it measures the GPUs and
each loaded worker's memory, asks placement, and evicts idle models through their owners
(never a busy, starting or required one)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from modelhost.config import ModelSpec
from modelhost.gpu.inventory import GpuMonitor
from modelhost.gpu.placement import PlacementError
from modelhost.gpu.scheduler import Scheduler
from tests.test_gpu import FakeGpu, FakeNvml

GIB = 1024 ** 3


def spec(model_id: str, **fields: Any) -> ModelSpec:
    """A vLLM model wanting half of a GPU (12 GiB of 24), one GPU unless told."""
    return ModelSpec.model_validate({
        "id": model_id, "backend": "vllm", "source": {"hf": f"org/{model_id}"},
        "engine_args": {"gpu_memory_utilization": 0.5}, "gpu_count": 1, **fields})


@dataclass
class Tenant:
    """A model as the scheduler sees it; `evict` records the ask instead of unloading."""

    spec: ModelSpec
    gpus: list[int] = field(default_factory=list)
    pin: tuple[int, ...] | None = None
    weights: Path | None = None
    busy: bool = False
    starting: bool = False
    last_used: float = 0.0
    worker_pid: int | None = None
    evicted: bool = False

    @property
    def holds_gpus(self) -> bool:
        return bool(self.gpus) and not self.evicted

    async def evict(self) -> None:
        self.evicted = True


def scheduler(*tenants: Tenant) -> Scheduler:
    """Two 24 GiB GPUs, each 20 GiB used by one worker process (pids 101 and 102)."""
    gpus = [FakeGpu("NVIDIA A10", "GPU-a", 24 * GIB, 20 * GIB, processes=[(101, 20 * GIB)]),
            FakeGpu("NVIDIA A10", "GPU-b", 24 * GIB, 20 * GIB, processes=[(102, 20 * GIB)])]
    monitor = GpuMonitor(nvml=FakeNvml(gpus))
    assert monitor.start()
    return Scheduler(monitor, {t.spec.id: t for t in tenants})


def test_evicts_the_idle_model_and_never_a_busy_one() -> None:
    idle = Tenant(spec("idle"), gpus=[0], worker_pid=101, last_used=1.0)
    busy = Tenant(spec("busy"), gpus=[1], worker_pid=102, busy=True, last_used=0.0)
    new = Tenant(spec("new"))
    assert asyncio.run(scheduler(idle, busy, new).place(new)) == [0]
    assert idle.evicted and not busy.evicted


@pytest.mark.parametrize("blocker", [
    {"busy": True}, {"starting": True}, {"spec": spec("old", required=True)},
], ids=["busy", "starting", "required"])
def test_a_pinned_gpu_held_by_a_model_that_stays_is_refused(blocker: dict[str, Any]) -> None:
    old = Tenant(**{"spec": spec("old"), "gpus": [1], "worker_pid": 102, **blocker})
    new = Tenant(spec("new"), pin=(1,))
    with pytest.raises(PlacementError):
        asyncio.run(scheduler(old, new).place(new))
    assert not old.evicted


def test_the_pin_of_a_load_request_wins_over_the_spec() -> None:
    idle = Tenant(spec("idle"), gpus=[1], worker_pid=102)
    new = Tenant(spec("new", gpus=[0]), pin=(1,))
    assert asyncio.run(scheduler(idle, new).place(new)) == [1]
    assert idle.evicted


def test_no_gpu_wanted_is_the_cpu_without_measuring() -> None:
    monitor = GpuMonitor(nvml=FakeNvml([], init_error=9))  # no driver: never asked
    cpu = Tenant(ModelSpec.model_validate({"id": "cpu", "backend": "command",
                                           "command": ["serve", "{port}"]}))
    assert asyncio.run(Scheduler(monitor, {"cpu": cpu}).place(cpu)) == []
