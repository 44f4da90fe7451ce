"""`replicas: N` of a model that wants a GPU: each local replica is placed on GPUs of its own.

In-process, over the NVML stand-in of tests/test_gpu.py whose GPUs' used memory grows by
600 MiB for each worker that holds them now (the model's own worker and its replicas, as
placement sees them): two 1 GiB GPUs have room for one worker each. The workers are real
processes (the fake worker of tests/fake_worker.py); which GPU each was given is read from
its own environment (`CUDA_VISIBLE_DEVICES`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from modelhost.catalog import Catalog
from modelhost.config import ModelSpec
from modelhost.gpu.inventory import GpuMonitor
from modelhost.registry.model import ModelContext
from modelhost.registry.registry import Registry
from tests.conftest import fake_model
from tests.test_gpu import FakeGpu, FakeNvml

MIB = 1024 ** 2
GIB = 1024 ** 3
PER_WORKER = 600 * MIB


class HeldNvml(FakeNvml):
    """Each GPU's used memory: its own `used`, plus `PER_WORKER` for every worker holding it
    (read from the registry: models, versions and replicas)."""

    def __init__(self, gpus: list[FakeGpu]) -> None:
        super().__init__(gpus)
        self.registry: Registry | None = None

    def holders(self, index: int) -> int:
        registry = self.registry
        if registry is None:
            return 0
        models = [*registry.models.values(), *registry.extras]
        tenants: list[Any] = [*models, *(r for m in models if m.replicas is not None
                                         for r in m.replicas.extra)]
        return sum(1 for t in tenants if t.holds_gpus and index in t.gpus)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        used = handle.used + self.holders(self.gpus.index(handle)) * PER_WORKER
        return SimpleNamespace(total=handle.total, used=used, free=handle.total - used)


async def _no_download(*args: Any) -> Path:
    raise AssertionError("nothing to download")


def registry_over(tmp: Path, gpus: int, spec: ModelSpec) -> Registry:
    ctx = ModelContext(cache_dir=tmp / "cache", log_dir=tmp / "logs", stop_timeout=5,
                       download=_no_download)
    nvml = HeldNvml([FakeGpu("NVIDIA A10", f"GPU-{i}", GIB, 200 * MIB) for i in range(gpus)])
    registry = Registry(Catalog([spec]), ctx, gpus=GpuMonitor(nvml=nvml))
    nvml.registry = registry
    return registry


def visible_devices(pid: int) -> str | None:
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"CUDA_VISIBLE_DEVICES="):
            return item.split(b"=", 1)[1].decode()
    return None


async def settle(registry: Registry, model_id: str, states: set[str], timeout: float
                 ) -> dict[int, dict[str, Any]]:
    """The model's replica cards once every extra replica is in one of `states`."""
    model = registry.models[model_id]
    assert model.replicas is not None
    deadline = time.monotonic() + timeout
    while True:
        cards = {r.index: r.card() for r in model.replicas.extra}
        if all(card["state"] in states for card in cards.values()):
            return cards
        assert time.monotonic() < deadline, cards
        await asyncio.sleep(0.05)


def test_two_replicas_of_a_one_gpu_model_go_to_two_gpus(tmp_path: Path) -> None:
    spec = ModelSpec.model_validate(fake_model("m", tmp_path / "events", gpu_count=1,
                                               replicas=2))

    async def scenario() -> None:
        registry = registry_over(tmp_path, 2, spec)
        await registry.start()
        try:
            model = registry.models["m"]
            await model.ensure_ready(30)
            cards = await settle(registry, "m", {"ready"}, 30)
            replica = cards[1]
            assert len(model.gpus) == 1 and len(replica["gpus"]) == 1
            assert {*model.gpus, *replica["gpus"]} == {0, 1}, (model.gpus, replica)
            # Each worker process was started on its own GPU.
            assert model.worker is not None and model.worker.pid is not None
            assert visible_devices(model.worker.pid) == str(model.gpus[0])
            assert visible_devices(replica["pid"]) == str(replica["gpus"][0])
        finally:
            await registry.close()

    asyncio.run(scenario())


def test_a_replica_with_no_gpu_left_says_so_and_the_model_serves(tmp_path: Path) -> None:
    """One GPU, room for one worker: replica 0 serves; replica 1 is refused by placement
    (not started onto a full GPU), and its card says why."""
    spec = ModelSpec.model_validate(fake_model("m", tmp_path / "events", gpu_count=1,
                                               replicas=2, max_restarts=1))

    async def scenario() -> None:
        registry = registry_over(tmp_path, 1, spec)
        await registry.start()
        try:
            model = registry.models["m"]
            await model.ensure_ready(30)
            assert model.gpus == [0]
            cards = await settle(registry, "m", {"failed"}, 30)
            assert cards[1]["pid"] is None and cards[1]["gpus"] == []
            assert "start failed" in (cards[1]["error"] or ""), cards[1]
            assert "GPU 0 has 0.2 GiB free" in cards[1]["error"], cards[1]
            assert "m (replica 0)" in cards[1]["error"]  # never evicted for its replica
            assert model.state.value == "ready"
            assert model.ready_upstream() is not None
        finally:
            await registry.close()

    asyncio.run(scenario())
