"""One model's owner: the only task that moves the model through its lifecycle.

Callers never change state themselves. They say what they want (`ensure_ready`, `unload`)
and the owner task drives the model there, one step at a time, so that downloads, starts,
crash restarts, idle unloads and shutdown can never race each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import aiohttp
import yarl

from modelhost.admin_policy import GuardedResolver, RemotePolicy, RemoteRefused
from modelhost.admission import Admission
from modelhost.api.lifecycle import http_error
from modelhost.catalog import SourceUnavailable, local_weights
from modelhost.config import Backend, HubSource, ModelSpec, UrlSource
from modelhost.gpu.placement import PlacementError
from modelhost.redaction import redact_url
from modelhost.registry.errors import (
    Downloading,
    LifecycleError,
    ModelFailed,
    NotDownloaded,
    NotReadyYet,
    UnloadedWhileLoading,
)
from modelhost.registry.lifecycle import State, check_transition
from modelhost.workers.plans import launch_plan
from modelhost.workers.process import (
    BackendConfigError,
    WorkerProcess,
    WorkerStartError,
    free_port,
)

log = logging.getLogger(__name__)

# A worker that stayed up this long is healthy again: its crash count starts over.
HEALTHY_UPTIME = 60.0
MAX_BACKOFF = 30.0
# A failed model is retried by the next request only after this many seconds.
FAILED_RETRY_AFTER = 10.0
LOOPBACK = "127.0.0.1"


class Target(StrEnum):
    """What the owner drives the model towards."""

    stopped = "stopped"  # no worker (weights left where they are)
    cached = "cached"    # weights on disk, no worker (a download was asked for)
    ready = "ready"      # a worker answering requests


class DownloadCancelled(Exception):
    """The download was cancelled; the model goes back to `absent`."""


DownloadFn = Callable[["Model"], Awaitable[Path]]
PlaceFn = Callable[["Model"], Awaitable[list[int]]]


@dataclass(frozen=True)
class ModelContext:
    cache_dir: Path
    log_dir: Path
    stop_timeout: float
    # Fetches the model's weights into the cache (the gateway's HubService.download).
    download: DownloadFn
    hf_token: Callable[[], str | None] = lambda: None
    # Chooses the GPUs of a worker about to start (default: pinned, override or first N).
    place: PlaceFn | None = None
    # Longest audio a speech or diarization worker accepts (settings.max_audio_seconds).
    max_audio_seconds: float = 4 * 3600.0
    # Worker log rotation (settings.worker_log_bytes, settings.worker_log_backups).
    worker_log_bytes: int = 10 * 1024 * 1024
    worker_log_backups: int = 3
    # Where a remote model may connect (None: anywhere, as the models file says); the
    # gateway gives the policy of `admin_policy` for the models added through the API.
    remote_policy: Callable[[ModelSpec], RemotePolicy | None] | None = None


Listener = Callable[["Model", State], None]


class Model:
    def __init__(self, spec: ModelSpec, ctx: ModelContext) -> None:
        self.spec = spec
        self.ctx = ctx
        # At most `max_concurrency` requests at the worker, a bounded queue (429 past it).
        self.admission = Admission(spec.id, spec.max_concurrency, spec.max_queue)
        self.state = State.cached
        self.last_error: str | None = None
        # A remote added through the admin API: the address its URL was checked to resolve to
        # at load, where the relay connects (None: resolve the name, e.g. a models-file one).
        self.connect_to: tuple[str, ...] | None = None
        self.worker: WorkerProcess | None = None
        self.weights: Path | None = None
        self.upstream: str | None = None  # base URL ending in /v1 while ready
        self.last_used = time.monotonic()
        self.restarts = 0
        self.failures = 0
        self.listeners: list[Listener] = []
        self.gpus: list[int] = []  # where the current worker runs
        self.gpu_override: list[int] | None = None  # asked for by a load request
        self.download_progress: dict[str, object] | None = None
        self.usage: dict[str, float] = {}  # audio_seconds, input_tokens (from worker headers)
        self._failed_at = 0.0
        self._target = Target.stopped
        self._retry = False
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- what callers use --------------------------------------------------------------

    async def start(self) -> None:
        """Find where the model's weights are and start the owner task."""
        try:
            self.weights = await asyncio.to_thread(local_weights, self.spec, self.ctx.cache_dir)
            needs_download = isinstance(self.spec.source, HubSource) and self.weights is None
            self.state = State.absent if needs_download else State.cached
        except SourceUnavailable as exc:
            self.state, self.last_error = State.failed, str(exc)
            self._failed_at = time.monotonic()
        self._task = asyncio.create_task(self._own(), name=f"owner:{self.spec.id}")

    async def ensure_ready(self, timeout: float) -> str:
        """Return the worker's base URL, loading the model first if needed.

        Idempotent and safe to call from many requests at once: they all wait for the same
        load. Waits at most `timeout` seconds (NotReadyYet); a load that fails raises
        ModelFailed; a model not downloaded (requests never download) NotDownloaded or
        Downloading: the `LifecycleError`s of `registry.errors`.
        """
        try:
            return await self._ensure_ready(timeout)
        except LifecycleError as exc:
            # Until the serving layer maps lifecycle errors itself (issue 14): the HTTP error.
            raise http_error(exc) from None

    async def _ensure_ready(self, timeout: float) -> str:
        upstream = self.ready_upstream()
        if upstream is not None:
            return upstream
        name = self.spec.id
        if self.state is State.failed:
            wait = FAILED_RETRY_AFTER - (time.monotonic() - self._failed_at)
            if wait > 0:
                raise ModelFailed(name, retry_after=wait)
        if self.state in (State.absent, State.downloading) or (
                self.state is State.failed and self.weights is None
                and isinstance(self.spec.source, HubSource)):
            # Requests never download: a failed download is retried by the admin API only.
            raise self._not_downloaded()
        failures = self.failures
        self.want(Target.ready)
        deadline = time.monotonic() + timeout
        while True:
            if self.state is State.ready and self.upstream is not None:
                return self.upstream
            if self.state is State.failed and self.failures != failures:
                raise ModelFailed(name, retry_after=FAILED_RETRY_AFTER, while_loading=True)
            if self._target is not Target.ready:
                raise UnloadedWhileLoading(name, retry_after=1)
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotReadyYet(name, retry_after=5, state=self.state.value)
            changed = self._changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), left)

    def ready_upstream(self) -> str | None:
        """The worker's base URL if the model is ready now (counting as a use), else None;
        never waits and never starts a load."""
        self.last_used = time.monotonic()
        if self.state is State.ready:
            return self.upstream
        return None

    def release(self) -> None:
        """A request is done with the worker: its admission slot goes to the next one."""
        self.last_used = time.monotonic()
        self.admission.release()

    def count(self, key: str, amount: float) -> None:
        """Add what a request consumed (`audio_seconds`, `input_tokens`) to the usage."""
        self.usage[key] = self.usage.get(key, 0.0) + amount

    @property
    def busy(self) -> bool:
        """Requests at the worker or queued for it."""
        return bool(self.admission.active or self.admission.waiting)

    def _not_downloaded(self) -> LifecycleError:
        if self.state is State.downloading:
            progress = self.download_progress or {}
            done, total = progress.get("bytes_done"), progress.get("bytes_total")
            percent = 100 * done / total \
                if isinstance(done, int) and isinstance(total, int) and total else None
            return Downloading(self.spec.id, retry_after=30, percent=percent)
        return NotDownloaded(self.spec.id, retry_after=60,
                             download_failed=self.state is State.failed)

    async def changed(self) -> None:
        """Return at the next state change."""
        await self._changed.wait()

    async def forget_weights(self) -> None:
        """After the cached files were deleted: the model is `absent` until downloaded."""
        self.weights = await asyncio.to_thread(local_weights, self.spec, self.ctx.cache_dir)
        if self.weights is None and self.state in (State.cached, State.failed):
            self._set(State.absent)

    async def wait_for(self, states: set[State]) -> None:
        while self.state not in states:
            await self.changed()

    @property
    def target(self) -> Target:
        return self._target

    def want(self, target: Target) -> None:
        """Drive the model towards `target`. Requests ask for `ready` (never downloading);
        the admin API asks for `cached` (download) or `ready` (download if needed, then
        start); unload and the idle reaper ask for `stopped`."""
        if self.state is State.failed and target is not Target.stopped:
            self._retry = True  # a new demand retries a failed model (once per failure)
        if self._target is not target or self._retry:
            self._target = target
            self._wake.set()

    def want_ready(self) -> None:
        self.want(Target.ready)

    def unload(self) -> None:
        self.want(Target.stopped)

    async def worker_lost(self, base: str, grace: float = 2.0) -> bool:
        """After a connection to the worker at `base` failed: wait briefly for the owner to
        notice the worker's exit. True once it has (a restart is under way, and the next
        `ensure_ready` waits for it instead of returning the dead worker's URL)."""
        if self.worker is None:  # a remote server: nothing to restart
            return False
        deadline = time.monotonic() + grace
        while self.upstream == base and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.upstream != base

    async def close(self) -> None:
        """Stop the worker and the owner task (gateway shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.worker is not None:
            if self.state in (State.ready, State.starting):
                self._set(State.stopping)
            await self.worker.stop()
            self.worker = None
            self.upstream = None
            if self.state is State.stopping:
                self._set(State.cached)

    # -- the owner ---------------------------------------------------------------------

    def _set(self, new: State, error: str | None = None) -> None:
        check_transition(self.state, new)
        old, self.state = self.state, new
        if new is State.failed:
            self.failures += 1
            self._failed_at = time.monotonic()
            self.last_error = error
            log.error("model %s failed: %s", self.spec.id, error)
        elif error:
            self.last_error = error
        if old is not new:
            log.info("model %s: %s -> %s", self.spec.id, old, new)
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in self.listeners:
            listener(self, old)

    async def _own(self) -> None:
        while True:
            self._wake.clear()
            state, target = self.state, self._target
            if state is State.absent and target is not Target.stopped:
                await self._download()
            elif state is State.cached and target is Target.ready:
                await self._launch()
            elif state is State.ready and target is Target.ready:
                await self._watch()
            elif state is State.ready:
                await self._stop()
            elif state is State.failed and self._retry:
                await self._retry_failed()
            else:
                await self._wake.wait()

    async def _retry_failed(self) -> None:
        self._retry = False
        self.restarts = 0
        try:
            self.weights = await asyncio.to_thread(local_weights, self.spec, self.ctx.cache_dir)
        except SourceUnavailable as exc:
            self._set(State.failed, str(exc))
            return
        needs_download = isinstance(self.spec.source, HubSource) and self.weights is None
        self._set(State.absent if needs_download else State.cached)

    async def _download(self) -> None:
        source = self.spec.source
        assert isinstance(source, HubSource)
        self._set(State.downloading)
        download = self.ctx.download
        try:
            path = await download(self)
        except DownloadCancelled:
            self.download_progress = None
            self._target = Target.stopped
            self._set(State.absent, "download cancelled")
            return
        except Exception as exc:  # any hub or disk error fails the download, with its reason
            self._set(State.failed, f"download of {source.hf}@{source.revision} failed: {exc}")
            return
        self.weights = path
        self._set(State.cached)
        if self._target is Target.cached:
            self._target = Target.stopped  # downloaded as asked; nothing more to do

    async def _launch(self) -> None:
        """cached → starting → ready, retrying with backoff; failed when retries run out."""
        if self.state is not State.starting:  # a crash restart is already in `starting`
            self._set(State.starting)
        while self._target is Target.ready:
            try:
                self.upstream = await self._start_once()
            except (WorkerStartError, BackendConfigError, PlacementError, OSError) as exc:
                permanent = isinstance(exc, BackendConfigError | PlacementError | OSError) or \
                    (isinstance(exc, WorkerStartError) and exc.permanent)
                if permanent:
                    self._set(State.failed, str(exc))
                    return
                if self.restarts >= self.spec.max_restarts:
                    self._set(State.failed, f"{exc}; gave up after {self.restarts} restart(s)")
                    return
                await self._backoff(str(exc))
                continue
            self._set(State.ready)
            return
        # Unloaded while starting.
        self._set(State.stopping)
        await self._stop_worker()
        self._set(State.cached)

    async def _start_once(self) -> str:
        spec = self.spec
        if spec.backend is Backend.remote:
            assert isinstance(spec.source, UrlSource)
            policy = self.ctx.remote_policy(spec) if self.ctx.remote_policy else None
            self.connect_to = None
            if policy is not None:
                try:  # again at every load: the name may resolve elsewhere now
                    checked = await policy.check(spec.source.url)
                except RemoteRefused as exc:
                    raise WorkerStartError(exc.message, permanent=True) from None
                # The relay connects to the address checked here, not to whatever the name
                # resolves to later (DNS rebinding); none when the name itself is allowed.
                self.connect_to = tuple(checked) if checked else None
            await _probe_remote(spec.source, policy)
            return spec.source.url
        self.gpus = await (self.ctx.place or _default_place)(self)
        port = free_port(LOOPBACK)
        plan = launch_plan(spec, self.weights, LOOPBACK, port, self.gpus, self.ctx.hf_token(),
                           max_audio_seconds=self.ctx.max_audio_seconds)
        plan.env.update(spec.env)
        safe = spec.id.replace("/", "__").replace(":", "_")
        worker = WorkerProcess(spec.id, plan, LOOPBACK, port,
                               self.ctx.log_dir / "workers" / f"{safe}.log", self.ctx.stop_timeout,
                               log_bytes=self.ctx.worker_log_bytes,
                               log_backups=self.ctx.worker_log_backups)
        self.worker = worker
        await worker.start()
        try:
            await worker.wait_ready(spec.start_timeout)
        except BaseException:
            await worker.stop()
            self.worker = None
            raise
        return worker.base_url + "/v1"

    async def _backoff(self, reason: str) -> None:
        self.restarts += 1
        delay = min(0.5 * 2 ** (self.restarts - 1), MAX_BACKOFF)
        self.last_error = reason
        log.warning("model %s: %s; restart %d/%d in %.1f s", self.spec.id, reason,
                    self.restarts, self.spec.max_restarts, delay)
        self._set(State.starting)
        with contextlib.suppress(asyncio.TimeoutError):
            # An unload during the backoff ends it early.
            await asyncio.wait_for(self._until_unwanted(), delay)

    async def _until_unwanted(self) -> None:
        while self._target is Target.ready:
            self._wake.clear()
            await self._wake.wait()

    async def _watch(self) -> None:
        """While ready: wait for the worker to exit (a crash) or for a change of plan."""
        worker = self.worker
        if worker is None:  # a remote model: nothing to watch
            await self._wake.wait()
            return
        exited = asyncio.ensure_future(worker.wait())
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({exited, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            if not exited.done():
                exited.cancel()
        if not exited.done() or exited.cancelled():
            return
        code = exited.result()
        uptime = time.monotonic() - worker.started_at
        reason = f"worker exited with status {code}"
        tail = worker.tail(8)
        self.worker = None
        self.upstream = None
        if uptime > HEALTHY_UPTIME:
            self.restarts = 0
        log.warning("model %s: %s after %.0f s%s", self.spec.id, reason, uptime,
                    f"; last output:\n{tail}" if tail else "")
        if self.restarts >= self.spec.max_restarts:
            self._set(State.failed, f"{reason}; gave up after {self.restarts} restart(s)")
            return
        await self._backoff(reason)
        await self._launch()

    async def _stop(self) -> None:
        self._set(State.stopping)
        await self._stop_worker()
        self._set(State.cached)

    async def _stop_worker(self) -> None:
        self.upstream = None
        if self.worker is not None:
            await self.worker.stop()
            self.worker = None
        self.gpus = []


async def _default_place(runtime: Model) -> list[int]:
    spec = runtime.spec
    if runtime.gpu_override is not None:
        return list(runtime.gpu_override)
    if spec.gpus is not None:
        return list(spec.gpus)
    return list(range(spec.gpu_count))


async def _probe_remote(source: UrlSource, policy: RemotePolicy | None = None) -> None:
    """GET <url>/models must answer 200. Redirects are not followed; with a policy, the
    connection goes only to addresses it allows (checked as they are resolved)."""
    headers = {"Authorization": f"Bearer {source.api_key}"} if source.api_key else {}
    timeout = aiohttp.ClientTimeout(total=10)
    shown = redact_url(source.url)
    url = yarl.URL(source.url + "/models")
    if url.user is not None:  # credentials in the URL: basic auth, unless a key is given
        if not source.api_key:
            auth = aiohttp.BasicAuth(url.user or "", url.password or "")
            headers["Authorization"] = auth.encode()
        url = url.with_user(None)
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy)) \
        if policy is not None else None
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session, \
                session.get(url, headers=headers, allow_redirects=False) as resp:
            if resp.status != 200:
                raise WorkerStartError(f"remote server {shown} answered {resp.status}")
    except (TimeoutError, aiohttp.ClientError) as exc:
        reason = type(exc).__name__ if source.url in str(exc) else str(exc)
        raise WorkerStartError(f"remote server {shown} unreachable: "
                               f"{redact_url(reason)}") from exc
