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
  of the models added through the API are kept in `secrets.json` in the data folder, a file
  of mode 0600 written whole (temporary file, fsync, rename), and put back into the specs
  when they are restored at start. The models file's own secrets stay in the models file.
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
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from modelhost.config import UNION_TAGS, ModelSpec
from modelhost.db.store import Store
from modelhost.errors import validation_message
from modelhost.redaction import merge_spec, split_spec

log = logging.getLogger(__name__)

# How long a change asked through the admin API waits for another writer's lock (another
# gateway process, the CLI) before it fails with 503; background writes wait longer.
COMMIT_WAIT_S = 5.0


class SecretFile:
    """The secrets of the models added through the API: {model id: {place: value}}, in a
    JSON file of mode 0600 (its folder 0700 when created here)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        if not isinstance(data, dict):
            raise ValueError(f"{self.path} is not a JSON object")
        return {str(k): {str(p): str(v) for p, v in dict(v).items()} for k, v in data.items()}

    def get(self, model_id: str) -> dict[str, str]:
        return self.load().get(model_id, {})

    def set(self, model_id: str, secrets: dict[str, str] | None) -> None:
        """Record (or with None or {}, forget) a model's secrets; durable on return."""
        data = self.load()
        if secrets:
            data[model_id] = secrets
        elif model_id in data:
            del data[model_id]
        else:
            return
        self._write(data)

    def _write(self, data: dict[str, dict[str, str]]) -> None:
        folder = self.path.parent
        if not folder.is_dir():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:  # mkstemp: mode 0600
                json.dump(data, out, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


class Persistence:
    def __init__(self, url: str, secrets: SecretFile | None = None) -> None:
        self.url = url
        self.secrets = secrets
        self.store: Store | None = None
        self._queue: asyncio.Queue[Callable[[Store], Any]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        # This gateway's id among several sharing PostgreSQL (`cluster.member`): its spec
        # changes then notify the others. None: alone (SQLite).
        self.origin: str | None = None

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
        """Record a model's secrets and run `write`, after the queued writes; durable when
        it returns. Raises what failed, and then neither is changed (the secrets are put back
        as they were)."""
        assert self.store is not None
        await self._queue.join()
        file = self.secrets

        def run(store: Store) -> Any:
            before = file.get(model_id) if file is not None else {}
            if file is not None and before != (secrets or {}):
                file.set(model_id, secrets)
            try:
                return write(store.waiting_at_most(COMMIT_WAIT_S))
            except BaseException:
                if file is not None and before != (secrets or {}):
                    try:
                        file.set(model_id, before)
                    except OSError:
                        log.exception("could not restore the secrets of model %s", model_id)
                raise

        return await asyncio.to_thread(run, self.store)

    async def now(self, call: Callable[[Store], Any]) -> Any:
        """Run a call after the queued writes, and return its result."""
        assert self.store is not None
        await self._queue.join()
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
        current API models' secrets go to the secrets file, and every stored spec, current
        and past, is rewritten with `***`. Returns how many specs were rewritten."""
        file = self.secrets

        def run(store: Store) -> int:
            found = {row.model_id: split_spec(row.spec())[1]
                     for row in store.models() if row.source == "api"}
            found = {k: v for k, v in found.items() if v}
            if found and file is not None:
                for model_id, secrets in found.items():
                    file.set(model_id, {**file.get(model_id), **secrets})

            def rewrite(model_id: str, text: str) -> str:
                data = json.loads(text)
                return json.dumps(split_spec(data)[0] if isinstance(data, dict) else data)

            return store.rewrite_specs(rewrite)

        try:
            changed: int = await self.now(run)
        except (OSError, ValueError) as exc:  # a broken secrets file: keep them where they are
            log.error("cannot move the secrets stored in the database out of it: %s", exc)
            return 0
        if changed:
            log.warning("the state database held %d spec(s) with secrets in clear: moved "
                        "to %s", changed, file.path if file is not None else "nowhere")
        return changed

    async def record_specs(self, specs: list[ModelSpec], actor: str, source: str) -> None:
        def write(store: Store) -> None:
            for spec in specs:
                store.upsert_model(spec_json(spec), spec.id, source=source, actor=actor)

        await self.now(write)

    async def api_specs(self) -> list[ModelSpec]:
        """Models added or changed through the admin API, still valid with this version
        (with their secrets put back)."""
        rows = await self.now(lambda store: store.models())
        file = self.secrets
        try:
            secrets = await asyncio.to_thread(file.load) if file is not None else {}
        except (OSError, ValueError) as exc:
            log.error("cannot read the secrets file: %s; models added through the API come "
                      "back without their secrets", exc)
            secrets = {}
        specs = []
        for row in rows:
            if row.source != "api":
                continue
            data = merge_spec(row.spec(), secrets.get(row.model_id, {}))
            try:
                specs.append(ModelSpec.model_validate(data))
            except ValidationError as exc:
                problems, _ = validation_message(exc.errors(), drop=UNION_TAGS, whole="spec")
                log.error("stored spec of model %s is no longer valid, skipped: %s",
                          row.model_id, problems)
        return specs


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", exclude_defaults=True)


def spec_json(spec: ModelSpec) -> str:
    """The spec as stored in the database: its secrets replaced by `***`."""
    return json.dumps(split_spec(spec_dict(spec))[0], sort_keys=True)


def spec_secrets(spec: ModelSpec) -> dict[str, str]:
    """The secrets that `spec_json` leaves out, by place."""
    return split_spec(spec_dict(spec))[1]
