"""A change another gateway committed, applied to this one's registry (`Follower`).

The notification names a model; the change itself is read from the database (the model's
row), so that a notification lost or repeated changes nothing: after a reconnection every
model is read again (`None`). Applied one at a time, in the gateway's own order of spec
changes (`Gateway._changes`), never written back:

* a row deleted: the model leaves the registry, if it was a model added through the API
  (a model of this gateway's own models file stays: that file declares it);
* a new row from the API: the model is added; a row whose spec differs from the one this
  gateway serves: the model is replaced (`Registry.put`: its worker, if this gateway owns it,
  stops and starts with the new spec; a relaying one relays again);
* a row of another gateway's models file (source `file`) that this one does not serve is
  none of its business.

Secrets: the database holds specs with `***` for their secrets (`redaction`). A models
file's model gets them back from the spec this gateway serves (its own models file: a
change another gateway made through the API keeps them; one that needs others is not
applied). A model of the API's gets them from `Persistence.stored_spec`: sealed in the
database with the deployment's secret key, which every gateway with that key opens, or else
from this gateway's own secrets file; a model whose secrets this gateway cannot get is still
applied, with `***`, and fails to start here with the reason (`secretkeeper`). A change of a
model's secrets alone is notified too.
"""

from __future__ import annotations

import asyncio
import json
import logging

from pydantic import ValidationError

from modelhost.config import ModelSpec
from modelhost.db.rows import ModelRow
from modelhost.db.store import Store
from modelhost.gateway import Gateway
from modelhost.persistence import spec_secrets
from modelhost.redaction import MASK, restore_masked

log = logging.getLogger(__name__)


class Follower:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._tasks: set[asyncio.Task[None]] = set()
        self._order = asyncio.Lock()

    def heard(self, change: tuple[str, str] | None) -> None:
        """A notification (on the event loop): apply it in a task, in order."""
        model_id = change[0] if change is not None else None
        task = asyncio.get_running_loop().create_task(self._apply(model_id),
                                                      name=f"follow:{model_id or '*'}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _apply(self, model_id: str | None) -> None:
        gateway = self.gateway
        async with self._order:
            if gateway.closing:
                return
            try:
                if model_id is None:
                    rows = await gateway.persistence.now(
                        lambda store: store.models(include_deleted=True))
                    for row in rows:
                        await self._one(row.model_id, row)
                    return

                def read(store: Store) -> ModelRow | None:
                    return store.model(model_id)

                await self._one(model_id, await gateway.persistence.now(read))
            except Exception:
                log.exception("could not apply the change of model %s made by another "
                              "gateway", model_id or "(all)")

    async def _one(self, model_id: str, row: ModelRow | None) -> None:
        gateway = self.gateway
        registry = gateway.registry
        async with gateway._changes:
            current = registry.models.get(model_id)
            if row is None or row.deleted:
                if current is not None and model_id in gateway.api_models:
                    log.info("model %s was deleted by another gateway: removing it", model_id)
                    await gateway.rollouts.settle(model_id)
                    await registry.remove(model_id)
                    gateway.api_models.discard(model_id)
                    gateway._refresh_secrets()
                return
            if current is None and row.source != "api":
                return  # another gateway's models file
            if row.source == "api" or current is None:
                data = await gateway.persistence.stored_spec(row)
            else:  # a models file's model: its secrets are in this gateway's own file
                data = restore_masked(row.spec(), spec_secrets(current.spec))
                if MASK in json.dumps(data):
                    log.error("model %s as changed by another gateway has secrets that are "
                              "not in this gateway's models file, not applied", model_id)
                    return
            try:
                spec = ModelSpec.model_validate(data)
            except ValidationError as exc:
                log.error("model %s as changed by another gateway is not valid here, "
                          "skipped: %s", model_id, exc)
                return
            if current is not None and current.spec == spec:
                return  # already served as stored
            log.info("model %s was %s by another gateway: applying it (version %d)",
                     model_id, "changed" if current is not None else "added", row.version)
            if current is not None:
                await gateway.rollouts.settle(model_id)
            try:
                await registry.put(spec)
            except ValueError as exc:  # a name clash with a model of this gateway's file
                log.error("model %s added by another gateway clashes here, skipped: %s",
                          model_id, exc)
                return
            if row.source == "api":
                gateway.api_models.add(model_id)
            gateway._refresh_secrets()
