"""Downloads as the gateway runs them: the Downloader (`downloads`) fed by the lifecycle,
its progress kept in the state database, pushed to the admin event stream and handed to the
model whose download it is (through the callback its owner gives, never by writing it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, cast

from modelhost.config import HubSource
from modelhost.db.store import Store
from modelhost.downloads import Downloader, DownloadJob, JobState
from modelhost.events import EventBus
from modelhost.persistence import Persistence
from modelhost.registry.model import DownloadCancelled, Progress

log = logging.getLogger(__name__)

DownloadState = Literal["queued", "running", "completed", "failed", "cancelled"]
FINAL = ("completed", "failed", "cancelled")


class DownloadFailed(Exception):
    """The download failed; the message says what to do."""


class HubService:
    def __init__(self, downloader: Downloader, persistence: Persistence, events: EventBus
                 ) -> None:
        self.downloader = downloader
        self.persistence = persistence
        self.events = events
        self._records: dict[str, int] = {}  # model id -> its running download's record
        downloader.subscribe(self._progress)

    async def download(self, model_id: str, source: HubSource, progress: Progress) -> Path:
        """The lifecycle's download step (ModelContext.download): fetch `source` for
        `model_id`, telling `progress` each step; the snapshot's folder once complete."""

        def mine(job: DownloadJob) -> None:
            if job.model_id == model_id:
                progress(job.to_dict())

        unsubscribe = self.downloader.subscribe(mine)
        try:
            progress((await self.downloader.start(model_id, source)).to_dict())
            job = await self.downloader.wait(model_id)
        finally:
            unsubscribe()
        if job.state is JobState.completed and job.snapshot:
            return Path(job.snapshot)
        if job.state is JobState.cancelled:
            raise DownloadCancelled(job.error or "cancelled")
        raise DownloadFailed(job.error or f"download {job.state}")

    def _progress(self, job: DownloadJob) -> None:
        data = job.to_dict()
        self.events.publish("download", model=job.model_id, **{
            k: v for k, v in data.items() if k != "model_id"})
        self._record(job)

    def _record(self, job: DownloadJob) -> None:
        if self.persistence.store is None:
            return
        model_id, state = job.model_id, cast(DownloadState, str(job.state))
        done, total, error = job.bytes_done, job.bytes_total, job.error
        if model_id not in self._records:
            if job.state not in (JobState.queued, JobState.running):
                return
            patterns = job.patterns

            def create(store: Store) -> None:
                # Reuse the record of an interrupted download of the same model, if any.
                old = [d for d in store.interrupted_downloads() if d.model_id == model_id]
                self._records[model_id] = old[0].id if old else store.create_download(
                    model_id, job.repo, job.revision, patterns, total)

            self._records[model_id] = -1  # creation queued
            self.persistence.later(create)

        def update(store: Store) -> None:
            record = self._records.get(model_id, -1)
            if record >= 0:
                store.update_download(record, state=state, bytes_done=done,
                                      bytes_total=total, error=error)
            if state in FINAL:
                self._records.pop(model_id, None)

        self.persistence.later(update)

    async def interrupted(self) -> list[str]:
        """Models whose download was running when the gateway stopped (to resume them)."""
        rows = await self.persistence.now(lambda store: store.interrupted_downloads())
        return sorted({row.model_id for row in rows})

    def cache(self) -> dict[str, Any]:
        repos = self.downloader.scan()
        return {"cache_dir": str(self.downloader.cache_dir), "repos": [
            {"repo": r.repo, "size_bytes": r.size_bytes, "complete": r.complete,
             "incomplete_bytes": r.incomplete_bytes, "revisions": [
                 getattr(rev, "commit", str(rev)) for rev in r.revisions]} for r in repos]}
