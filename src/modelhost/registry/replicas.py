"""The extra replicas of a model whose spec asks for `replicas: N` (N > 1).

The model's own worker (`Model`, driven by its owner task) is replica 0: its lifecycle is
the model's, unchanged. The N - 1 others are kept here, each by its own small task: started
once the model is first ready, with the same launcher (a local process on its own port, or
a Ray actor that reserves its own resources, so that the cluster may place it on another
node), watched, restarted with the model's backoff when its worker exits, and stopped with
the model's worker. Requests go to the ready replica with the fewest in flight (`pick`); a
replica whose worker exits leaves the rotation at once. While replica 0 restarts the model
is `starting`, yet the others still serve (`Model.ready_upstream`).

In flight is counted by the relay's calls (`took` when a call picks a replica, `done` at its
release); N = 1 has no `Replicas` at all, so its path is unchanged.

GPUs: each local replica is placed on GPUs of its own by the gateway's scheduler (`place`,
asked through `ModelContext.launch` just before its worker starts, as the model's own worker
is; with gateways sharing a database, only by the gateway that owns that replica): a replica
is a `Tenant` that placement sees beside every other worker (`Registry`'s scheduler lists
them), under a name of its own, so that two replicas of a model that wants a GPU go to two
GPUs with room, never onto one that has none. A spec that pins `gpus` keeps its replicas on
those GPUs (the placement checks they have room for each). A replica is never evicted to
make room for another model (it goes with its model). Replicas on the Ray cluster are placed by the
cluster on its nodes' GPUs (`place` is not asked).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelhost.config import ModelSpec
from modelhost.gpu.placement import PlacementError
from modelhost.registry.context import Place
from modelhost.workers.launchers import Worker

log = logging.getLogger(__name__)

# A worker that stayed up this long is healthy again: its crash count starts over.
HEALTHY_UPTIME = 60.0
MAX_BACKOFF = 30.0
# Starts the worker of replica N with these weights, on the GPUs `Place` gives when asked
# (`ModelContext.launch`).
Launch = Callable[[int, Path | None, Place], Awaitable[Worker]]
# A replica a call could not reach is passed over this long (its exit may be reported later).
SHUNNED = 5.0


@dataclass(eq=False)
class Replica:
    """One extra replica; also a `gpu.scheduler.Tenant`, as placement sees it."""

    index: int
    spec: ModelSpec
    state: str = "stopped"  # starting, ready, stopped, failed
    worker: Worker | None = None
    base: str | None = None  # while ready
    in_flight: int = 0
    served: int = 0
    restarts: int = 0
    error: str | None = None
    gpus: list[int] = field(default_factory=list)  # where its worker runs
    weights: Path | None = None
    last_used: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def card(self) -> dict[str, Any]:
        return {"replica": self.index, "state": self.state, "base_url": self.base,
                "in_flight": self.in_flight, "served": self.served,
                "restarts": self.restarts, "error": self.error, "gpus": self.gpus,
                "pid": self.worker.pid if self.worker is not None else None}

    # -- as a Tenant of the GPU scheduler ------------------------------------------------

    @property
    def replica_index(self) -> int:  # how placement names it (`tenants.seen_by`)
        return self.index

    @property
    def pin(self) -> tuple[int, ...] | None:
        return None  # the spec's own `gpus`, if it pins any

    @property
    def holds_gpus(self) -> bool:
        return bool(self.gpus) and self.state in ("starting", "ready")

    @property
    def starting(self) -> bool:
        return self.state == "starting"

    @property
    def busy(self) -> bool:
        return True  # never evicted on its own: it goes with its model

    @property
    def worker_pid(self) -> int | None:
        return self.worker.pid if self.worker is not None else None

    async def evict(self) -> None:  # never asked (busy)
        raise PlacementError(f"replica {self.index} of {self.spec.id} is not evicted alone")


class Replicas:
    """Replicas 1 … N-1 of one model (see the module's docstring)."""

    def __init__(self, name: str, spec: ModelSpec, launch: Launch,
                 weights: Callable[[], Path | None],
                 place: Callable[[Replica], Awaitable[list[int]]],
                 primary: Callable[[], str | None]) -> None:
        self.name = name
        self.spec = spec
        self._launch = launch  # `ModelContext.launch`, for one replica
        self._weights = weights
        self._place = place  # the GPU scheduler's
        self._primary = primary  # replica 0's base URL while the model is ready
        self.extra = [Replica(i, spec) for i in range(1, spec.replicas)]
        self.primary_in_flight = 0  # replica 0's (the model's own worker)
        self.primary_served = 0
        self.shunned: dict[str, float] = {}  # base URL: until when it is passed over

    # -- the request path ----------------------------------------------------------------

    def pick(self, primary: str | None) -> str | None:
        """The base URL of the ready replica with the fewest in flight (`primary`: replica
        0's when it is ready), None when none is. A replica a call just failed to reach is
        passed over for `SHUNNED` seconds, unless none other is ready."""
        best, load = None, 1 << 30
        if primary is not None and not (self.shunned and self._shunned(primary)):
            best, load = primary, self.primary_in_flight
        for replica in self.extra:
            base = replica.base
            if base is not None and replica.in_flight < load and not (
                    self.shunned and self._shunned(base)):
                best, load = base, replica.in_flight
        if best is None and self.shunned:  # only shunned ones: better them than a wait
            best = primary or next((r.base for r in self.extra if r.base is not None), None)
        return best

    def _shunned(self, base: str) -> bool:
        until = self.shunned.get(base)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self.shunned[base]
        return False

    def took(self, base: str) -> Replica | None:
        """A call picked the replica at `base`: the replica to hand back to `done` (None
        for replica 0, the model's own worker)."""
        for replica in self.extra:
            if replica.base == base:
                replica.in_flight += 1
                replica.served += 1
                replica.last_used = time.monotonic()
                return replica
        self.primary_in_flight += 1
        self.primary_served += 1
        return None

    def done(self, replica: Replica | None) -> None:
        """A call that `took` `replica` released it."""
        if replica is not None:
            replica.in_flight = max(replica.in_flight - 1, 0)
        else:
            self.primary_in_flight = max(self.primary_in_flight - 1, 0)

    def at(self, base: str) -> Replica | None:
        for replica in self.extra:
            if replica.base == base:
                return replica
        return None

    async def lost(self, base: str, grace: float) -> bool:
        """After a connection to the replica at `base` failed (nothing was answered): True
        when the call may be retried, on another replica. The replica leaves the rotation
        for `SHUNNED` seconds, before its worker's exit is even seen (a lost Ray node is
        reported seconds later); with no other replica ready, wait up to `grace` for the
        exit to be seen (its restart is under way: the retry waits for it)."""
        now = time.monotonic()
        self.shunned = {b: t for b, t in self.shunned.items() if t > now}  # dead ones go
        self.shunned[base] = now + SHUNNED
        if self.pick(self._primary()) not in (None, base):
            return True
        replica = self.at(base)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if (replica.base if replica is not None else self._primary()) != base:
                return True
            await asyncio.sleep(0.01)
        return False

    def cards(self, primary: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**primary, "in_flight": self.primary_in_flight,
                 "served": self.primary_served}] + [r.card() for r in self.extra]

    # -- the owner's ---------------------------------------------------------------------

    def run(self) -> None:
        """Start the replicas that are not running (the model just became ready)."""
        for replica in self.extra:
            if replica.task is None or replica.task.done():
                replica.restarts = 0 if replica.state == "failed" else replica.restarts
                replica.task = asyncio.create_task(
                    self._keep(replica), name=f"replica:{self.name}:{replica.index}")

    @property
    def running(self) -> bool:
        return any(r.task is not None and not r.task.done() for r in self.extra)

    async def stop(self) -> None:
        """Stop every extra replica (the model's worker is stopping)."""
        tasks = [r.task for r in self.extra if r.task is not None and not r.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keep(self, replica: Replica) -> None:
        spec = self.spec
        try:
            while True:
                replica.state = "starting"
                replica.weights = self._weights()
                try:
                    worker = await self._launch(replica.index, replica.weights,
                                                functools.partial(self._placed, replica))
                except Exception as exc:  # told on the card; retried with backoff
                    if not await self._backoff(replica, f"start failed: {exc}"):
                        return
                    continue
                replica.worker = worker
                try:
                    await worker.wait_ready(spec.start_timeout)
                except Exception as exc:
                    await worker.stop()
                    replica.worker = None
                    if not await self._backoff(replica, str(exc)):
                        return
                    continue
                replica.base, replica.state, replica.error = worker.base_url, "ready", None
                log.info("model %s: replica %d ready at %s", self.name, replica.index,
                         worker.base_url)
                if not worker.watched:
                    await asyncio.Event().wait()
                code = await worker.wait()
                replica.base = None  # out of the rotation at once
                replica.worker = None
                uptime = time.monotonic() - worker.started_at
                if uptime > HEALTHY_UPTIME:
                    replica.restarts = 0
                reason = getattr(worker, "exit_reason", None) or \
                    f"worker exited with status {code}"
                if not await self._backoff(replica, reason):
                    return
        finally:
            replica.base = None
            worker_ = replica.worker
            replica.worker = None
            replica.gpus = []
            if replica.state != "failed":
                replica.state = "stopped"
            if worker_ is not None:
                await _quietly(worker_.stop())

    async def _placed(self, replica: Replica) -> list[int]:
        """The GPUs of `replica`, asked only when its worker starts here (not for a worker
        on the Ray cluster, nor for one another gateway owns)."""
        replica.gpus = await self._place(replica)
        return replica.gpus

    async def _backoff(self, replica: Replica, reason: str) -> bool:
        """Wait before the next start; False when the restarts ran out (failed)."""
        replica.error = reason
        if replica.restarts >= self.spec.max_restarts:
            replica.state = "failed"
            log.error("model %s: replica %d failed: %s; gave up after %d restart(s)",
                      self.name, replica.index, reason, replica.restarts)
            return False
        replica.restarts += 1
        delay = min(0.5 * 2 ** (replica.restarts - 1), MAX_BACKOFF)
        replica.state = "starting"
        log.warning("model %s: replica %d: %s; restart %d/%d in %.1f s", self.name,
                    replica.index, reason, replica.restarts, self.spec.max_restarts, delay)
        await asyncio.sleep(delay)
        return True


async def _quietly(stopping: Awaitable[None]) -> None:
    try:
        await asyncio.shield(stopping)
    except Exception as exc:  # a worker that will not stop is the launcher's to report
        log.warning("replica stop failed: %s", exc)
