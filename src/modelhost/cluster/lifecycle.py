"""Loads, unloads and idleness of a model across the gateways sharing a PostgreSQL database.

`SharedLifecycle` is the registry's `Shared` (`Registry.shared`), made only for such a
gateway (never on SQLite):

* **An unload acts on every gateway.** An unload asked through any gateway (the admin API,
  and through it the CLI and the dashboard; the idle reaper) is announced before this
  gateway stops the model (`Member.announce_unload`): the model's desired state becomes
  `unloaded` and a notification of kind `unload` goes out in the same transaction. Every
  other gateway stops the model when it hears it (`Member.unloaded`: the owner stops its
  worker, the others stop relaying), and a relaying gateway that finds the owner's lock free
  reads the desired state before it would take the model over (`ClusterWorker._unloaded`).
  A later request or load through any gateway starts it again: that gateway takes the lock
  and starts the worker, the others relay to it when they are asked for it.
* **Idleness is the cluster's.** Each gateway records when it last used each model in
  `model_activity` (`tick`, from the idle reaper's timer: at most every `ACTIVITY_S` per
  model, only while the model is used; a request only stamps `Model.last_used`, as it does
  alone). A model idle here for its `idle_ttl` is unloaded only when no gateway used it
  within that time (`idle`), nor within `RECORD_LAG_S` (how late another gateway's use may
  be recorded: a shorter `idle_ttl` is held to that); then it is unloaded everywhere, as
  above.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable
from typing import Final

from modelhost.cluster.member import Member
from modelhost.registry.lifecycle import State
from modelhost.registry.model import Model, Target
from modelhost.registry.registry import Registry

log = logging.getLogger(__name__)

# How often a gateway records its uses of the models (seconds, at most, per model).
ACTIVITY_S: Final = 2.0
# How late another gateway's use may be recorded (`ACTIVITY_S` plus a reaper's tick, and
# some room): across gateways nothing counts as idle for less, whatever its `idle_ttl`.
RECORD_LAG_S: Final = ACTIVITY_S + 1.5
# A row of `model_activity` older than this is dropped (a gateway that died without
# forgetting its rows), when a gateway starts or stops.
FORGET_AFTER_S: Final = 24 * 3600.0


class SharedLifecycle:
    def __init__(self, member: Member, registry: Registry) -> None:
        self.member = member
        self.registry = registry
        self._seen: weakref.WeakKeyDictionary[Model, float] = weakref.WeakKeyDictionary()
        self._next_flush = 0.0
        self._last_tick: float | None = None  # None: the models are new to it
        self._pruned = False
        # model id: until when it is known to be used through another gateway (monotonic)
        self._used_until: dict[str, float] = {}
        member.on_unload = self._stop_here

    def _stop_here(self, model_id: str) -> None:
        """Another gateway unloaded the model everywhere: stop it here (its worker if this
        gateway owns it, its relay otherwise)."""
        model = self.registry.models.get(model_id)
        if model is None or model.target is not Target.ready:
            return
        log.info("model %s was unloaded on every gateway: unloading it here", model_id)
        model.want(Target.stopped)

    async def unloading(self, model: Model) -> None:
        model_id = model.spec.id
        try:
            await self.member.announce_unload(model_id)
        except Exception as exc:  # unloaded here all the same; the others may take it over
            log.error("model %s: could not tell the other gateways of its unload: %s",
                      model_id, exc)

    async def tick(self, models: Iterable[Model]) -> None:
        """Record the uses of the models since the last time (every `ACTIVITY_S`)."""
        now = time.monotonic()
        if now < self._next_flush:
            return
        self._next_flush = now + ACTIVITY_S
        models = list(models)
        ages: dict[str, float] = {}
        for model in models:
            used, seen = model.last_used, self._seen.get(model)
            self._seen[model] = used
            if model.busy:  # requests at its worker (a long stream): in use now
                ages[model.spec.id] = 0.0
            elif self._used_since(model, used, seen):
                ages[model.spec.id] = max(now - used, 0.0)
        self._last_tick = now
        try:
            if not self._pruned:
                await self.member.forget_uses(FORGET_AFTER_S)
                self._pruned = True
            if ages:
                await self.member.record_use(ages)
        except Exception as exc:  # the database is away: the next tick records them
            for model in models:
                if model.spec.id in ages:
                    self._seen.pop(model, None)
            log.warning("could not record the use of %s: %s", ", ".join(sorted(ages)), exc)

    def _used_since(self, model: Model, used: float, seen: float | None) -> bool:
        """Whether a request used the model since the last flush (`seen`: its last use
        then). A model new since then (added and used at once) counts once it is loading
        or loaded; at the first flush every model is new and none counts."""
        if seen is not None:
            return used != seen
        return self._last_tick is not None and used > self._last_tick and \
            model.state in (State.starting, State.ready)

    async def idle(self, model: Model, ttl: float) -> bool:
        """Whether no gateway used the model for `ttl` seconds (asked once this gateway has
        not; False when the database cannot say)."""
        model_id = model.spec.id
        now = time.monotonic()
        if self._used_until.get(model_id, 0.0) > now:
            return False
        try:
            idle_for = await self.member.idle_for(model_id)
        except Exception as exc:
            log.warning("model %s: cannot read its use through the other gateways, not "
                        "unloaded for now: %s", model_id, exc)
            self._used_until[model_id] = now + ACTIVITY_S
            return False
        wait = max(ttl, RECORD_LAG_S)
        if idle_for is not None and idle_for < wait:
            log.debug("model %s: used through a gateway %.1f s ago", model_id, idle_for)
            self._used_until[model_id] = now + (wait - idle_for)
            return False
        self._used_until.pop(model_id, None)
        return True

    async def close(self) -> None:
        """The gateway stops: its uses are forgotten (the others' are what counts now)."""
        try:
            await self.member.forget_uses(FORGET_AFTER_S)
        except Exception as exc:
            log.warning("could not forget this gateway's model uses: %s", exc)
