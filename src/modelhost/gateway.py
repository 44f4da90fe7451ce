"""The gateway's operations on models, shared by the admin API (and through it the CLI).

Every operation goes through a model's owner (`ModelRuntime.want`), so an admin load, an
idle unload and a request can never race each other.
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

from modelhost.catalog import Catalog
from modelhost.config import HubSource, ModelSpec
from modelhost.downloads import DownloadError
from modelhost.errors import InvalidRequest, ModelhostError, ModelNotReady, NotFound
from modelhost.events import EventBus
from modelhost.hub import HubService
from modelhost.hubtoken import TokenError, delete_token, token_info, write_token
from modelhost.persistence import Persistence, spec_json
from modelhost.registry.lifecycle import State
from modelhost.registry.registry import Registry
from modelhost.registry.runtime import ModelRuntime, Target
from modelhost.settings import Settings

log = logging.getLogger(__name__)


def _redact(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec as shown to operators: a remote server's key is never returned."""
    source = spec.get("source")
    if isinstance(source, dict) and source.get("api_key"):
        spec = {**spec, "source": {**source, "api_key": "***"}}
    return spec


class Conflict(ModelhostError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


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
        registry.add_listener(self._remember_desired)

    async def start(self) -> None:
        """Open the state database, record the declared specs, restore the models added
        through the API, start the registry, then load what was loaded before."""
        p = self.persistence
        await p.open()
        await p.record_specs(list(self.catalog.models), actor="config-file", source="file")
        for spec in await p.api_specs():
            try:
                self.catalog.put(spec)
            except ValueError as exc:
                log.error("model %s added through the API clashes with the models file, "
                          "skipped: %s", spec.id, exc)
                continue
            self.api_models.add(spec.id)
        self.registry.rebuild()
        await self.registry.start()
        desired = await p.now(lambda store: store.desired_states())
        for model_id in await self.hub.interrupted():
            rt = self.registry.runtimes.get(model_id)
            if rt is not None and rt.state is State.absent:
                log.info("resuming the interrupted download of model %s", model_id)
                rt.want(Target.cached)
        for model_id, row in desired.items():
            rt = self.registry.runtimes.get(model_id)
            if rt is not None and row.desired == "loaded":
                log.info("model %s was loaded before the restart: loading it again", model_id)
                rt.gpu_override = list(row.gpu_device_ids) if row.gpu_device_ids else None
                rt.want(Target.ready)

    async def close(self) -> None:
        self.closing = True  # a shutdown is not an unload: desired states stay as they are
        await self.hub.downloader.close()  # partial files stay; the next start resumes them
        await self.registry.close()
        await self.persistence.close()

    def _remember_desired(self, rt: ModelRuntime, previous: State) -> None:
        if self.persistence.store is None or self.closing:
            return
        model_id, gpus = rt.spec.id, rt.gpu_override
        if rt.state is State.starting and previous is State.cached:
            self.persistence.later(lambda store: store.set_desired(model_id, "loaded", gpus))
        elif (rt.state is State.cached and previous is State.stopping) or \
                (rt.state is State.failed and previous is State.starting):
            # Unloaded, or its load failed: not to be loaded again at the next start.
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
                 "spec": _redact(json.loads(r.spec_json)) if r.spec_json else None}
                for r in rows]

    def gpus(self) -> dict[str, Any]:
        monitor = self.registry.gpus
        users: dict[int, list[str]] = {}
        for rt in self.registry.runtimes.values():
            for index in rt.gpus:
                users.setdefault(index, []).append(rt.spec.id)
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

    def runtime(self, model_id: str) -> ModelRuntime:
        return self.registry.runtime(model_id)

    def card(self, rt: ModelRuntime) -> dict[str, Any]:
        """Everything an operator wants to see about one model."""
        admission = self.registry.admissions[rt.spec.id]
        worker = rt.worker
        return {
            "id": rt.spec.id,
            "state": rt.state.value,
            "target": rt.target.value,
            "task": rt.spec.task.value,
            "backend": rt.spec.backend.value,
            "aliases": rt.spec.aliases,
            "gpus": rt.gpus,
            "gpu_override": rt.gpu_override,
            "last_error": rt.last_error,
            "restarts": rt.restarts,
            "active_requests": admission.active,
            "queued_requests": admission.waiting,
            "idle_seconds": round(time.monotonic() - rt.last_used, 1),
            "download": rt.download_progress,
            "usage": rt.usage,
            "worker": None if worker is None else {
                "pid": worker.pid, "port": worker.port,
                "uptime_seconds": round(time.monotonic() - worker.started_at, 1),
            },
            "spec": _redact(rt.spec.model_dump(mode="json", exclude_defaults=True)),
        }

    def cards(self) -> list[dict[str, Any]]:
        return [self.card(rt) for rt in self.registry.runtimes.values()]

    async def load(self, model_id: str, gpu_device_ids: list[int] | None,
                   wait: bool = True, reset_gpus: bool = False) -> dict[str, Any]:
        rt = self.runtime(model_id)
        if reset_gpus and rt.gpu_override is not None:
            if rt.state is State.ready:
                await self._until(rt, Target.stopped, {State.cached, State.failed})
            rt.gpu_override = None
        if gpu_device_ids is not None:
            if len(set(gpu_device_ids)) != len(gpu_device_ids) or \
                    any(g < 0 for g in gpu_device_ids):
                raise InvalidRequest("gpu_device_ids must list distinct non-negative GPU "
                                     "indices", param="gpu_device_ids")
            if rt.state is State.ready and sorted(rt.gpus) != sorted(gpu_device_ids):
                # Moving a loaded model: stop it first, then start it on the new GPUs.
                await self._until(rt, Target.stopped, {State.cached, State.failed})
            rt.gpu_override = gpu_device_ids
        failures = rt.failures
        rt.want(Target.ready)
        if wait:
            await self._until(rt, Target.ready, {State.ready}, failures)
        return self.card(rt)

    async def unload(self, model_id: str, wait: bool = True) -> dict[str, Any]:
        rt = self.runtime(model_id)
        if wait:
            await self._until(rt, Target.stopped,
                              {State.cached, State.absent, State.failed, State.downloading})
        else:
            rt.want(Target.stopped)
        return self.card(rt)

    async def download(self, model_id: str) -> dict[str, Any]:
        rt = self.runtime(model_id)
        if not isinstance(rt.spec.source, HubSource):
            raise InvalidRequest(f"model '{model_id}' has no Hugging Face source: nothing to "
                                 "download", param="model")
        if rt.state is State.absent or (rt.state is State.failed and rt.weights is None):
            rt.want(Target.cached if rt.target is Target.stopped else rt.target)
        return self.card(rt)

    async def cancel_download(self, model_id: str) -> dict[str, Any]:
        rt = self.runtime(model_id)
        current = self.hub.downloader.get(rt.spec.id)
        if current is None or not current.active:
            raise Conflict(f"model '{rt.spec.id}' has no download running")
        await self.hub.downloader.cancel(rt.spec.id)
        await rt.wait_for({State.absent, State.cached, State.failed})
        return self.card(rt)

    async def delete_cache(self, model_id: str) -> dict[str, Any]:
        rt = self.runtime(model_id)
        source = rt.spec.source
        if not isinstance(source, HubSource):
            raise InvalidRequest(f"model '{rt.spec.id}' is not in the model cache (its "
                                 "source is not a Hugging Face repository)", param="model")
        if rt.state not in (State.cached, State.absent, State.failed):
            raise Conflict(f"model '{rt.spec.id}' is {rt.state}: unload it (or cancel its "
                           "download) first")
        try:
            freed = await self.hub.downloader.delete(source.hf, None)
        except DownloadError as exc:
            raise Conflict(str(exc)) from None
        await rt.forget_weights()
        return {**self.card(rt), "freed_bytes": freed}

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

    async def _until(self, rt: ModelRuntime, target: Target, states: set[State],
                     failures: int | None = None) -> None:
        """Ask for `target` and wait until the model is in one of `states`."""
        if failures is None:
            failures = rt.failures
        rt.want(target)
        deadline = time.monotonic() + self.load_timeout
        while rt.state not in states:
            if rt.state is State.failed and rt.failures != failures:
                raise Conflict(f"model '{rt.spec.id}' failed: {rt.last_error}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ModelNotReady(f"model '{rt.spec.id}' is still {rt.state}",
                                    retry_after=5)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(rt.changed(), min(left, 1.0))
        if rt.state is State.failed and target is Target.ready:
            raise Conflict(f"model '{rt.spec.id}' failed: {rt.last_error}")

    def validate_spec(self, model_id: str, data: dict[str, Any]) -> ModelSpec:
        """A spec from the admin API, validated like the models file (400 names the field)."""
        data = {**data}
        data.setdefault("id", model_id)
        if data["id"] != model_id:
            raise InvalidRequest(f"the body's id '{data['id']}' differs from the path's "
                                 f"'{model_id}'", param="id")
        try:
            return ModelSpec.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"] if not str(p).endswith("Source"))
            details = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'] if not str(p).endswith('Source')) or 'spec'}"
                f": {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
            raise InvalidRequest(f"invalid model spec: {details}", param=field or None) \
                from None

    async def put_model(self, spec: ModelSpec) -> dict[str, Any]:
        """Add a model or change one; a loaded model whose spec changes is restarted."""
        existing = self.catalog.get(spec.id)
        if existing is not None and existing.id != spec.id:
            raise Conflict(f"'{spec.id}' is an alias of model '{existing.id}'")
        if existing is not None and existing.id not in self.api_models:
            raise Conflict(f"model '{spec.id}' is declared in the models file; change it "
                           "there (or choose another id)")
        try:
            rt = await self.registry.put(spec)
        except ValueError as exc:
            raise Conflict(str(exc)) from None
        self.api_models.add(spec.id)
        body = spec_json(spec)
        self.persistence.later(lambda store: store.upsert_model(
            body, spec.id, source="api", actor="admin-api"))
        return self.card(rt)

    async def delete_model(self, model_id: str) -> None:
        rt = self.runtime(model_id)
        if rt.spec.id != model_id:
            raise NotFound(f"'{model_id}' is an alias; delete model '{rt.spec.id}'")
        if model_id not in self.api_models:
            raise Conflict(f"model '{model_id}' is declared in the models file or built in; "
                           "remove it there")
        await self.registry.remove(model_id)
        self.api_models.discard(model_id)
        self.persistence.later(lambda store: store.delete_model(model_id, actor="admin-api"))
