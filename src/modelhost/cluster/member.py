"""One gateway's part among several sharing a PostgreSQL database (`modelhost.cluster`).

Made only when the state database is not SQLite (`Member.wanted`). It names the gateway
(`gateway_id`: host, process id and a random suffix, unique across restarts), holds its
advisory locks (`locks`), listens to the others' changes (`notify`), checks its lock
session every second (`HEARTBEAT_S`: a broken session has lost its locks, and the workers
it guarded are stopped), and reads and writes the `model_workers` table through the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Final

from sqlalchemy.engine import make_url

from modelhost.catalog import hub_snapshot_path
from modelhost.cluster.locks import AdvisoryLocks, lock_key
from modelhost.cluster.notify import ChangeListener, OnChange
from modelhost.config import HubSource
from modelhost.db.engine import is_sqlite
from modelhost.db.store import Store
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
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._listener is not None:
            await asyncio.to_thread(self._listener.stop)
        await asyncio.to_thread(self.locks.close)

    def _heard(self, change: tuple[str, str] | None) -> None:
        if change is not None and change[1] == self.gateway_id:
            return  # this gateway's own change: already applied
        if self.on_change is not None:
            self.on_change(change)

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
