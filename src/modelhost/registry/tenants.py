"""The models as one of them sees them when it is placed on GPUs (`VersionScheduler`).

During a blue-green update two versions of a model run side by side under one id, and
placement (`gpu.placement.place`) knows models by id: it refuses a model "already loaded",
and names the models to evict by id. So the version being placed sees every other version of
its own id, and every version out of service, under a name of its own (`id~2`...). Those are
held by their rollout (`Model.hold`): busy for placement, never evicted, so a renamed one is
never looked up by that name.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from modelhost.config import ModelSpec
from modelhost.gpu.scheduler import Tenant


class Renamed:
    """A tenant shown to placement under another id (`kept`: and never evicted)."""

    def __init__(self, tenant: Tenant, name: str, kept: bool = False) -> None:
        self.tenant = tenant
        self.kept = kept
        self._spec = tenant.spec.model_copy(update={"id": name})

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def weights(self) -> Path | None:
        return self.tenant.weights

    @property
    def pin(self) -> tuple[int, ...] | None:
        return self.tenant.pin

    @property
    def gpus(self) -> list[int]:
        return self.tenant.gpus

    @property
    def holds_gpus(self) -> bool:
        return self.tenant.holds_gpus

    @property
    def starting(self) -> bool:
        return self.tenant.starting

    @property
    def busy(self) -> bool:
        return self.kept or self.tenant.busy

    @property
    def last_used(self) -> float:
        return self.tenant.last_used

    @property
    def worker_pid(self) -> int | None:
        return self.tenant.worker_pid

    async def evict(self) -> None:
        await self.tenant.evict()


def seen_by(placed: Tenant, served: Iterable[Tenant], extras: Iterable[Tenant] = (),
            kept: Tenant | None = None) -> dict[str, Tenant]:
    """The tenants by the names `placed` sees them under: itself left out, every other one
    with its id unless that id is taken (by `placed` or another version): then `id~N`.
    `kept` (the model whose extra replica is placed) is never evicted for `placed`."""
    seen: dict[str, Tenant] = {}
    taken = {placed.spec.id}
    for tenant in [*served, *extras]:
        if tenant is placed:
            continue
        name, n = tenant.spec.id, 1
        replica = 0 if tenant is kept else getattr(tenant, "replica_index", None)
        if replica is not None:  # as placement's messages name it
            name = f"{tenant.spec.id} (replica {replica})"
        while name in taken:
            n += 1
            name = f"{tenant.spec.id}~{n}"
        taken.add(name)
        seen[name] = tenant if name == tenant.spec.id else \
            Renamed(tenant, name, kept=tenant is kept)
    return seen
