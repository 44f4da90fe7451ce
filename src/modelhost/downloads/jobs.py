"""The job manager: one download job per model, queued, followed, cancelled.

`Downloader` runs each job as an asyncio task: it waits for one of `max_jobs` slots, plans
the job (resolve the revision, list the files, check the disk) and transfers its files a few
at a time in worker threads (`fetch.Fetcher`), while a monitor turns the byte counts into
progress events with a smoothed rate and ETA. A job ends `completed`, `failed` (with the
message and kind of `errors.explain`) or `cancelled`; a cancel or a shutdown stops the
transfers at once and keeps the partial files, so the next start resumes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from modelhost.config import HubSource
from modelhost.downloads.cache import CachedRepo, delete_from_cache, scan_cache
from modelhost.downloads.errors import DownloadError, ErrorKind, explain
from modelhost.downloads.fetch import Control, Fetcher, FileTask, Plan, Stopped
from modelhost.hubtoken import mask

logger = logging.getLogger(__name__)

T = TypeVar("T")

PROGRESS_INTERVAL = 0.25  # seconds between progress events: at most 4 per second per job
RATE_TIME_CONSTANT = 3.0  # seconds; smooths the rate so the ETA does not jump around


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE_STATES = frozenset({JobState.queued, JobState.running})


@dataclass
class DownloadJob:
    """One download of one model: what the gateway persists and pushes to clients.

    `bytes_done` counts what is on disk for the expected files (complete and partial), so a
    resumed download starts where it stopped rather than at 0; `bytes_fetched` counts only
    what this job received from the network.
    """

    model_id: str
    repo: str
    revision: str
    patterns: list[str] | None
    state: JobState = JobState.queued
    bytes_done: int = 0
    bytes_total: int | None = None
    bytes_fetched: int = 0
    rate: float = 0.0  # bytes per second, smoothed
    eta_seconds: float | None = None
    files_total: int = 0
    files_done: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None
    commit: str | None = None
    snapshot: str | None = None  # the snapshot folder, once completed
    started_at: float | None = None  # time.time()
    finished_at: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def copy(self) -> DownloadJob:
        patterns = list(self.patterns) if self.patterns is not None else None
        return dataclasses.replace(self, patterns=patterns)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = str(self.state)
        data["error_kind"] = str(self.error_kind) if self.error_kind else None
        return data


Subscriber = Callable[[DownloadJob], object]


@dataclass
class _Meter:
    """Turns byte counts sampled over time into a smoothed rate.

    An exponential moving average (time constant RATE_TIME_CONSTANT) with its start-up bias
    corrected, so that the first second shows the real average so far instead of a rate
    creeping up from 0.
    """

    last_bytes: int = 0
    last_time: float = 0.0
    average: float = 0.0
    weight: float = 0.0

    def sample(self, fetched: int, now: float) -> float:
        dt = now - self.last_time
        if dt > 0:
            alpha = 1 - math.exp(-dt / RATE_TIME_CONSTANT)
            instant = max(0, fetched - self.last_bytes) / dt
            self.average += alpha * (instant - self.average)
            self.weight += alpha * (1 - self.weight)
            self.last_bytes, self.last_time = fetched, now
        return self.average / self.weight if self.weight else 0.0


class Downloader:
    """Downloads hub models into the cache, one job per model at a time.

    `token_provider` is called at the start of each job, so a token set through the admin
    API applies to the next download. `endpoint` defaults to HF_ENDPOINT (huggingface.co).
    `reserve_bytes` is the free space that must remain after a download (the margin of the
    disk check). `max_jobs` jobs run at once; the others wait in state `queued`.
    `files_in_parallel` files of one job are transferred at once. A file whose transfer
    breaks is resumed at once (Range) as long as each attempt brings new bytes; after
    `retries` attempts in a row that bring none (waiting `retry_delay`, then longer, between
    them) the job fails, keeping its partial files for the next start.

    Subscribers are called in the event loop thread with a copy of the job: on every state
    change and, while running, at most every PROGRESS_INTERVAL seconds.
    """

    def __init__(self, cache_dir: Path, token_provider: Callable[[], str | None],
                 endpoint: str | None = None, *, reserve_bytes: int = 1 << 30,
                 max_jobs: int = 2, files_in_parallel: int = 4, retries: int = 5,
                 retry_delay: float = 1.0) -> None:
        self.cache_dir = Path(cache_dir)
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.reserve_bytes = reserve_bytes
        self.files_in_parallel = files_in_parallel
        self.retries = retries
        self.retry_delay = retry_delay
        self._token_provider = token_provider
        self._jobs: dict[str, DownloadJob] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._controls: dict[str, Control] = {}
        self._subscribers: list[Subscriber] = []
        self._meters: dict[str, _Meter] = {}
        self._pending: set[asyncio.Future[Any]] = set()
        self._slots = asyncio.Semaphore(max_jobs)
        self._pool = ThreadPoolExecutor(max_workers=max_jobs * files_in_parallel + max_jobs,
                                        thread_name_prefix="modelhost-download")
        self._closed = False

    # ---- public API

    async def start(self, model_id: str, source: HubSource) -> DownloadJob:
        """Start downloading `source` for `model_id`; if a job for it is queued or running,
        return that job instead (one job per model at a time)."""
        current = self._jobs.get(model_id)
        if current is not None and current.active:
            return current
        if self._closed:
            raise RuntimeError("the downloader is closed")
        job = DownloadJob(model_id, source.hf, source.revision,
                          list(source.files) if source.files is not None else None)
        ctl = Control()
        self._jobs[model_id], self._controls[model_id] = job, ctl
        self._emit(job)
        self._tasks[model_id] = asyncio.create_task(self._run(job, source, ctl),
                                                    name=f"download:{model_id}")
        return job

    async def cancel(self, model_id: str) -> DownloadJob | None:
        """Stop the model's download and wait until no more bytes are transferred; the partial
        files stay, so the next start resumes them."""
        job, ctl = self._jobs.get(model_id), self._controls.get(model_id)
        if job is None or ctl is None:
            return None
        if job.active:
            ctl.halt("cancelled")
            await self.wait(model_id)
        return job

    async def wait(self, model_id: str) -> DownloadJob:
        """Wait for the model's current job to finish; return it (KeyError if none)."""
        job = self._jobs[model_id]
        task = self._tasks.get(model_id)
        if task is not None:
            await asyncio.shield(task)
        return job

    def get(self, model_id: str) -> DownloadJob | None:
        """The model's latest job (live object: read it, do not change it)."""
        return self._jobs.get(model_id)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(job_copy)` on each event; returns the function that unsubscribes.
        A callback may be a coroutine function: its coroutine is scheduled, not awaited."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def scan(self) -> list[CachedRepo]:
        return scan_cache(self.cache_dir)

    async def delete(self, repo: str, revision: str | None = None) -> int:
        """Delete from the cache, refusing while a download of that repository runs."""
        busy = [j.model_id for j in self._jobs.values() if j.active and j.repo == repo]
        if busy:
            raise DownloadError(f"{repo} is being downloaded for {', '.join(busy)}: cancel the "
                                "download first", ErrorKind.internal)
        return await self._in_thread(delete_from_cache, self.cache_dir, repo, revision)

    async def close(self) -> None:
        """Stop every job (their partial files stay for the next start) and the threads."""
        self._closed = True
        for model_id, ctl in self._controls.items():
            if self._jobs[model_id].active:
                ctl.halt("shutdown")
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._pool.shutdown(wait=True)

    async def __aenter__(self) -> Downloader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- one job

    async def _run(self, job: DownloadJob, source: HubSource, ctl: Control) -> None:
        token: str | None = None
        try:
            if not await self._wait_slot(ctl):
                raise Stopped
            try:
                token = self._token_provider()
                job.started_at = time.time()
                self._set_state(job, JobState.running)
                logger.info("download of %s@%s for %s started", job.repo, job.revision,
                            job.model_id)
                fetcher = Fetcher(cache_dir=self.cache_dir, endpoint=self.endpoint,
                                   token=token, ctl=ctl, reserve_bytes=self.reserve_bytes,
                                   retries=self.retries, retry_delay=self.retry_delay)
                plan = await self._in_thread(fetcher.plan, source)
                self._adopt(job, plan)
                await self._transfer(job, plan, fetcher, ctl)
                job.snapshot = str(await self._in_thread(fetcher.verify, plan))
            finally:
                self._slots.release()
        except Stopped:
            self._finish_stopped(job, ctl)
        except asyncio.CancelledError:  # the loop itself is going away
            ctl.halt("shutdown")
            self._finish_stopped(job, ctl)
            raise
        except Exception as exc:  # every failure becomes the job's error, with what to do
            error = explain(exc, repo=job.repo, revision=job.revision, token_set=bool(token),
                            endpoint=self.endpoint, cache_dir=self.cache_dir)
            self._finish(job, JobState.failed, _scrub(str(error), token), error.kind)
        else:
            self._finish(job, JobState.completed)

    async def _wait_slot(self, ctl: Control) -> bool:
        """Wait for a free slot, or for a stop while still queued. True once a slot is held."""
        slot = asyncio.ensure_future(self._slots.acquire())
        halted = asyncio.ensure_future(ctl.halted.wait())
        await asyncio.wait({slot, halted}, return_when=asyncio.FIRST_COMPLETED)
        halted.cancel()
        if not slot.done():
            slot.cancel()
            return False
        if ctl.stop.is_set():
            self._slots.release()
            return False
        return True

    async def _transfer(self, job: DownloadJob, plan: Plan, fetcher: Fetcher,
                        ctl: Control) -> None:
        """Fetch the files a few at a time while a monitor publishes progress."""
        limit = asyncio.Semaphore(self.files_in_parallel)

        async def one(task: FileTask) -> None:
            async with limit:
                if task.complete:
                    return
                ctl.check()
                try:
                    await self._in_thread(fetcher.fetch, plan, task)
                except Stopped:
                    raise
                except asyncio.CancelledError:
                    ctl.halt("shutdown")
                    raise
                except Exception:
                    ctl.halt("error")  # the other files stop too: the job has failed
                    raise

        monitor = asyncio.create_task(self._monitor(job, plan))
        try:
            results = await asyncio.gather(*(one(t) for t in plan.files),
                                           return_exceptions=True)
        except asyncio.CancelledError:
            ctl.halt("shutdown")
            raise
        finally:
            monitor.cancel()
        self._progress(job, plan)
        errors = [r for r in results if isinstance(r, BaseException)]
        real = [e for e in errors if not isinstance(e, Stopped)]
        if real:
            raise real[0]
        if errors:
            raise Stopped

    async def _monitor(self, job: DownloadJob, plan: Plan) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            if self._progress(job, plan):
                self._emit(job)

    def _adopt(self, job: DownloadJob, plan: Plan) -> None:
        job.commit = plan.commit
        job.bytes_total = plan.bytes_total
        job.files_total = len(plan.files)
        self._meters[job.model_id] = _Meter(last_time=time.monotonic())
        self._progress(job, plan)
        self._emit(job)

    def _progress(self, job: DownloadJob, plan: Plan) -> bool:
        """Update the job's counters from the file tasks; True when something changed."""
        before = (job.bytes_done, job.files_done, job.bytes_fetched)
        job.bytes_done = sum(min(t.have, t.remote.size) for t in plan.files)
        job.files_done = sum(t.complete for t in plan.files)
        job.bytes_fetched = sum(t.fetched for t in plan.files)
        meter = self._meters.setdefault(job.model_id, _Meter(last_time=time.monotonic()))
        job.rate = meter.sample(job.bytes_fetched, time.monotonic())
        left = (job.bytes_total or 0) - job.bytes_done
        job.eta_seconds = left / job.rate if job.rate > 1 and left > 0 else None
        return before != (job.bytes_done, job.files_done, job.bytes_fetched)

    # ---- state and events

    def _set_state(self, job: DownloadJob, state: JobState) -> None:
        job.state = state
        self._emit(job)

    def _finish(self, job: DownloadJob, state: JobState, error: str | None = None,
                kind: ErrorKind | None = None) -> None:
        job.error, job.error_kind = error, kind
        job.finished_at = time.time()
        job.rate, job.eta_seconds = 0.0, None
        self._meters.pop(job.model_id, None)
        if state is JobState.failed:
            logger.warning("download of %s@%s for %s failed: %s", job.repo, job.revision,
                           job.model_id, error)
        else:
            logger.info("download of %s@%s for %s %s", job.repo, job.revision, job.model_id,
                        state)
        self._set_state(job, state)

    def _finish_stopped(self, job: DownloadJob, ctl: Control) -> None:
        error = None
        if ctl.reason == "shutdown":
            error = "interrupted by the gateway's shutdown; it resumes where it stopped"
        self._finish(job, JobState.cancelled, error)

    def _emit(self, job: DownloadJob) -> None:
        event = job.copy()
        for callback in list(self._subscribers):
            try:
                result = callback(event)
            except Exception:
                logger.exception("download event subscriber %r failed", callback)
                continue
            if inspect.isawaitable(result):
                future = asyncio.ensure_future(result)
                self._pending.add(future)
                future.add_done_callback(self._pending.discard)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


def _scrub(text: str, token: str | None) -> str:
    """Belt and braces: a token must never reach an error message."""
    if token and token in text:
        return text.replace(token, mask(token) or "…")
    return text

