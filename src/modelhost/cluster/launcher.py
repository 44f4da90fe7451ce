"""Every model's start when gateways share a PostgreSQL database: one owner, relays elsewhere.

`ClusterContext.launch` wraps the launcher the model would use alone (a local process, or
Ray's) in a `ClusterWorker` (one per replica). When asked to be ready, it:

Ownership is by version: the lock and the published address are those of the model's id
and its spec's digest (`db.workers.spec_version`). A gateway rolling an update out gets a
worker of the new spec (its own, or the one another gateway already started for it) while
the old version's owner keeps the old one until it applies the change itself.

* takes the lock of the model's version (`Member.own`). Got it: this gateway owns it. It
  clears the address an earlier owner may have left, asks for the worker's GPUs only now
  (`ClusterContext.launch`: a gateway that relays books none on its machine), starts the
  worker through the inner launcher, and once the worker answers publishes its address
  (`model_workers`). Its `wait()` returns when the worker exits or when the lock session
  broke (the lock is lost: the worker is stopped at once, another gateway may already own
  the model).
* or else relays: it waits for the owner's published address and becomes a worker whose
  `base_url` is that address: the requests this gateway takes for the model go straight to
  the owner's worker, through the same relay as for a worker of its own (no second hop
  through the owner gateway). Its `wait()` returns (as a worker's exit) when the owner's lock
  is free (the owner died or unloaded the model; unless this version is no longer the
  stored one: an old version that a rollout keeps standing by is not restarted) or its
  published address changed (the owner restarted its worker): the model's owner task starts
  again (`Model._watch`: a short backoff), and this gateway takes the lock or relays to the
  new address. The owner gateway's death is seen within `WATCH_S`, plus that backoff.
  An owner that let the model go because it was unloaded everywhere (`lifecycle`: its
  desired state is `unloaded` since this relay began, or another gateway said so) is not
  taken over: the relay stops too (`Member.unloaded`).

The published address of a local worker is its advertised one (`MODELHOST_WORKER_HOST`,
`MODELHOST_WORKER_ADVERTISE_HOST`; loopback by default: gateways of one machine); the owner
itself relays over the address its worker listens on. Ray's workers are published as they
are (their node's address).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from modelhost.cluster.member import Member
from modelhost.config import ModelSpec
from modelhost.db.workers import spec_version
from modelhost.persistence import spec_json
from modelhost.registry.context import ModelContext, Place
from modelhost.workers.launchers import Launcher, Worker
from modelhost.workers.process import WorkerStartError

log = logging.getLogger(__name__)

# How often a relaying gateway looks whether the owner is gone or moved, and how often one
# that waits for the owner's address looks for it.
WATCH_S: Final = 1.0
POLL_S: Final = 0.1
# The "exit status" of a relay whose owner is gone (126-127 are the shim's own).
OWNER_GONE: Final = 75
# How long a relay that finds an unload recorded waits for its notification.
NOTIFY_GRACE_S: Final = 1.0


class ClusterWorker:
    watched = True
    connect_to = None

    def __init__(self, inner: Launcher, member: Member, spec: ModelSpec,
                 weights: Path | None, place: Place, replica: int = 0) -> None:
        self._inner = inner
        self._member = member
        self._spec = spec
        self._weights = weights
        self._place = place  # the GPUs, asked only once this gateway owns the model
        self._worker: Worker | None = None  # owner: the worker this gateway runs
        self._epoch: int | None = None  # owner: the lock's epoch
        self._owner: str | None = None  # relay: the gateway whose worker it reaches
        self._desired: tuple[str, str] | None = None  # relay: the desired state it began with
        self._published: str | None = None  # owner: the address the others relay to
        self._created = time.monotonic()
        # The spec's version; each replica of it is owned and published on its own
        # (`replica_version`), so that N replicas are N workers for every gateway.
        self._spec_version = spec_version(spec_json(spec), spec.id)
        self._version = replica_version(self._spec_version, replica)
        self.base_url = ""

    @property
    def pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    @property
    def port(self) -> int | None:
        return self._worker.port if self._worker is not None else None

    @property
    def started_at(self) -> float:
        return self._worker.started_at if self._worker is not None else self._created

    @property
    def owned(self) -> bool:
        return self._epoch is not None

    def tail(self, lines: int) -> str:
        if self._worker is not None:
            return self._worker.tail(lines)
        return f"(relayed to the worker of gateway {self._owner} at {self.base_url})"

    async def wait_ready(self, timeout: float) -> None:
        model_id = self._spec.id
        deadline = time.monotonic() + timeout
        while True:
            if self._member.unloaded_after(model_id, self._created):
                raise WorkerStartError(f"model {model_id} was unloaded on every gateway "
                                       "while it started")
            epoch = await self._member.own(model_id, self._version)
            if epoch is not None:
                await self._start_owned(epoch, max(deadline - time.monotonic(), 0.1))
                return
            found = await self._member.address(model_id, self._version)
            if found is not None and found[0] != self._member.gateway_id:
                self._desired = await self._member.desired(model_id)
                self._owner, self.base_url = found
                log.info("model %s is owned by gateway %s: relaying to its worker",
                         model_id, self._owner)
                return
            if time.monotonic() > deadline:
                raise WorkerStartError(f"model {model_id}: the gateway that owns it published "
                                       f"no worker address in {timeout:.0f} s")
            await asyncio.sleep(POLL_S)

    async def _start_owned(self, epoch: int, timeout: float) -> None:
        model_id = self._spec.id
        self._epoch = epoch
        try:
            found = await self._member.address(model_id, self._version)
            if found is not None and found[0] != self._member.gateway_id:
                await self._member.clear(model_id, self._version, found[0])  # owner gone
            log.info("model %s: this gateway owns it, starting its worker", model_id)
            gpus = await self._place()
            self._worker = await self._inner.start(self._spec, self._weights, gpus)
            await self._worker.wait_ready(timeout)
            self.base_url = self._worker.base_url
            # Where the others reach it (`LocalWorker.advertised_url`; others: base_url).
            self._published = getattr(self._worker, "advertised_url", None) or self.base_url
            await self._member.publish(model_id, self._version, self._published)
        except BaseException:
            await self._finish()
            raise

    async def wait(self) -> int:
        if self._worker is not None and self._epoch is not None:
            exited = asyncio.ensure_future(self._worker.wait())
            lost = asyncio.ensure_future(self._member.until_lost(self._epoch))
            try:
                await asyncio.wait({exited, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                if not exited.done():
                    exited.cancel()
            code = exited.result() if exited.done() and not exited.cancelled() else None
            if code is None:
                log.error("model %s: this gateway lost its lock: stopping its worker",
                          self._spec.id)
            await self._finish()
            return code if code is not None else OWNER_GONE
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                if await self._member.owner_gone(self._spec.id, self._version):
                    if await self._member.current_version(self._spec.id) != \
                            self._spec_version:
                        continue  # an old version (a rollout's, standing by): not restarted
                    if await self._unloaded():
                        continue  # stopped here too (`Member.unloaded`): cancels this wait
                    log.warning("model %s: its owner gateway %s is gone: taking over",
                                self._spec.id, self._owner)
                    return OWNER_GONE
                found = await self._member.address(self._spec.id, self._version)
            except Exception as exc:  # the database is away: keep relaying meanwhile
                log.warning("model %s: cannot check its owner: %s", self._spec.id, exc)
                continue
            if found is None or found[1] != self.base_url:
                log.info("model %s: its owner's worker moved: relaying again", self._spec.id)
                return OWNER_GONE

    async def _unloaded(self) -> bool:
        """Whether the owner let the model go because it was unloaded everywhere since this
        relay began (heard, or its desired state now `unloaded`, changed since, and the
        unload's notification due: `Member.hears_unload`): then it is stopped here too
        (`Member.unloaded`), instead of taken over."""
        model_id = self._spec.id
        if self._member.unloaded_after(model_id, self._created):
            return True
        desired = await self._member.desired(model_id)
        if desired is None or desired[0] != "unloaded" or desired == self._desired:
            return False
        if not await self._member.hears_unload(model_id, self._created, NOTIFY_GRACE_S):
            return False
        log.info("model %s was unloaded on every gateway (its owner %s let it go): "
                 "not taking it over", model_id, self._owner)
        return True

    async def stop(self) -> None:
        await self._finish()

    async def _finish(self) -> None:
        """Stop the worker this gateway runs (if any), withdraw its address, give the lock
        back. Idempotent."""
        worker, self._worker = self._worker, None
        epoch, self._epoch = self._epoch, None
        if worker is not None:
            await worker.stop()
        if epoch is None:
            return
        with contextlib.suppress(Exception):  # the row is cleared by the next owner anyway
            await self._member.unpublish(self._spec.id, self._version, self._published)
        await self._member.disown(self._spec.id, self._version, epoch)


def replica_version(version: str, replica: int) -> str:
    """What replica `replica` of a spec's version is owned and published as (replica 0: the
    version itself, as before replicas)."""
    return version if replica == 0 else f"{version}#r{replica}"


@dataclass(frozen=True)
class ClusterContext(ModelContext):
    """A model's context whose launcher is shared out between the gateways (`member`)."""

    member: Member | None = None

    async def launch(self, spec: ModelSpec, weights: Path | None, place: Place,
                     replica: int = 0) -> Worker:
        """The worker of the model's replica `replica`, placed on this machine's GPUs only
        once this gateway owns that replica (a gateway that relays to another's worker books
        none)."""
        if self.member is None:
            return await super().launch(spec, weights, place, replica)

        async def nowhere() -> list[int]:  # a Ray cluster places its workers itself
            return []

        return ClusterWorker(super().local_launcher(spec, replica), self.member, spec, weights,
                             nowhere if self.on_cluster(spec) else place, replica)
