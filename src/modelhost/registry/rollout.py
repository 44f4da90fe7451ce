"""Blue-green model updates with automatic rollback (docs/lifecycle.md, "Updates").

A loaded model whose spec changes is not stopped and started again. `Rollouts.update`:

1. starts the new version beside the old one (`Registry.version`): a *trial* (one start
   attempt, `Model.trial`), placed on GPUs with the old one still holding its own;
2. probes it: its worker answers its readiness probe, then a smoke request of its task
   (`probe.Probe`); the same request to the old version gives the latency to compare;
3. switches traffic in one step (`Registry.switch`: the catalog and the served model
   together); the old version's requests in flight, streams included, finish on its worker;
4. watches the new version for `watch_seconds`: a worker crash, or a share of failed answers
   (5xx, and the watch's own smoke requests) above `error_threshold` over at least
   `min_requests`, switches traffic back to the old version, still running;
5. then stops the old version once its last request is done.

When the GPUs cannot hold both versions, the update is done *in place*, with a warning: the
old version's requests finish, it stops, the new one starts (requests wait for it, as for
any load); if the new one fails, the old spec is started again. A model that is not loaded
takes the new spec at once (no probe).

A failed update restores the old spec everywhere: the served model, the catalog, and, through
the `Recorder` (the gateway), the state database (a `rollback` revision with the reason), an
event and a log line. The settings are `RolloutSettings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from modelhost.config import ModelSpec
from modelhost.gpu.placement import PlacementError
from modelhost.registry.lifecycle import State
from modelhost.registry.model import Model, Target
from modelhost.registry.probe import Probe
from modelhost.registry.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutSettings:
    """How an update is tried (settings `rollout_*`, variables `MODELHOST_ROLLOUT_*`)."""

    probe_timeout: float = 60.0   # each smoke request (queueing for a slot included)
    watch_seconds: float = 30.0   # the new version is watched this long after the switch
    error_threshold: float = 0.2  # a share of failed answers above this rolls back...
    min_requests: int = 5         # ... once there are at least this many answers
    probe_every: float = 5.0      # a smoke request to the watched version this often (if idle)
    drain_timeout: float = 600.0  # the old version's requests may take this long to finish

    @classmethod
    def from_settings(cls, settings: object) -> RolloutSettings:
        """From `settings.rollout_<field>` where the settings have it, else from the variable
        `MODELHOST_ROLLOUT_<FIELD>`, else the default."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = getattr(settings, f"rollout_{f.name}", None)
            if value is None:
                value = os.environ.get(f"MODELHOST_ROLLOUT_{f.name.upper()}")
            if value is not None:
                kind = int if f.name == "min_requests" else float
                values[f.name] = kind(value)
        return cls(**values)


@dataclass
class Rollout:
    """One update of one model, as the card, the events and the answers show it."""

    model: str
    mode: str = "blue-green"   # blue-green, in-place, or direct (not loaded: no probe)
    state: str = "starting"    # starting, probing, watching, done, rolled_back
    reason: str | None = None  # why it was rolled back
    warning: str | None = None
    probe: dict[str, float | None] = field(default_factory=dict)  # latencies (ms)
    watch: dict[str, int] = field(default_factory=dict)  # answers, errors, crashes
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def rolled_back(self) -> bool:
        return self.state == "rolled_back"


class Recorder:
    """What a rollout tells the gateway: every step (an event), and a rollback, whose old
    spec must be recorded again (the state database) before it returns."""

    def step(self, rollout: Rollout) -> None:
        """The rollout moved on (an event, a log line)."""

    async def rolled_back(self, rollout: Rollout, spec: ModelSpec) -> None:
        """The update was undone: `spec` serves again, for `rollout.reason`."""


class _Failed(Exception):
    def __init__(self, reason: str, no_room: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.no_room = no_room


class Rollouts:
    """Every update of the registry's models goes through here (one at a time per model)."""

    def __init__(self, registry: Registry, settings: RolloutSettings,
                 recorder: Recorder | None = None, probe: Probe | None = None) -> None:
        self.registry = registry
        self.settings = settings
        self.recorder = recorder or Recorder()
        self.probe = probe or Probe(registry.ctx.client, settings.probe_timeout)
        self.last: dict[str, Rollout] = {}  # the latest rollout of each model
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._cut: set[str] = set()  # watches to end now, the watched version kept

    def running(self, model_id: str) -> Rollout | None:
        """The rollout of `model_id` under way (watch included), if any."""
        rollout = self.last.get(model_id)
        return rollout if rollout is not None and rollout.finished_at is None else None

    async def update(self, spec: ModelSpec) -> Rollout:
        """Serve `spec` in place of the model's current one (module docstring). Returns once
        the new version serves (its watch goes on in the background) or the update was
        rolled back (`Rollout.rolled_back`, with the reason)."""
        registry = self.registry
        await self.settle(spec.id)
        old = registry.models.get(spec.id)
        rollout = Rollout(spec.id)
        self.last[spec.id] = rollout
        if old is None or old.state is not State.ready:
            rollout.mode = "direct"
            await registry.put(spec)
            return self._finish(rollout, "done")
        old.hold(True)
        try:
            await self._blue_green(rollout, old, spec)
        except _Failed as failed:
            if not failed.no_room:
                old.hold(False)
                await self._undo(rollout, old.spec, failed.reason)
                return rollout
            await self._in_place(rollout, old, spec, failed.reason)
        return rollout

    async def settle(self, model_id: str) -> None:
        """End the watch of `model_id`'s update now, if one runs (a newer change of the
        model, its removal): the watched version is kept, unless it fails in this last
        look; the old one stops once its requests are done."""
        task = self._watches.get(model_id)
        if task is None:
            return
        self._cut.add(model_id)
        try:
            await asyncio.shield(task)
        finally:
            self._cut.discard(model_id)

    async def close(self) -> None:
        """Stop the watches (at shutdown: every version is stopped by the registry)."""
        for task in list(self._watches.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the steps ---------------------------------------------------------------------

    async def _blue_green(self, rollout: Rollout, old: Model, spec: ModelSpec) -> None:
        new = self.registry.version(spec)
        new.name, new.trial = f"{spec.id} (new version)", True
        new.hold(True)
        try:
            await self._start(rollout, new)
            await self._probe(rollout, new, old)
        except _Failed:
            await self.registry.drop(new)
            raise
        self.registry.switch(new)  # the catalog and the served model, in one step
        new.name, old.name = spec.id, f"{spec.id} (old version)"
        log.info("model %s: new version serving (blue-green), old one standing by for "
                 "%g s", spec.id, self.settings.watch_seconds)
        self._step(rollout, "watching")
        self._watches[spec.id] = asyncio.create_task(
            self._watch(rollout, new, standby=old), name=f"rollout-watch:{spec.id}")

    async def _in_place(self, rollout: Rollout, old: Model, spec: ModelSpec,
                        why: str) -> None:
        rollout.mode = "in-place"
        rollout.warning = (f"not enough room for both versions ({why}); updated in place: "
                           "requests wait while the new version starts")
        log.warning("model %s: %s", spec.id, rollout.warning)
        new = self.registry.version(spec)
        new.name, new.trial = f"{spec.id} (new version)", True
        new.gate()  # the old worker goes first
        await new.start()
        new.want(Target.ready)
        self.registry.switch(new)
        new.name, old.name = spec.id, f"{spec.id} (old version)"
        old.hold(False)
        await self._retire(old, successor=new)
        new.open_gate()
        try:
            await self._start(rollout, new, started=True)
            await self._probe(rollout, new, None)
        except _Failed as failed:
            await self._restore(rollout, new, old.spec, failed.reason)
            return
        self._step(rollout, "watching")
        self._watches[spec.id] = asyncio.create_task(
            self._watch(rollout, new, standby=None, old_spec=old.spec),
            name=f"rollout-watch:{spec.id}")

    async def _start(self, rollout: Rollout, new: Model, started: bool = False) -> None:
        """Start the trial version and wait until it is ready (`_Failed` when it is not)."""
        self._step(rollout, "starting")
        if not started:
            await new.start()
            new.want(Target.ready)
        budget = new.spec.start_timeout + self.settings.probe_timeout
        deadline = time.monotonic() + budget
        while new.state is not State.ready:
            error = new.trial_error
            if error is not None:
                raise _Failed(f"the new version did not start: {error}",
                              no_room=isinstance(error, PlacementError))
            if new.state is State.failed:
                raise _Failed(f"the new version cannot start: {new.last_error}")
            if new.state in (State.absent, State.downloading):
                deadline = time.monotonic() + budget  # its weights first: the start's time
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Failed(f"the new version was not ready within {new.spec.start_timeout:g}"
                              f" + {self.settings.probe_timeout:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(new.changed(), left)

    async def _probe(self, rollout: Rollout, new: Model, old: Model | None) -> None:
        self._step(rollout, "probing")
        result = await self.probe.run(new)
        assert result is not None
        rollout.probe["new_ms"] = round(result.seconds * 1000, 1)
        if not result.ok:
            raise _Failed(f"the new version failed its smoke request: {result.error}")
        if old is not None and old.state is State.ready:
            before = await self.probe.run(old)
            rollout.probe["old_ms"] = round(before.seconds * 1000, 1) \
                if before is not None and before.ok else None
        log.info("model %s: new version probed: %s ms (old version: %s ms)", new.spec.id,
                 rollout.probe.get("new_ms"), rollout.probe.get("old_ms", "-"))

    async def _watch(self, rollout: Rollout, new: Model, standby: Model | None,
                     old_spec: ModelSpec | None = None) -> None:
        """Watch the new version; roll back to `standby` (or start `old_spec` again) when it
        fails, else stop the standby."""
        settings = self.settings
        deadline = time.monotonic() + settings.watch_seconds
        probes = failed_probes = 0
        next_probe = time.monotonic() + settings.probe_every
        reason: str | None = None
        probe_error: str | None = None  # the last failed probe's, for the log and reason
        try:
            while (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(new.changed(), min(left, 0.25))
                if new.crashes:
                    reason = f"the new version's worker exited: {new.last_error}"
                    break
                if time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + settings.probe_every
                    result = await self.probe.run(new, wait=False)  # only when a slot is free
                    if result is not None:
                        probes += 1
                        failed_probes += not result.ok
                        if not result.ok:
                            probe_error = result.error
                            log.warning("model %s: a probe of the watched version failed: %s",
                                        new.spec.id, result.error)
                answers, errors = new.answers + probes, new.errors + failed_probes
                rollout.watch = {"answers": answers, "errors": errors, "crashes": new.crashes}
                if answers >= settings.min_requests and errors / answers > \
                        settings.error_threshold:
                    probed = f"; {failed_probes} of them probes, the last: {probe_error}" \
                        if failed_probes else ""
                    reason = (f"the new version failed {errors} of {answers} answers while "
                              f"watched (more than {settings.error_threshold:.0%}{probed})")
                    break
                if new.spec.id in self._cut:
                    rollout.warning = "watch cut short by a newer change of the model"
                    break
            if reason is None:
                new.trial = False
                new.hold(False)
                if standby is not None:
                    await self._retire(standby, successor=new)
                self._finish(rollout, "done")
                log.info("model %s: update done (%s)", new.spec.id, rollout.mode)
            elif standby is not None:
                log.error("model %s: %s; traffic back to the old version", new.spec.id, reason)
                self.registry.switch(standby)
                standby.hold(False)
                new.name, standby.name = f"{new.spec.id} (failed version)", new.spec.id
                rollout.reason = reason
                await self._record(rollout, standby.spec)
                await self._retire(new, successor=standby)
            else:
                assert old_spec is not None
                await self._restore(rollout, new, old_spec, reason)
        except Exception:  # a task of its own: nobody else would see it
            log.exception("model %s: the watch of its update failed", new.spec.id)
        finally:
            self._watches.pop(new.spec.id, None)

    async def _restore(self, rollout: Rollout, new: Model, spec: ModelSpec, reason: str
                       ) -> None:
        """In place: the failed version goes, then `spec` starts again where it was."""
        log.error("model %s: %s; starting the old version again", spec.id, reason)
        back = self.registry.version(spec)
        new.name = f"{spec.id} (failed version)"
        back.gate()
        await back.start()
        back.want(Target.ready)
        self.registry.switch(back)
        rollout.reason = reason
        await self._record(rollout, spec)
        await self._retire(new, successor=back)
        back.open_gate()

    async def _undo(self, rollout: Rollout, spec: ModelSpec, reason: str) -> None:
        """The new version never served: only the record goes back."""
        log.error("model %s: update rolled back: %s", spec.id, reason)
        rollout.reason = reason
        await self._record(rollout, spec)

    async def _record(self, rollout: Rollout, spec: ModelSpec) -> None:
        self._finish(rollout, "rolled_back")
        try:
            await self.recorder.rolled_back(rollout, spec)
        except Exception:  # the old version serves whatever the database says
            log.exception("model %s: could not record the rollback", spec.id)

    async def _retire(self, model: Model, successor: Model) -> None:
        """Let `model`'s requests finish (at most `drain_timeout`), hand whoever still holds
        it to `successor`, and stop it. A model not ready (a trial that did not start, a
        worker that crashed) has nothing at its worker: its waiting callers go over at once."""
        if model.state is not State.ready:
            model.retire(successor)
            await self.registry.drop(model)
            return
        deadline = time.monotonic() + self.settings.drain_timeout
        while (model.admission.active or model.admission.waiting) and \
                time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(model.changed(), 0.05)
        if model.admission.active or model.admission.waiting:
            log.warning("model %s: %d request(s) of the old version still running after "
                        "%g s: stopped", model.spec.id, model.admission.active,
                        self.settings.drain_timeout)
        model.retire(successor)
        await self.registry.drop(model)

    def _step(self, rollout: Rollout, state: str) -> None:
        rollout.state = state
        self.recorder.step(rollout)

    def _finish(self, rollout: Rollout, state: str) -> Rollout:
        rollout.finished_at = time.time()
        self._step(rollout, state)
        return rollout


Step = Callable[[Rollout], None]
Rollback = Callable[[Rollout, ModelSpec], Awaitable[None]]


class Callbacks(Recorder):
    """A `Recorder` made of two functions."""

    def __init__(self, step: Step, rolled_back: Rollback) -> None:
        self._on_step = step
        self._on_rollback = rolled_back

    def step(self, rollout: Rollout) -> None:
        self._on_step(rollout)

    async def rolled_back(self, rollout: Rollout, spec: ModelSpec) -> None:
        await self._on_rollback(rollout, spec)
