"""The gateway's operations on models, shared by the admin API (and through it the CLI).

Every operation goes through a model's owner (`Model.want`), so an admin load, an
idle unload and a request can never race each other.

What the admin API may set is `admin_policy`'s (code on the host, remote URLs); secrets are
redacted in every answer, event and log line (`redaction`); a spec change (PUT, DELETE, a
rollback, a reload) is committed to the state database before it is applied, and changes
nothing when that write fails (503, `state_not_saved`). A loaded model whose spec changes is
updated blue-green (`registry.rollout`): the answer comes once the new version serves, or
once the update was rolled back (409 `update_rolled_back`, with the reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from typing import Any

from pydantic import ValidationError

from modelhost.admin_policy import RemotePolicy, check_code, remote_url
from modelhost.auth import acting
from modelhost.catalog import Catalog
from modelhost.config import (
    UNION_TAGS,
    ConfigError,
    HubSource,
    ModelsFile,
    ModelSpec,
    load_models_file,
)
from modelhost.downloads import DownloadError
from modelhost.errors import (
    InvalidRequest,
    ModelhostError,
    ModelNotReady,
    NotFound,
    validation_message,
)
from modelhost.events import EventBus
from modelhost.hub import HubService
from modelhost.hubtoken import TokenError, delete_token, resolve_token, token_info, write_token
from modelhost.persistence import Persistence, keep_secrets, spec_dict, spec_json, spec_secrets
from modelhost.redaction import (
    Scrubber,
    ScrubFilter,
    redact_spec,
    secret_texts,
)
from modelhost.registry.history import NoSuchVersion, NotServable, earlier_spec
from modelhost.registry.lifecycle import State
from modelhost.registry.model import Model, Pin, Target
from modelhost.registry.registry import Registry
from modelhost.registry.reload import ReloadError, ReloadPlan, plan
from modelhost.registry.rollout import Callbacks, Rollout, Rollouts, RolloutSettings
from modelhost.settings import Settings

log = logging.getLogger(__name__)

SECRETS_FILE = "secrets.json"


class NotSaved(ModelhostError):
    """The state database (or the secrets file) could not record a change: nothing changed."""

    status = 503
    type = "server_error"
    code = "state_not_saved"


class Conflict(ModelhostError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RolledBack(Conflict):
    """An update that failed and was undone: the old version serves."""

    code = "update_rolled_back"


class Gateway:
    def __init__(self, registry: Registry, events: EventBus, persistence: Persistence,
                 hub: HubService, settings: Settings) -> None:
        self.registry = registry
        self.hub = hub
        self.settings = settings
        load_timeout = settings.load_wait_timeout
        self.events = events
        self.persistence = persistence
        self.load_timeout = load_timeout
        self.started = time.time()
        self.api_models: set[str] = set()
        self.closing = False
        persistence.keep_secrets(settings.data_dir / SECRETS_FILE, settings.secret_key,
                                 settings.secret_key_fallback_list)
        self.remote_policy = RemotePolicy.parse(settings.remote_allow_list)
        self.scrub = Scrubber()
        self._log_filter = ScrubFilter(self.scrub)
        events.scrub = self.scrub.value
        # Spec changes one at a time: each is checked, committed, then applied.
        self._changes = asyncio.Lock()
        # Remote models added through the API are checked again at every load; a model
        # whose secrets this gateway cannot get does not start (`secretkeeper`).
        registry.ctx = dataclasses.replace(registry.ctx, remote_policy=self._remote_policy,
                                           locked=lambda spec: persistence.locked.get(spec.id))
        registry.add_listener(self._remember_desired)
        # Blue-green updates; the models file's specs as last read (what a reload compares).
        self.rollouts = Rollouts(registry, RolloutSettings.from_settings(settings),
                                 Callbacks(self._rollout_step, self._rolled_back))
        self.file_specs: dict[str, ModelSpec] = {}

    def _remote_policy(self, spec: ModelSpec) -> RemotePolicy | None:
        """The API's policy for a spec that came through the API: a model added there, or
        a declared one whose spec is no longer the models file's (a PUT, a rollback)."""
        trusted = spec.id not in self.api_models and self.file_specs.get(spec.id) == spec
        return None if trusted else self.remote_policy

    def _refresh_secrets(self, *also: ModelSpec) -> None:
        """The values the scrubber removes from text: every spec's secrets (and those of
        `also`: specs on their way in, whose updates may fail), the keys."""
        values = [v for spec in (*self.catalog.models, *also)
                  for v in secret_texts(spec_dict(spec))]
        values += self.settings.api_keys + self.settings.admin_api_keys
        with contextlib.suppress(Exception):
            token = resolve_token(self.settings.huggingface_token,
                                  self.settings.model_cache_dir)
            if token:
                values.append(token)
        self.scrub.set(values)

    async def start(self) -> None:
        """Open the state database, record the declared specs, restore the models added
        through the API, start the registry, then load what was loaded before."""
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._log_filter)
        p = self.persistence
        await p.open()
        await p.move_secrets_out()
        await p.record_specs(list(self.catalog.models), actor="config-file", source="file")
        self.file_specs = {spec.id: spec for spec in self.catalog.models}
        for spec in await p.api_specs():
            try:
                self.catalog.put(spec)
            except ValueError as exc:
                log.error("model %s added through the API clashes with the models file, "
                          "skipped: %s", spec.id, exc)
                continue
            self.api_models.add(spec.id)
        self._refresh_secrets()
        self.registry.rebuild()
        await self.registry.start()
        desired = await p.now(lambda store: store.desired_states())
        for model_id in await self.hub.interrupted():
            model = self.registry.models.get(model_id)
            if model is not None and model.state is State.absent:
                log.info("resuming the interrupted download of model %s", model_id)
                model.want(Target.cached)
        for model_id, row in desired.items():
            model = self.registry.models.get(model_id)
            if model is not None and row.desired == "loaded":
                log.info("model %s was loaded before the restart: loading it again", model_id)
                pin = Pin(tuple(row.gpu_device_ids)) if row.gpu_device_ids else None
                model.want(Target.ready, pin=pin)

    async def close(self) -> None:
        self.closing = True  # a shutdown is not an unload: desired states stay as they are
        await self.hub.downloader.close()  # partial files stay; the next start resumes them
        await self.rollouts.close()
        await self.registry.close()
        await self.persistence.close()
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._log_filter)

    def _remember_desired(self, model: Model, previous: State) -> None:
        if self.persistence.store is None or self.closing:
            return
        model_id, gpus = model.spec.id, list(model.pin) if model.pin is not None else None
        if model.state is State.starting and previous is State.cached:
            self.persistence.later(lambda store: store.set_desired(model_id, "loaded", gpus))
        elif self.registry.shared is None and (
                (model.state is State.cached and previous is State.stopping) or
                (model.state is State.failed and previous is State.starting)):
            # Unloaded, or its load failed: not to be loaded again at the next start. (With
            # other gateways an unload stores it as it is announced, `cluster.lifecycle`: a
            # stop that ends later must not undo a load another gateway made meanwhile; and a
            # load that failed here is this gateway's, not an unload of the others' models.)
            self.persistence.later(lambda store: store.set_desired(model_id, "unloaded"))

    async def history(self, model_id: str) -> list[dict[str, Any]]:
        spec = self.catalog.get(model_id)
        key = spec.id if spec is not None else model_id
        rows = await self.persistence.now(lambda store: store.history(key))
        if not rows:
            raise NotFound(f"no history for model '{model_id}'", param="model",
                           code="model_not_found")
        return [{"version": r.version, "action": r.action, "actor": r.actor,
                 "created_at": r.created_at.isoformat(),
                 "reason": self.scrub(r.reason) if r.reason else None,
                 "spec": self.scrub.value(redact_spec(json.loads(r.spec_json)))
                 if r.spec_json else None}
                for r in rows]

    def gpus(self) -> dict[str, Any]:
        monitor = self.registry.gpus
        users: dict[int, list[str]] = {}
        for model in [*self.registry.models.values(), *self.registry.extras]:
            for index in model.gpus:
                users.setdefault(index, []).append(model.spec.id)
        return {
            "available": monitor.available,
            "reason": monitor.unavailable_reason,
            "error": monitor.last_error,
            "gpus": [{**dataclasses.asdict(sample), "models": users.get(sample.index, []),
                      "history": [{"t": h.taken_at, "memory_used": h.memory_used,
                                   "utilization_gpu": h.utilization_gpu,
                                   "temperature_c": h.temperature_c}
                                  for h in monitor.history(sample.index)]}
                     for sample in monitor.latest()],
        }

    @property
    def catalog(self) -> Catalog:
        return self.registry.catalog

    def model(self, model_id: str) -> Model:
        return self.registry.model(model_id)

    def card(self, model: Model) -> dict[str, Any]:
        """Everything an operator wants to see about one model."""
        admission = model.admission
        worker = model.worker
        return {
            "id": model.spec.id,
            "state": model.state.value,
            "target": model.target.value,
            "task": model.spec.task.value,
            "backend": model.spec.backend.value,
            # Where its spec comes from: the admin API, or the models file (built-ins too).
            "source": "api" if model.spec.id in self.api_models else "file",
            "aliases": model.spec.aliases,
            "gpus": model.gpus,
            "gpu_override": list(model.pin) if model.pin is not None else None,
            "last_error": self.scrub(model.last_error) if model.last_error else None,
            "restarts": model.restarts,
            "active_requests": admission.active,
            "queued_requests": admission.waiting,
            "idle_seconds": round(time.monotonic() - model.last_used, 1),
            "download": self.scrub.value(model.download_progress),
            "usage": model.usage,
            "worker": None if worker is None or worker.pid is None else {
                "pid": worker.pid, "port": worker.port,
                "uptime_seconds": round(time.monotonic() - worker.started_at, 1),
            },
            # `replicas: N` > 1: each worker's state, address and calls in flight.
            "replicas": None if model.replicas is None else [
                {**card, "error": self.scrub(card["error"]) if card["error"] else None}
                for card in model.replicas.cards({
                    "replica": 0, "state": model.state.value, "restarts": model.restarts,
                    "gpus": model.gpus, "base_url": worker.base_url if worker else None,
                    "pid": worker.pid if worker is not None else None,
                    "error": model.last_error})],
            "spec": redact_spec(spec_dict(model.spec)),
            "rollout": self.scrub.value(rollout.as_dict())
            if (rollout := self.rollouts.last.get(model.spec.id)) is not None else None,
        }

    def cards(self) -> list[dict[str, Any]]:
        return [self.card(model) for model in self.registry.models.values()]

    async def load(self, model_id: str, gpu_device_ids: list[int] | None,
                   wait: bool = True, reset_gpus: bool = False) -> dict[str, Any]:
        """Load a model, on `gpu_device_ids` when given (a loaded model elsewhere is moved:
        its owner stops it and starts it there), back on its own GPUs with `reset_gpus`.
        A load that fails leaves the model as it was (its owner drops the new pin)."""
        model = self.model(model_id)
        pin = Pin(None) if reset_gpus else None
        if gpu_device_ids is not None:
            if len(set(gpu_device_ids)) != len(gpu_device_ids) or \
                    any(g < 0 for g in gpu_device_ids):
                raise InvalidRequest("gpu_device_ids must list distinct non-negative GPU "
                                     "indices", param="gpu_device_ids")
            pin = Pin(tuple(gpu_device_ids))
        failures = model.failures
        model.want(Target.ready, pin=pin)
        if wait:
            await self._until(model, Target.ready, {State.ready}, failures)
        return self.card(model)

    async def unload(self, model_id: str, wait: bool = True) -> dict[str, Any]:
        model = self.model(model_id)
        await self.registry.unloading(model)  # other gateways sharing the database: theirs too
        if wait:
            await self._until(model, Target.stopped,
                              {State.cached, State.absent, State.failed, State.downloading})
        else:
            model.want(Target.stopped)
        return self.card(model)

    async def download(self, model_id: str) -> dict[str, Any]:
        model = self.model(model_id)
        if not isinstance(model.spec.source, HubSource):
            raise InvalidRequest(f"model '{model_id}' has no Hugging Face source: nothing to "
                                 "download", param="model")
        if model.state is State.absent or (model.state is State.failed and model.weights is None):
            model.want(Target.cached if model.target is Target.stopped else model.target)
        return self.card(model)

    async def cancel_download(self, model_id: str) -> dict[str, Any]:
        model = self.model(model_id)
        current = self.hub.downloader.get(model.spec.id)
        if current is None or not current.active:
            raise Conflict(f"model '{model.spec.id}' has no download running")
        await self.hub.downloader.cancel(model.spec.id)
        await model.wait_for({State.absent, State.cached, State.failed})
        return self.card(model)

    async def delete_cache(self, model_id: str) -> dict[str, Any]:
        model = self.model(model_id)
        source = model.spec.source
        if not isinstance(source, HubSource):
            raise InvalidRequest(f"model '{model.spec.id}' is not in the model cache (its "
                                 "source is not a Hugging Face repository)", param="model")
        if model.state not in (State.cached, State.absent, State.failed):
            raise Conflict(f"model '{model.spec.id}' is {model.state}: unload it (or cancel its "
                           "download) first")
        try:
            freed = await self.hub.downloader.delete(source.hf, None)
        except DownloadError as exc:
            raise Conflict(str(exc)) from None
        await model.forget_weights()
        return {**self.card(model), "freed_bytes": freed}

    async def cache(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.hub.cache)

    def token(self) -> dict[str, Any]:
        info = token_info(self.settings.huggingface_token, self.settings.model_cache_dir)
        return {"set": info.source is not None, "source": info.source, "masked": info.masked}

    def set_token(self, value: str) -> dict[str, Any]:
        try:
            write_token(self.settings.model_cache_dir, value)
        except TokenError as exc:
            raise InvalidRequest(str(exc), param="token") from None
        return self.token()

    def delete_token(self) -> dict[str, Any]:
        delete_token(self.settings.model_cache_dir)
        return self.token()

    async def _until(self, model: Model, target: Target, states: set[State],
                     failures: int | None = None) -> None:
        """Ask for `target` and wait until the model is in one of `states`."""
        if failures is None:
            failures = model.failures
        model.want(target)
        deadline = time.monotonic() + self.load_timeout
        # A model being moved to other GPUs is ready only once it runs there.
        while model.state not in states or (target is Target.ready and model.moving):
            if model.failures != failures:
                raise Conflict(f"model '{model.spec.id}' failed: "
                               f"{self.scrub(model.last_error or '')}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ModelNotReady(f"model '{model.spec.id}' is still {model.state}",
                                    retry_after=5)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(model.changed(), min(left, 1.0))
        if model.state is State.failed and target is Target.ready:
            raise Conflict(f"model '{model.spec.id}' failed: {self.scrub(model.last_error or '')}")

    def validate_spec(self, model_id: str, data: dict[str, Any]) -> ModelSpec:
        """A spec from the admin API, validated like the models file (400 names the field),
        then held to what the API may set (`admin_policy.check_code`) unless the operator
        allows code through the API (settings.admin_allow_code)."""
        data = {**data}
        data.setdefault("id", model_id)
        if data["id"] != model_id:
            raise InvalidRequest(f"the body's id '{data['id']}' differs from the path's "
                                 f"'{model_id}'", param="id")
        try:
            spec = ModelSpec.model_validate(data)
        except ValidationError as exc:
            details, field = validation_message(exc.errors(), drop=UNION_TAGS, whole="spec")
            raise InvalidRequest(f"invalid model spec: {self.scrub(details)}",
                                 param=field) from None
        if not self.settings.admin_allow_code:
            check_code(spec)
        return spec

    async def put_model(self, spec: ModelSpec) -> dict[str, Any]:
        """Add a model or change one (a declared one too, until the models file changes
        it); a loaded model whose spec changes is updated blue-green (module docstring).
        The change is committed first; a failed write changes nothing (503)."""
        async with self._changes:
            existing = self.catalog.get(spec.id)
            if existing is not None and existing.id != spec.id:
                raise Conflict(f"'{spec.id}' is an alias of model '{existing.id}'")
            for name in spec.names:
                owner = self.catalog.get(name)
                if owner is not None and owner.id != spec.id:
                    raise Conflict(f"name '{name}' is already used by model '{owner.id}'")
            if existing is not None:
                spec = keep_secrets(existing, spec, self.persistence.locked.get(spec.id))
                # An update being watched ends first (its outcome is recorded before this).
                await self.rollouts.settle(spec.id)
            url = remote_url(spec)
            if url is not None:
                await self.remote_policy.check(url)
            # A model of the models file (or a built-in one) stays the file's: the change
            # lasts until the file changes its entry (a reload) or the gateway restarts.
            api = existing is None or existing.id in self.api_models
            body, actor = spec_json(spec), acting.get()
            await self._commit(spec.id, spec_secrets(spec) if api else None,
                               lambda store: store.upsert_model(
                                   body, spec.id, source="api" if api else "file",
                                   actor=actor))
            if api:
                self.api_models.add(spec.id)
            self._refresh_secrets(spec)
            try:
                if existing is None:
                    return self.card(await self.registry.put(spec))
                return self._updated(await self.rollouts.update(spec))
            except ValueError as exc:  # cannot happen: the names were checked above
                raise Conflict(str(exc)) from None
            finally:
                self._refresh_secrets()

    def _updated(self, rollout: Rollout) -> dict[str, Any]:
        """The answer to an update: the card with its rollout, or 409 when rolled back."""
        if rollout.rolled_back:
            raise RolledBack(f"the update of model '{rollout.model}' was rolled back: "
                             f"{self.scrub(rollout.reason or '')}")
        return self.card(self.registry.models[rollout.model])

    def _rollout_step(self, rollout: Rollout) -> None:
        self.events.publish("rollout", **rollout.as_dict())

    async def _rolled_back(self, rollout: Rollout, spec: ModelSpec) -> None:
        """A failed update restored `spec`: recorded as a rollback revision, with why."""
        api = spec.id in self.api_models
        body, reason = spec_json(spec), rollout.reason or "the update failed"
        await self._commit(spec.id, spec_secrets(spec) if api else None,
                           lambda store: store.upsert_model(
                               body, spec.id, source="api" if api else "file",
                               actor="rollout", rollback=reason))
        self._refresh_secrets()

    async def rollback(self, model_id: str, version: int | None) -> dict[str, Any]:
        """Serve an earlier version's spec again (default: the one before the current
        spec), through the same blue-green path as any update."""
        async with self._changes:
            await self.rollouts.settle(self.model(model_id).spec.id)
            current = self.model(model_id).spec
            rows = await self.persistence.now(lambda store: store.history(current.id))
            try:
                number, spec = earlier_spec(rows, current, version)
            except NoSuchVersion as exc:
                raise NotFound(str(exc), param="version") from None
            except NotServable as exc:
                raise Conflict(str(exc)) from None
            for name in spec.names:
                owner = self.catalog.get(name)
                if owner is not None and owner.id != spec.id:
                    raise Conflict(f"name '{name}' is now used by model '{owner.id}'")
            api = spec.id in self.api_models
            body, actor = spec_json(spec), acting.get()
            await self._commit(spec.id, spec_secrets(spec) if api else None,
                               lambda store: store.upsert_model(
                                   body, spec.id, source="api" if api else "file",
                                   actor=actor,
                                   rollback=f"rollback to version {number}, asked"))
            self._refresh_secrets(spec)
            try:
                return self._updated(await self.rollouts.update(spec))
            finally:
                self._refresh_secrets()

    async def reload(self) -> dict[str, Any]:
        """Read the models file again and apply what changed in it (`registry.reload`):
        nothing at all when it is invalid (400 `invalid_models_file`, logged)."""
        path = self.settings.config_file
        try:
            models_file = await asyncio.to_thread(load_models_file, path) \
                if path is not None else ModelsFile()
            declared = Catalog.build(models_file).models
            async with self._changes:
                def todo() -> ReloadPlan:
                    current = {m.spec.id: m.spec for m in self.registry.models.values()}
                    return plan(self.file_specs, declared, current, self.api_models)

                # Updates being watched of the models to change end first (their outcome
                # recorded before this reload's changes); the plan is made again after them,
                # since a settled update may have changed what is current.
                first = todo()
                for model_id in [*(s.id for s in first.changed), *first.removed]:
                    await self.rollouts.settle(model_id)
                return await self._apply(todo(), declared)
        except (ConfigError, ReloadError) as exc:
            log.error("reload: the models file is not applied, nothing changed: %s", exc)
            raise InvalidRequest(f"the models file was not applied, nothing changed: {exc}",
                                 code="invalid_models_file") from None

    async def _apply(self, todo: ReloadPlan, declared: tuple[ModelSpec, ...]
                     ) -> dict[str, Any]:
        specs = [*todo.added, *todo.changed]

        def write(store: Any) -> None:
            for spec in specs:
                store.upsert_model(spec_json(spec), spec.id, source="file",
                                   actor="config-file")
            for model_id in todo.removed:
                store.delete_model(model_id, actor="config-file")

        try:
            await self.persistence.now(write)
        except Exception as exc:
            log.error("reload: could not record the models file: %s", self.scrub(str(exc)))
            raise NotSaved("the models file could not be recorded in the state database, so "
                           "it was not applied; retry later", retry_after=5) from None
        self._refresh_secrets(*specs)
        for model_id in todo.taken_over:
            self.api_models.discard(model_id)
        for model_id in todo.removed:
            await self.registry.remove(model_id)
        for spec in todo.added:
            await self.registry.put(spec)
        self.file_specs = {spec.id: spec for spec in declared}
        outcomes = await asyncio.gather(*(self.rollouts.update(s) for s in todo.changed),
                                        return_exceptions=True)
        self._refresh_secrets()
        rollouts = []
        for spec, outcome in zip(todo.changed, outcomes, strict=True):
            if isinstance(outcome, BaseException):  # a bug: the other models go on
                log.error("reload: the update of model %s failed", spec.id, exc_info=outcome)
                outcome = Rollout(spec.id, state="rolled_back", reason=f"internal error: "
                                  f"{type(outcome).__name__}", finished_at=time.time())
            rollouts.append(outcome)
        result = {"added": [s.id for s in todo.added], "removed": todo.removed,
                  "unchanged": todo.unchanged,
                  "changed": {r.model: self.scrub.value(r.as_dict()) for r in rollouts}}
        log.info("reload: %d added, %d changed (%d rolled back), %d removed, %d unchanged",
                 len(todo.added), len(rollouts), sum(r.rolled_back for r in rollouts),
                 len(todo.removed), len(todo.unchanged))
        return result

    async def delete_model(self, model_id: str) -> None:
        """Remove a model added through the API, once the deletion is committed."""
        async with self._changes:
            model = self.model(model_id)
            if model.spec.id != model_id:
                raise NotFound(f"'{model_id}' is an alias; delete model '{model.spec.id}'")
            if model_id not in self.api_models:
                raise Conflict(f"model '{model_id}' is declared in the models file or built "
                               "in; remove it there")
            actor = acting.get()
            await self._commit(model_id, None,
                               lambda store: store.delete_model(model_id, actor=actor))
            await self.rollouts.settle(model_id)
            await self.registry.remove(model_id)
            self.api_models.discard(model_id)
            self._refresh_secrets()

    async def _commit(self, model_id: str, secrets: dict[str, str] | None,
                      write: Any) -> None:
        try:
            await self.persistence.commit(model_id, secrets, write)
        except Exception as exc:
            log.error("could not record the change of model %s: %s: %s", model_id,
                      type(exc).__name__, self.scrub(str(exc)))
            raise NotSaved(f"the change of model '{model_id}' could not be recorded in the "
                           "state database, so it was not made; retry later (the gateway's "
                           "log says why)", retry_after=5) from None
