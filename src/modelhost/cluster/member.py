"""One gateway's part among several sharing a PostgreSQL database (`modelhost.cluster`).

Made only when the state database is not SQLite (`Member.wanted`). It names the gateway
(`gateway_id`: host, process id and a random suffix, unique across restarts), holds its
advisory locks (`locks`), listens to the others' changes (`notify`), checks its lock
session every second (`HEARTBEAT_S`: a broken session has lost its locks, and the workers
it guarded are stopped), and reads and writes the `model_workers` table through the store.

Unloads act on every gateway (`lifecycle`): one announced here (`announce_unload`) or
heard from another gateway (`unloaded`) is remembered per model (`unloaded_after`), so that
a start already under way here does not take the model over. Notifications sent while the
listening connection was down are lost; on listening again (`_catch_up`) the stored desired
states are read, and a model whose state became `unloaded` since the last reading, with no
unload heard meanwhile, is unloaded here as if it had been heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from sqlalchemy.engine import make_url

from modelhost.catalog import hub_snapshot_path
from modelhost.cluster.locks import AdvisoryLocks, lock_key
from modelhost.cluster.notify import ChangeListener, OnChange
from modelhost.config import HubSource
from modelhost.db.engine import is_sqlite
from modelhost.db.store import Store
from modelhost.db.workers import SPEC, UNLOAD, Change
from modelhost.persistence import Persistence
from modelhost.registry.context import DownloadFn, Progress

log = logging.getLogger(__name__)

HEARTBEAT_S: Final = 1.0
# How often a gateway that waits for another's download looks whether it ended.
DOWNLOAD_POLL_S: Final = 1.0


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL (`postgresql+psycopg://...`) as libpq takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _key(model_id: str, version: str) -> int:
    return lock_key("model", f"{model_id}@{version}")


class Member:
    def __init__(self, url: str, persistence: Persistence) -> None:
        self.gateway_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.conninfo = libpq_url(url)
        self.locks = AdvisoryLocks(self.conninfo)
        self.persistence = persistence
        # A spec change this gateway commits notifies the others (`db.workers`).
        persistence.origin = self.gateway_id
        self.on_change: OnChange | None = None
        # A model unloaded on every gateway, told by another one (`lifecycle` stops it here).
        self.on_unload: Callable[[str], None] | None = None
        self._unloads: dict[str, float] = {}  # model id: when its last unload was heard
        # The desired states (model id: state, when set) read when this gateway last began
        # to listen, and when (monotonic): what `_catch_up` compares with.
        self._desired_seen: dict[str, tuple[str, str]] | None = None
        self._listened_at = 0.0
        self._catching_up: set[asyncio.Task[None]] = set()
        self._listener: ChangeListener | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._epoch_moved = asyncio.Event()

    @staticmethod
    def wanted(url: str) -> bool:
        return not is_sqlite(make_url(url))

    def _store(self) -> Store:
        store = self.persistence.store
        assert store is not None, "the state database is not open yet"
        return store

    async def start(self) -> None:
        """Listen to the other gateways' changes, then re-read every model once (what
        changed before this gateway listened), and check the lock session every second."""
        loop = asyncio.get_running_loop()
        self._listener = ChangeListener(self.conninfo, self._heard, loop)
        self._listener.start()
        await asyncio.to_thread(self._listener.listening.wait, 10)
        self._heard(None)
        self._heartbeat = asyncio.create_task(self._beat(), name="cluster-heartbeat")

    async def stop(self) -> None:
        for task in list(self._catching_up):
            task.cancel()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._listener is not None:
            await asyncio.to_thread(self._listener.stop)
        await asyncio.to_thread(self.locks.close)

    def _heard(self, change: Change | None) -> None:
        if change is not None and change.gateway == self.gateway_id:
            return  # this gateway's own change: already applied
        if change is not None and change.kind == UNLOAD:
            self.unloaded(change.model)
        elif (change is None or change.kind == SPEC) and self.on_change is not None:
            # (other kinds are a later version's)
            self.on_change(None if change is None else (change.model, change.gateway))
        if change is None:  # listening (again): what was sent meanwhile is lost
            task = asyncio.get_running_loop().create_task(self._catch_up())
            self._catching_up.add(task)
            task.add_done_callback(self._catching_up.discard)

    # -- unloads on every gateway (`lifecycle`) ---------------------------------------------

    def unloaded(self, model_id: str) -> None:
        """The model was unloaded on every gateway (another one said so, or its stored
        desired state did): remember when, and stop it here."""
        self._unloads[model_id] = time.monotonic()
        if self.on_unload is not None:
            self.on_unload(model_id)

    async def _catch_up(self) -> None:
        """Listening again: act on the unloads stored since this gateway last began to
        listen whose notifications it did not hear (sent while it did not listen)."""
        since, now = self._listened_at, time.monotonic()
        try:
            rows = await asyncio.to_thread(self._store().desired_states)
        except Exception as exc:  # the next reconnection compares with the last reading
            log.warning("could not read the models' desired states: %s", exc)
            return
        seen: dict[str, tuple[str, str]] = {
            model_id: (row.desired, row.updated_at.isoformat()) for model_id, row in rows.items()}
        before, self._desired_seen, self._listened_at = self._desired_seen, seen, now
        if before is None:
            return
        for model_id, (desired, set_at) in seen.items():
            if desired == "unloaded" and before.get(model_id) != (desired, set_at) and \
                    not self.unloaded_after(model_id, since):
                log.info("model %s was unloaded on every gateway while this one did not "
                         "listen: unloading it here", model_id)
                self.unloaded(model_id)

    def unloaded_after(self, model_id: str, since: float) -> bool:
        """Whether the model was unloaded everywhere after `since` (monotonic clock)."""
        return self._unloads.get(model_id, float("-inf")) > since

    async def hears_unload(self, model_id: str, since: float, grace: float) -> bool:
        """The stored desired state says the model was unloaded: whether that was an unload
        everywhere since `since`. Its notification was committed before any owner let the
        model go, so it is heard within `grace` (then True); not heard while this gateway
        listens, the record was a gateway's own late note of its stop, not an unload (False).
        Not listening (the connection is down), the record is believed (True)."""
        deadline = time.monotonic() + grace
        while not self.unloaded_after(model_id, since):
            listening = self._listener is not None and self._listener.listening.is_set()
            if not listening:
                self.unloaded(model_id)
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def announce_unload(self, model_id: str) -> None:
        """Record the model as unloaded and tell the others to stop it, before this
        gateway stops it: none of them then takes it over when its owner lets it go."""
        self._unloads[model_id] = time.monotonic()
        await self.persistence.now(lambda store: store.unload_everywhere(model_id))

    async def desired(self, model_id: str) -> tuple[str, str] | None:
        """The model's stored desired state and when it was set (`db.workers.desired`)."""
        return await asyncio.to_thread(self._store().desired, model_id)

    async def record_use(self, ages: dict[str, float]) -> None:
        await asyncio.to_thread(self._store().record_use, self.gateway_id, ages)

    async def idle_for(self, model_id: str) -> float | None:
        return await asyncio.to_thread(self._store().idle_for, model_id)

    async def forget_uses(self, older_than: float) -> None:
        await asyncio.to_thread(self._store().forget_uses, self.gateway_id, older_than)

    async def _beat(self) -> None:
        epoch = self.locks.epoch
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now = await asyncio.to_thread(self.locks.check)
            if now != epoch:
                epoch = now
                self._epoch_moved.set()
                self._epoch_moved = asyncio.Event()

    # -- a model's lifecycle, by version of its spec (`db.workers.spec_version`) ------------

    async def own(self, model_id: str, version: str) -> int | None:
        """Take the lock of a model's version: the epoch it was taken in, or None (another
        gateway owns it)."""
        return await asyncio.to_thread(self.locks.take, _key(model_id, version))

    async def disown(self, model_id: str, version: str, epoch: int) -> None:
        await asyncio.to_thread(self.locks.give, _key(model_id, version), epoch)

    async def owner_gone(self, model_id: str, version: str) -> bool:
        """Whether no gateway holds the lock of the model's version now."""
        return await asyncio.to_thread(self.locks.free, _key(model_id, version))

    async def until_lost(self, epoch: int) -> None:
        """Return once the locks of `epoch` are lost (the lock session broke)."""
        while self.locks.epoch == epoch:
            await self._epoch_moved.wait()

    async def publish(self, model_id: str, version: str, address: str) -> None:
        await asyncio.to_thread(self._store().publish_worker, model_id, version,
                                self.gateway_id, address)

    async def unpublish(self, model_id: str, version: str, address: str | None) -> None:
        await asyncio.to_thread(self._store().unpublish_worker, model_id, version,
                                self.gateway_id, address)

    async def clear(self, model_id: str, version: str, gateway_id: str) -> None:
        """Forget an address left by an owner that is gone."""
        await asyncio.to_thread(self._store().unpublish_worker, model_id, version, gateway_id)

    async def address(self, model_id: str, version: str) -> tuple[str, str] | None:
        return await asyncio.to_thread(self._store().worker_address, model_id, version)

    async def current_version(self, model_id: str) -> str | None:
        return await asyncio.to_thread(self._store().current_version, model_id)

    # -- downloads -------------------------------------------------------------------------

    def download(self, inner: DownloadFn, cache_dir: Path) -> DownloadFn:
        """`inner` run by one gateway at a time per model (its download lock): another
        that wants the same model waits, reported `downloading elsewhere`, then finds the
        weights in the shared cache (or, when that download failed, downloads them)."""

        async def download(model_id: str, source: HubSource, progress: Progress) -> Path:
            key = lock_key("download", model_id)
            told = False
            while (epoch := await asyncio.to_thread(self.locks.take, key)) is None:
                if not told:
                    log.info("model %s is being downloaded by another gateway: waiting",
                             model_id)
                    progress({"state": "downloading elsewhere", "model": model_id})
                    told = True
                await asyncio.sleep(DOWNLOAD_POLL_S)
            try:
                if told:
                    found = await asyncio.to_thread(hub_snapshot_path, source, cache_dir)
                    if found is not None:
                        return found
                return await inner(model_id, source, progress)
            finally:
                await asyncio.to_thread(self.locks.give, key, epoch)

        return download
