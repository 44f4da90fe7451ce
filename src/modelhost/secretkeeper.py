"""Where the secrets of the models added through the admin API are kept, and how a gateway
gets them back (docs/configuration.md, "Secret key"; docs/scale-out.md).

The state database holds specs with `***` in place of their secrets (`redaction`). The
values are kept, by place (`"source.api_key"`), in one of two ways:

* **No secret key** (`MODELHOST_SECRET_KEY` unset; the default): in `secrets.json` in the
  gateway's data folder (`SecretFile`), as before. Only that gateway knows them.
* **A secret key**: sealed (`sealing`, AES-256-GCM) in the `model_secrets` table, one value
  per model, so that every gateway with the same key serves the model, on SQLite (one
  gateway, its secrets now surviving the loss of the data folder's file) as on PostgreSQL.
  At the first start with a key, the entries of `secrets.json` move to the table and the
  file is deleted (an entry whose model already has sealed secrets is dropped: the table's
  are those every gateway serves).

A sealed value holds the secrets by the version of the spec they belong to
(`db.workers.spec_version` of the stored, masked spec): `{"versions": {version: secrets}}`,
the version being written and the one stored until that write commits. The secrets are
written before the spec, so a gateway reading a model at any moment finds the secrets of
the spec it reads, never a new key beside an old URL. A change of the secrets alone leaves
the stored spec (and its version) as it was, and notifies the other gateways itself.

A stored spec whose secrets this gateway cannot get (no key, another key, a value changed
in the database, a file that never held them) is served with `***` nowhere: the model is
listed, and its start fails with the reason (`Persistence.locked`), which is also logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from modelhost.db.rows import ModelRow
from modelhost.db.store import Store
from modelhost.db.workers import spec_version
from modelhost.redaction import MASK, merge_spec
from modelhost.sealing import Sealer, SealError

log = logging.getLogger(__name__)

NO_KEY = ("its secrets are sealed in the state database with a MODELHOST_SECRET_KEY, and "
          "this gateway has none: give it the same key as the others")
NOT_HERE = ("its secrets are not known to this gateway: without MODELHOST_SECRET_KEY they are "
            "kept in secrets.json of the gateway it was added through; set the same key on "
            "every gateway (and add the model again, or restart that gateway) to share them")


class SpecSecrets(dict[str, str]):
    """A spec's secrets by place, with the version of the spec they belong to (what
    `Keeper.put` seals them under)."""

    def __init__(self, values: dict[str, str], version: str) -> None:
        super().__init__(values)
        self.version = version


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
            data[model_id] = dict(secrets)
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


class Keeper:
    """The secrets of the API's models: in `file`, or sealed with `sealer` in the table.
    Every method is synchronous and takes the store: call it in a thread."""

    def __init__(self, file: SecretFile | None, sealer: Sealer | None) -> None:
        self.file = file if file is not None else _NoFile()
        self.sealer = sealer

    # -- reading ---------------------------------------------------------------------

    def spec_of(self, store: Store, row: ModelRow) -> tuple[dict[str, Any], str | None]:
        """A stored spec with its secrets put back, and why they could not all be (None:
        they were, or it has none). Raises OSError or ValueError for a broken file."""
        public = row.spec()
        if MASK not in row.spec_json:
            return public, None
        sealed = store.sealed_secrets(row.model_id).get(row.model_id)
        reason: str | None
        if self.sealer is not None:
            if sealed is None:
                found, reason = self.file.get(row.model_id), (
                    "its secrets are in neither the state database nor this gateway's "
                    "secrets.json: PUT the model again with them")
            else:
                found, reason = self._open_version(row, sealed)
        else:
            found, reason = self.file.get(row.model_id), NO_KEY if sealed else NOT_HERE
        spec = merge_spec(public, found)
        if MASK not in json.dumps(spec):
            return spec, None
        return public, reason or ("some of its secrets are not known here: PUT the model "
                                  "again with them")

    def _open_version(self, row: ModelRow, sealed: str) -> tuple[dict[str, str], str | None]:
        assert self.sealer is not None
        try:
            versions = _versions(self.sealer.open(row.model_id, sealed))
        except SealError as exc:
            return {}, (f"its secrets in the state database cannot be opened with this "
                        f"gateway's MODELHOST_SECRET_KEY: {exc}")
        found = versions.get(spec_version(row.spec_json, row.model_id))
        if found is None:
            return {}, ("the state database holds its secrets for another version of its "
                        "spec only: PUT the model again with them")
        return found, None

    # -- writing ---------------------------------------------------------------------

    def snapshot(self, store: Store, model_id: str) -> object:
        """What `restore` puts back if a change fails."""
        if self.sealer is None:
            return self.file.get(model_id)
        return store.sealed_secrets(model_id).get(model_id)

    def restore(self, store: Store, model_id: str, snapshot: object) -> None:
        if self.sealer is None:
            assert isinstance(snapshot, dict)
            self.file.set(model_id, snapshot)
        else:  # the others may have read what `put` wrote: they read the model again
            assert snapshot is None or isinstance(snapshot, str)
            store.put_sealed_secrets(model_id, snapshot, notify=True)

    def put(self, store: Store, model_id: str, secrets: dict[str, str] | None,
            before: object) -> None:
        """Record the secrets of the spec about to be stored (None or {}: it has none; None
        also for a model that leaves the API: deleted, or taken over by the models file).
        `before`: `snapshot`'s."""
        if self.sealer is None:
            if before != (secrets or {}):
                self.file.set(model_id, secrets)
            return
        assert before is None or isinstance(before, str)
        current = store.current_version(model_id)
        versions: dict[str, dict[str, str]] = {}
        if secrets is not None and before is not None and current is not None:
            with contextlib.suppress(SealError):  # another key's: the new spec replaces it
                old = _versions(self.sealer.open(model_id, before)).get(current)
                if old:
                    versions[current] = old
        version = secrets.version if isinstance(secrets, SpecSecrets) else None
        if secrets and version is not None:
            versions[version] = dict(secrets)
        elif secrets:  # no version: the stored spec's (a migration)
            versions = {current or "": dict(secrets)}
        if versions == self._opened(model_id, before):
            return
        sealed = self.sealer.seal(model_id, {"versions": versions}) if versions else None
        # A change of the secrets alone: the spec's write changes nothing, and so tells
        # the other gateways nothing.
        store.put_sealed_secrets(model_id, sealed, notify=version is not None
                                 and version == current)

    def _opened(self, model_id: str, sealed: object) -> dict[str, dict[str, str]] | None:
        if not isinstance(sealed, str) or self.sealer is None:
            return {} if sealed is None else None
        try:
            return _versions(self.sealer.open(model_id, sealed))
        except SealError:
            return None

    def move_in(self, store: Store, found: dict[str, dict[str, str]]) -> int:
        """Seal secrets found elsewhere (specs stored in clear, `secrets.json`) under the
        version of each model's stored spec, where the table holds none for it yet; returns
        how many models' secrets moved."""
        assert self.sealer is not None
        held = store.sealed_secrets()
        moved = 0
        for model_id, secrets in found.items():
            if model_id in held:
                log.warning("model %s: the secrets found in secrets.json (or in a spec "
                            "stored in clear) are dropped: the state database already holds "
                            "sealed ones", model_id)
                continue
            version = store.current_version(model_id)
            if version is None or not secrets:
                continue  # a model deleted since
            store.put_sealed_secrets(model_id, self.sealer.seal(
                model_id, {"versions": {version: secrets}}))
            moved += 1
        return moved

    def reseal(self, store: Store) -> int:
        """At start: the values sealed with a fallback key (an earlier one) are sealed again
        with the key; returns how many."""
        if self.sealer is None:
            return 0
        done = 0
        for model_id, sealed in store.sealed_secrets().items():
            if not self.sealer.sealed_with_fallback(sealed):
                continue
            try:
                value = self.sealer.open(model_id, sealed)
            except SealError as exc:
                log.error("model %s: its sealed secrets cannot be sealed again with the "
                          "new key: %s", model_id, exc)
                continue
            store.put_sealed_secrets(model_id, self.sealer.seal(model_id, value))
            done += 1
        if done:
            log.warning("the secrets of %d model(s) were sealed with an earlier key "
                        "(MODELHOST_SECRET_KEY_FALLBACKS): sealed again with the secret key "
                        "(id %s)", done, self.sealer.key_id)
        return done

    def move_file_in(self, store: Store) -> int:
        """At start with a key: the entries of `secrets.json` go to the table, then the file
        is deleted. Returns how many models' secrets moved."""
        if self.sealer is None or not self.file.path.exists():
            return 0
        moved = self.move_in(store, self.file.load())
        self.file.path.unlink()
        log.warning("the secrets of %d model(s) kept in %s are now sealed in the state "
                    "database (MODELHOST_SECRET_KEY); the file is deleted", moved,
                    self.file.path)
        return moved


class _NoFile(SecretFile):
    """No secrets file (a store opened without a gateway): nothing kept, nothing found."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent/secrets.json"))

    def load(self) -> dict[str, dict[str, str]]:
        return {}

    def set(self, model_id: str, secrets: dict[str, str] | None) -> None:
        return None


def _versions(value: object) -> dict[str, dict[str, str]]:
    versions = value.get("versions") if isinstance(value, dict) else None
    if not isinstance(versions, dict):
        raise SealError("the sealed value holds no secrets by version")
    return {str(v): {str(p): str(s) for p, s in dict(found).items()}
            for v, found in versions.items() if isinstance(found, dict)}
