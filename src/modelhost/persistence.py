"""What the gateway remembers across restarts (DESIGN §5), kept in the state database.

* Specs: the models file's and the built-in models are recorded (actor `config-file`); models
  added or changed through the admin API (source `api`) are restored at start. An id declared
  in the models file belongs to the file (the API refuses to change it, and a file that
  comes to declare an API model's id takes it over). Every change is a new revision.
* Desired states: a model that starts is recorded `loaded` (with the GPUs asked for), one
  that is unloaded (admin or idle TTL) `unloaded`; a shutdown changes nothing. At start,
  models recorded `loaded` are loaded again.

* Secrets (`redaction`): the database holds specs with their secrets replaced by `***`
  (a remote server's key, URL credentials, `env` values, secret engine arguments); the values
  of the models added through the API are kept by `secretkeeper.Keeper`: in `secrets.json`
  in the data folder (a file of mode 0600 written whole), or, with a secret key
  (`MODELHOST_SECRET_KEY`), sealed in the database for every gateway; they are put back into
  the specs when they are restored. The models file's own secrets stay in the models file.
* Durability: a change asked through the admin API (`commit`) is written before the answer,
  in order after the queued writes, and its failure is raised to the caller; the other
  writes (desired states, download progress) are queued (`later`) and a failure is logged.

Database calls are synchronous and short; they run in a thread, in order, from one writer
task, so the event loop never waits on the disk and writes never reorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr, ValidationError

from modelhost.admin_policy import remote_url
from modelhost.config import UNION_TAGS, ModelSpec
from modelhost.db.rows import ModelRow
from modelhost.db.store import Store
from modelhost.db.workers import spec_version
from modelhost.errors import InvalidRequest, validation_message
from modelhost.redaction import MASK, restore_masked, split_spec
from modelhost.sealing import Sealer
from modelhost.secretkeeper import Keeper, SecretFile, SpecSecrets

__all__ = ["Persistence", "SecretFile", "keep_secrets", "spec_dict", "spec_json",
           "spec_secrets"]

log = logging.getLogger(__name__)

# How long a change asked through the admin API waits for another writer's lock (another
# gateway process, the CLI) before it fails with 503; background writes wait longer.
COMMIT_WAIT_S = 5.0


class Persistence:
    def __init__(self, url: str, secrets: SecretFile | None = None) -> None:
        self.url = url
        self.secrets = secrets
        self.sealer: Sealer | None = None
        # Why the models whose secrets this gateway cannot get cannot be served here, by id
        # (`secretkeeper`); their start fails with it (`ModelContext.locked`).
        self.locked: dict[str, str] = {}
        self.store: Store | None = None
        self._queue: asyncio.Queue[Callable[[Store], Any]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        # This gateway's id among several sharing PostgreSQL (`cluster.member`): its spec
        # changes then notify the others. None: alone (SQLite).
        self.origin: str | None = None

    def keep_secrets(self, file: Path, key: SecretStr | None,
                     fallbacks: tuple[str, ...] = ()) -> None:
        """Where the secrets of the API's models go: `file` (unless one was given), or,
        with a secret key, sealed into the database (`secretkeeper`; `fallbacks`: earlier
        keys, whose values are sealed again with `key` at start)."""
        if self.secrets is None:
            self.secrets = SecretFile(file)
        if key is not None:
            self.sealer = Sealer(key.get_secret_value(), fallbacks)
            log.info("secrets of models added through the API are sealed in the state "
                     "database (secret key id %s)", self.sealer.key_id)

    @property
    def keeper(self) -> Keeper:
        return Keeper(self.secrets, self.sealer)

    async def open(self) -> Store:
        store = await asyncio.to_thread(Store.open, self.url)
        store.origin = self.origin
        await asyncio.to_thread(store.migrate)
        self.store = store
        self._writer = asyncio.create_task(self._write_loop(), name="db-writer")
        return store

    async def close(self) -> None:
        if self._writer is not None:
            await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self.store is not None:
            self.store.close()

    def later(self, write: Callable[[Store], Any]) -> None:
        """Queue a write; it runs after every write queued before it."""
        self._queue.put_nowait(write)

    async def commit(self, model_id: str, secrets: dict[str, str] | None,
                     write: Callable[[Store], Any]) -> Any:
        """Record a model's secrets (`spec_secrets`: those of the spec `write` stores) and
        run `write`, after the queued writes; durable when it returns. Raises what failed,
        and then neither is changed (the secrets are put back as they were)."""
        assert self.store is not None
        await self._queue.join()
        keeper = self.keeper

        def run(store: Store) -> Any:
            store = store.waiting_at_most(COMMIT_WAIT_S)
            before = keeper.snapshot(store, model_id)
            keeper.put(store, model_id, secrets, before)
            try:
                return write(store)
            except BaseException:
                try:
                    keeper.restore(store, model_id, before)
                except Exception:
                    log.exception("could not restore the secrets of model %s", model_id)
                raise

        result = await asyncio.to_thread(run, self.store)
        self.locked.pop(model_id, None)  # this gateway gave them (`keep_secrets`)
        return result

    async def now(self, call: Callable[[Store], Any]) -> Any:
        """Run a call after the queued writes, and return its result."""
        assert self.store is not None
        await self._queue.join()
        return await asyncio.to_thread(call, self.store)

    async def at_once(self, call: Callable[[Store], Any]) -> Any:
        """Run a short call in a thread now, not after the queued writes (the dashboard's
        sessions, which none of them touch), and return its result."""
        assert self.store is not None
        return await asyncio.to_thread(call, self.store)

    async def _write_loop(self) -> None:
        assert self.store is not None
        while True:
            write = await self._queue.get()
            try:
                await asyncio.to_thread(write, self.store)
            except Exception:  # a failed write is logged; the gateway keeps serving
                log.exception("state database write failed")
            finally:
                self._queue.task_done()

    async def move_secrets_out(self) -> int:
        """Specs stored with secrets in clear (by a modelhost before 0.x, or by hand): the
        current API models' secrets go to the secrets file (or are sealed), and every
        stored spec, current and past, is rewritten with `***`. With a secret key, the
        secrets file's entries are then sealed into the database (`Keeper.move_file_in`).
        Returns how many specs were rewritten."""
        keeper = self.keeper

        def run(store: Store) -> int:
            found = {row.model_id: split_spec(row.spec())[1]
                     for row in store.models() if row.source == "api"}
            found = {k: v for k, v in found.items() if v}
            if found and keeper.sealer is None:
                for model_id, secrets in found.items():
                    keeper.file.set(model_id, {**keeper.file.get(model_id), **secrets})

            def rewrite(model_id: str, text: str) -> str:
                data = json.loads(text)
                return json.dumps(split_spec(data)[0] if isinstance(data, dict) else data)

            changed = store.rewrite_specs(rewrite)
            if found and keeper.sealer is not None:
                keeper.move_in(store, found)
            keeper.move_file_in(store)
            keeper.reseal(store)
            return changed

        try:
            changed: int = await self.now(run)
        except (OSError, ValueError) as exc:  # a broken secrets file: keep them where they are
            log.error("cannot move the secrets stored in the database out of it: %s", exc)
            return 0
        if changed:
            log.warning("the state database held %d spec(s) with secrets in clear: moved "
                        "to %s", changed, "sealed rows" if keeper.sealer is not None
                        else keeper.file.path)
        return changed

    async def record_specs(self, specs: list[ModelSpec], actor: str, source: str) -> None:
        def write(store: Store) -> None:
            for spec in specs:
                store.upsert_model(spec_json(spec), spec.id, source=source, actor=actor)

        await self.now(write)

    async def api_specs(self) -> list[ModelSpec]:
        """Models added or changed through the API, still valid with this version (with
        their secrets put back, or `locked` when this gateway cannot get them)."""
        rows = await self.now(lambda store: store.models())
        specs = []
        for row in rows:
            if row.source != "api":
                continue
            data = await self.stored_spec(row)
            try:
                specs.append(ModelSpec.model_validate(data))
            except ValidationError as exc:
                problems, _ = validation_message(exc.errors(), drop=UNION_TAGS, whole="spec")
                log.error("stored spec of model %s is no longer valid, skipped: %s",
                          row.model_id, problems)
        return specs

    async def stored_spec(self, row: ModelRow) -> dict[str, Any]:
        """A stored model's spec, with its secrets put back where this
        gateway can get them; else with `***`, and the reason in `locked` (logged)."""
        keeper = self.keeper
        try:
            data, reason = await self.now(lambda store: keeper.spec_of(store, row))
        except (OSError, ValueError) as exc:
            data, reason = row.spec(), f"its secrets cannot be read: {exc}"
        if reason is None:
            self.locked.pop(row.model_id, None)
        elif self.locked.get(row.model_id) != reason:
            self.locked[row.model_id] = reason
            log.error("model %s cannot be served by this gateway: %s", row.model_id, reason)
        return dict(data)


def keep_secrets(existing: ModelSpec, spec: ModelSpec, locked: str | None) -> ModelSpec:
    """A `***` sent back in place of a secret (a card's spec, changed and PUT again) keeps
    the stored secret; a remote's only while its URL names the same server, so that a
    stored key is never sent to another one. A model whose secrets this gateway does not
    have (`locked`, why) needs them given again."""
    data = spec_dict(spec)
    restored = restore_masked(data, spec_secrets(existing))
    if locked is not None and MASK in json.dumps(restored):
        raise InvalidRequest(f"model '{spec.id}': {locked}; give its secrets again instead "
                             "of '***'", param="spec", code="secrets_unavailable")
    if restored == data:
        return spec
    old, new = remote_url(existing), remote_url(spec)
    if new is not None and (old is None or _origin(old) != _origin(new)):
        raise InvalidRequest("the remote URL names another server: give its key (and "
                             "credentials) again instead of '***'", param="source.api_key")
    return ModelSpec.model_validate(restored)


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", exclude_defaults=True)


def spec_json(spec: ModelSpec) -> str:
    """The spec as stored in the database: its secrets replaced by `***`."""
    return json.dumps(split_spec(spec_dict(spec))[0], sort_keys=True)


def spec_secrets(spec: ModelSpec) -> SpecSecrets:
    """The secrets that `spec_json` leaves out, by place (with the version of that JSON)."""
    public, secrets = split_spec(spec_dict(spec))
    text = json.dumps(public, sort_keys=True)
    return SpecSecrets(secrets, spec_version(text, spec.id))
