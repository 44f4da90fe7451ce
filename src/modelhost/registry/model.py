"""One model's owner: the only task that moves the model through its lifecycle.

Callers never change state themselves. They say what they want (`want`: the model ready,
downloaded or stopped, optionally pinned to GPUs; `ensure_ready`; `forget_weights`; `close`)
and the owner task drives the model there, one step at a time, so that downloads, starts,
crash restarts, idle unloads, GPU moves and shutdown can never race each other. What the
owner keeps (state, worker, weights, GPUs, pin, errors, download progress) is read through
properties; requests write only their own traces, through methods (`release`, `count`,
`ready_upstream` marking a use).

Where a worker runs is a launcher's (`workers.launchers`), chosen in `_start_once`; the
GPUs of a local worker are the scheduler's (`gpu.scheduler`), asked just before it starts.
A request that fails leaves the model as it was: a load pinned to GPUs that cannot be had
drops its pin (the previous one stands) and a model moved off its GPUs that way is loaded
again where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from modelhost.admission import Admission
from modelhost.catalog import SourceUnavailable, local_weights
from modelhost.config import Backend, HubSource, ModelSpec
from modelhost.gpu.placement import PlacementError
from modelhost.gpu.scheduler import Scheduler
from modelhost.registry.context import (
    DownloadCancelled,
    DownloadFn,
    Fallback,
    ModelContext,
    Pin,
    Progress,
    Target,
)
from modelhost.registry.errors import (
    ModelFailed,
    NotReadyYet,
    UnloadedWhileLoading,
    not_downloaded,
)
from modelhost.registry.lifecycle import State, check_transition
from modelhost.registry.replicas import HEALTHY_UPTIME, MAX_BACKOFF, Replicas
from modelhost.workers.launchers import RemoteLauncher, Worker
from modelhost.workers.process import BackendConfigError, WorkerStartError

__all__ = ["DownloadCancelled", "DownloadFn", "Listener", "Model", "ModelContext", "Pin",
           "Progress", "Target"]

log = logging.getLogger(__name__)

# A failed model is retried by the next request only after this many seconds.
FAILED_RETRY_AFTER = 10.0


Listener = Callable[["Model", State], None]


class Model:
    def __init__(self, spec: ModelSpec, ctx: ModelContext, scheduler: Scheduler) -> None:
        self.spec = spec
        self.ctx = ctx
        self.scheduler = scheduler
        # At most `max_concurrency` requests at each worker, a bounded queue (429 past it).
        workers = 1 if spec.backend is Backend.remote else spec.replicas
        self.admission = Admission(spec.id, spec.max_concurrency * workers, spec.max_queue)
        self.last_used = time.monotonic()  # requests mark their uses (ready_upstream, release)
        self.usage: dict[str, float] = {}  # audio_seconds, input_tokens (`count`)
        self.listeners: list[Listener] = []
        self.name = spec.id  # in log lines (a rollout names its versions: "m (new version)")
        # The owner's own: read through the properties below.
        self._state = State.cached
        self._last_error: str | None = None
        self._worker: Worker | None = None
        self._weights: Path | None = None
        self._upstream: str | None = None  # base URL ending in /v1 while ready
        self._restarts = 0
        self._failures = 0
        self._gpus: list[int] = []  # where the current worker runs
        self._pin: tuple[int, ...] | None = None  # asked for by a load request
        self._running_pin: tuple[int, ...] | None = None  # the pin the worker started with
        self._fallback: Fallback | None = None
        self._download_progress: dict[str, object] | None = None
        self._failed_at = 0.0
        self._target = Target.stopped
        self._retry = False
        self._recheck: asyncio.Future[None] | None = None
        # Blue-green updates (`rollout`): a trial version gets one start attempt, and the
        # rollout decides (`trial_error`); see `hold`, `gate`, `retire`.
        self.trial = False
        self.trial_error: BaseException | None = None
        self._gated = self._held = False
        self._successor: Model | None = None
        # What the rollout's watch reads: answers (and 5xx among them), worker crashes.
        self.answers = self.errors = self.crashes = 0
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # `replicas: N` > 1: workers 1 … N-1 (`registry.replicas`); None keeps N = 1 as it was.
        self.replicas = None if workers == 1 else \
            Replicas(self.name, spec, lambda i, w, p: ctx.launch(spec, w, p, i),
                     lambda: self._weights, scheduler.place,
                     lambda: self._upstream if self._state is State.ready else None)

    # -- what the owner keeps, read-only ------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def target(self) -> Target:
        return self._target

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def worker(self) -> Worker | None:
        return self._worker

    @property
    def weights(self) -> Path | None:
        return self._weights

    @property
    def connect_to(self) -> tuple[str, ...] | None:
        """A remote added through the admin API: the addresses its URL resolved to when
        checked at load, where the relay connects (None: resolve the name)."""
        if self._successor is not None:
            return self._successor.connect_to
        return self._worker.connect_to if self._worker is not None else None

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def failures(self) -> int:
        return self._failures

    @property
    def gpus(self) -> list[int]:
        return self._gpus

    @property
    def pin(self) -> tuple[int, ...] | None:
        """The GPUs a load request pinned the model to (None: the spec's `gpus`, or any)."""
        return self._pin

    @property
    def moving(self) -> bool:
        """Ready, but on GPUs that a later load asked to change: the owner restarts it."""
        return self._state is State.ready and self._pin != self._running_pin and not (
            self._pin is not None and sorted(self._pin) == sorted(self._gpus))

    @property
    def download_progress(self) -> dict[str, object] | None:
        return self._download_progress

    @property
    def busy(self) -> bool:
        """Requests at the worker or queued for it (or held by a rollout: never evicted)."""
        return bool(self.admission.active or self.admission.waiting) or self._held

    @property
    def starting(self) -> bool:
        return self._state is State.starting

    @property
    def holds_gpus(self) -> bool:
        return bool(self._gpus) and self._state in (State.ready, State.starting)

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    # -- what callers use --------------------------------------------------------------

    async def start(self) -> None:
        """Find where the model's weights are and start the owner task."""
        try:
            self._weights = await asyncio.to_thread(local_weights, self.spec,
                                                    self.ctx.cache_dir)
            needs_download = isinstance(self.spec.source, HubSource) and self._weights is None
            self._state = State.absent if needs_download else State.cached
        except SourceUnavailable as exc:
            self._state, self._last_error = State.failed, str(exc)
            self._failed_at = time.monotonic()
        self._task = asyncio.create_task(self._own(), name=f"owner:{self.spec.id}")

    async def ensure_ready(self, timeout: float) -> str:
        """Return the worker's base URL, loading the model first if needed.

        Idempotent and safe to call from many requests at once: they all wait for the same
        load. Waits at most `timeout` seconds (NotReadyYet); a load that fails raises
        ModelFailed; a model not downloaded (requests never download) NotDownloaded or
        Downloading: the `LifecycleError`s of `registry.errors`, which the API layer turns
        into HTTP answers (`api.lifecycle`). A model retired by a rollout hands its callers
        to the version that replaced it.
        """
        if self._successor is not None:
            return await self._successor.ensure_ready(timeout)
        upstream = self.ready_upstream()
        if upstream is not None:
            return upstream
        name = self.spec.id
        if self._state is State.failed:
            wait = FAILED_RETRY_AFTER - (time.monotonic() - self._failed_at)
            if wait > 0:
                raise ModelFailed(name, retry_after=wait)
        if self._state in (State.absent, State.downloading) or (
                self._state is State.failed and self._weights is None
                and isinstance(self.spec.source, HubSource)):
            # Requests never download: a failed download is retried by the admin API only.
            raise not_downloaded(self.spec.id, self._state.value, self._download_progress)
        failures = self._failures
        self.want(Target.ready)
        deadline = time.monotonic() + timeout
        while True:
            if self._successor is not None:
                return await self._successor.ensure_ready(max(deadline - time.monotonic(), 0))
            if (upstream := self.ready_upstream()) is not None:
                return upstream
            if self._state is State.failed and self._failures != failures:
                raise ModelFailed(name, retry_after=FAILED_RETRY_AFTER, while_loading=True)
            if self._target is not Target.ready:
                raise UnloadedWhileLoading(name, retry_after=1)
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotReadyYet(name, retry_after=5, state=self._state.value)
            changed = self._changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), left)

    def ready_upstream(self) -> str | None:
        """The worker's base URL if the model is ready now (counting as a use), else None;
        never waits and never starts a load."""
        if self._successor is not None:
            return self._successor.ready_upstream()
        self.last_used = time.monotonic()
        if self.replicas is not None:  # the least loaded ready replica, even while 0 restarts
            return self.replicas.pick(self._upstream if self._state is State.ready else None)
        if self._state is State.ready:
            return self._upstream
        return None

    def release(self) -> None:
        """A request is done with the worker: its admission slot goes to the next one."""
        self.last_used = time.monotonic()
        self.admission.release()

    def count(self, key: str, amount: float) -> None:  # audio_seconds, input_tokens
        self.usage[key] = self.usage.get(key, 0.0) + amount

    def answered(self, status: int) -> None:
        """A request relayed to this version ended with `status` (a rollout's watch reads
        the share of 5xx)."""
        self.answers += 1
        if status >= 500:
            self.errors += 1

    # -- what a rollout asks (`rollout`) -----------------------------------------------

    def hold(self, held: bool) -> None:
        """While held, never evicted for room nor unloaded for idleness."""
        self._held = held

    def gate(self) -> None:
        """Do not start a worker until `open_gate` (requests may wait for it meanwhile)."""
        self._gated = True

    def open_gate(self) -> None:
        self._gated = False
        self._wake.set()

    def retire(self, successor: Model) -> None:
        """This version no longer serves: callers that still hold it (a request resolved a
        moment before the switch, one queued for a worker that crashed) are handed to
        `successor`; those already at its worker finish there."""
        self._successor = successor
        self.listeners = []
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:  # returns at the next state change
        await self._changed.wait()

    async def wait_for(self, states: set[State]) -> None:
        while self._state not in states:
            await self.changed()

    def want(self, target: Target, pin: Pin | None = None) -> None:
        """Drive the model towards `target`. Requests ask for `ready` (never downloading);
        the admin API asks for `cached` (download) or `ready` (download if needed, then
        start; with a `pin`, on those GPUs: a ready model elsewhere is moved); unload, the
        idle reaper and evictions ask for `stopped`."""
        if pin is not None and pin.gpus != self._pin:
            if self._fallback is None:
                self._fallback = Fallback(self._pin, reload=self._state is State.ready)
            self._pin = pin.gpus
            if self._state is State.ready and not self.moving:  # already on those GPUs
                self._running_pin, self._fallback = self._pin, None
        if target is not Target.ready:
            self._fallback = None  # a pin whose load is given up stays as asked
        if self._state is State.failed and target is not Target.stopped:
            self._retry = True  # a new demand retries a failed model (once per failure)
        if self._target is not target or self._retry or pin is not None:
            self._target = target
            self._wake.set()

    async def evict(self) -> None:
        """Unload to make room on the GPUs (the scheduler's ask); return once stopped."""
        self.want(Target.stopped)
        await self.wait_for({State.cached, State.failed, State.absent})

    async def forget_weights(self) -> None:
        """After the cached files were deleted: the owner looks for the weights again (the
        model is `absent` until downloaded); returns once it has."""
        if self._task is None or self._task.done():  # no owner: nothing to race with
            self._recheck = asyncio.get_running_loop().create_future()
            await self._look_again()
            return
        if self._recheck is None:
            self._recheck = asyncio.get_running_loop().create_future()
        done = self._recheck
        self._wake.set()
        await asyncio.shield(done)

    async def worker_lost(self, base: str, grace: float = 2.0) -> bool:
        """After a connection to the worker at `base` failed: wait briefly for the owner to
        notice the worker's exit. True once it has (a restart is under way, and the next
        `ensure_ready` waits for it instead of returning the dead worker's URL)."""
        if self._successor is not None:
            return await self._successor.worker_lost(base, grace)
        worker = self._worker
        if worker is not None and not worker.watched:  # a remote server: nothing to restart
            return False
        if self.replicas is not None:  # another replica takes the retry, if one is ready
            return await self.replicas.lost(base, grace)
        deadline = time.monotonic() + grace
        while self._upstream == base and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self._upstream != base

    async def close(self) -> None:
        """Stop the owner task; on its way out it stops the worker (gateway shutdown, a
        model replaced or removed)."""
        task = self._task
        if task is not None and not task.done():
            if not task.cancelling():  # once: a second cancel would cut its cleanup short
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the owner ---------------------------------------------------------------------

    def _set(self, new: State, error: str | None = None) -> None:
        check_transition(self._state, new)
        old, self._state = self._state, new
        if new is State.failed:
            self._failures += 1
            self._failed_at = time.monotonic()
            self._last_error = error
            log.error("model %s failed: %s", self.name, error)
        elif error:
            self._last_error = error
        if old is not new:
            log.info("model %s: %s -> %s", self.name, old, new)
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in self.listeners:
            listener(self, old)

    async def _own(self) -> None:
        try:
            while True:
                self._wake.clear()
                state, target = self._state, self._target
                if self._recheck is not None:
                    await self._look_again()
                elif state is State.absent and target is not Target.stopped:
                    await self._download()
                elif state is State.cached and target is Target.ready and not self._gated:
                    await self._launch()
                elif state is State.ready and target is Target.ready and not self.moving:
                    await self._watch()
                elif state is State.ready:
                    await self._stop()
                elif state is State.failed and self.replicas and self.replicas.running:
                    await self.replicas.stop()  # a failed model serves from none of them
                elif state is State.failed and self._retry:
                    await self._retry_failed()
                else:
                    await self._wake.wait()
        finally:  # cancelled by close(): the worker goes with the owner
            if self._recheck is not None:
                self._recheck.cancel()
            if self._state in (State.ready, State.starting):
                self._set(State.stopping)
            await self._stop_worker()
            if self._state is State.stopping:
                self._set(State.cached)

    async def _look_again(self) -> None:
        """forget_weights: where are the weights now?"""
        done, self._recheck = self._recheck, None
        assert done is not None
        try:
            self._weights = await asyncio.to_thread(local_weights, self.spec,
                                                    self.ctx.cache_dir)
            if self._weights is None and self._state in (State.cached, State.failed):
                self._set(State.absent)
        except Exception as exc:  # told to the caller, not the end of the owner
            done.set_exception(exc)
        finally:
            if not done.done():
                done.set_result(None)

    async def _retry_failed(self) -> None:
        self._retry = False
        self._restarts = 0
        try:
            self._weights = await asyncio.to_thread(local_weights, self.spec,
                                                    self.ctx.cache_dir)
        except SourceUnavailable as exc:
            self._set(State.failed, str(exc))
            return
        needs_download = isinstance(self.spec.source, HubSource) and self._weights is None
        self._set(State.absent if needs_download else State.cached)

    async def _download(self) -> None:
        source = self.spec.source
        assert isinstance(source, HubSource)
        self._set(State.downloading)
        try:
            path = await self.ctx.download(self.spec.id, source, self._progress)
        except DownloadCancelled:
            self._download_progress = None
            self._target = Target.stopped
            self._set(State.absent, "download cancelled")
            return
        except Exception as exc:  # any hub or disk error fails the download, with its reason
            self._set(State.failed, f"download of {source.hf}@{source.revision} failed: {exc}")
            return
        self._weights = path
        self._set(State.cached)
        if self._target is Target.cached:
            self._target = Target.stopped  # downloaded as asked; nothing more to do

    def _progress(self, progress: dict[str, object]) -> None:
        self._download_progress = progress

    async def _launch(self) -> None:
        """cached → starting → ready, retrying with backoff; failed when retries run out."""
        if self._state is not State.starting:  # a crash restart is already in `starting`
            self._set(State.starting)
        while self._target is Target.ready:
            try:
                self._upstream = await self._start_once()
            except (WorkerStartError, BackendConfigError, PlacementError, OSError) as exc:
                if self.trial:
                    await self._trial_failed(exc)
                    continue
                permanent = isinstance(exc, BackendConfigError | PlacementError | OSError) or \
                    (isinstance(exc, WorkerStartError) and exc.permanent)
                if permanent:
                    self._start_failed(str(exc))
                    return
                if self._restarts >= self.spec.max_restarts:
                    self._start_failed(f"{exc}; gave up after {self._restarts} restart(s)")
                    return
                await self._backoff(str(exc))
                continue
            if self._running_pin == self._pin:
                self._fallback = None  # the pin asked for works: it stays
            self._set(State.ready)
            if self.replicas is not None:
                self.replicas.run()
            return
        # Unloaded while starting.
        self._set(State.stopping)
        await self._stop_worker()
        self._set(State.cached)

    async def _trial_failed(self, exc: BaseException) -> None:
        """A trial version's start failed: no retry, no `failed` (callers that wait for it
        keep waiting), until the rollout retires it (its callers then go elsewhere)."""
        self.trial_error = exc
        self._set(State.starting, str(exc))
        await self._until_unwanted()

    def _start_failed(self, error: str) -> None:
        """The start failed for good. A load that asked for a new pin leaves the model as
        it was: the previous pin again, and loaded again there if it was loaded."""
        fallback = self._fallback
        if fallback is not None and self._running_pin == self._pin:
            asked = "null" if self._pin is None else str(list(self._pin))
            back = "its own GPUs" if fallback.pin is None else f"GPUs {list(fallback.pin)}"
            error += f" (gpu_device_ids {asked} dropped: the model keeps {back})"
            self._pin, self._fallback = fallback.pin, None
            self._retry = fallback.reload
        self._set(State.failed, error)

    async def _start_once(self) -> str:
        """Start a worker and wait until it answers; return its base URL. Where it runs is a
        launcher's (`workers.launchers`): a `remote` model's server, else a local process on
        the GPUs the scheduler gives, or a Ray actor (`ModelContext.launch`)."""
        spec = self.spec
        self.ctx.check_servable(spec)
        self._running_pin = self._pin
        self._gpus = []
        worker: Worker
        if spec.backend is Backend.remote:
            policy = self.ctx.remote_policy(spec) if self.ctx.remote_policy else None
            worker = await RemoteLauncher(self.ctx.client, policy).start(spec, self._weights, [])
        else:
            worker = await self.ctx.launch(spec, self._weights, self._placed)
        self._worker = worker
        try:
            await worker.wait_ready(spec.start_timeout)
        except BaseException:
            await worker.stop()
            self._worker = None
            raise
        return worker.base_url

    async def _placed(self) -> list[int]:
        self._gpus = await self.scheduler.place(self)
        return self._gpus

    async def _backoff(self, reason: str) -> None:
        self._restarts += 1
        delay = min(0.5 * 2 ** (self._restarts - 1), MAX_BACKOFF)
        self._last_error = reason
        log.warning("model %s: %s; restart %d/%d in %.1f s", self.name, reason,
                    self._restarts, self.spec.max_restarts, delay)
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
        worker = self._worker
        if worker is None or not worker.watched:  # a remote server: nothing to watch
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
        self.crashes += 1
        uptime = time.monotonic() - worker.started_at
        reason = getattr(worker, "exit_reason", None) or f"worker exited with status {code}"
        tail = worker.tail(8)
        self._worker = None
        self._upstream = None
        if uptime > HEALTHY_UPTIME:
            self._restarts = 0
        log.warning("model %s: %s after %.0f s%s", self.name, reason, uptime,
                    f"; last output:\n{tail}" if tail else "")
        if self._restarts >= self.spec.max_restarts:
            self._set(State.failed, f"{reason}; gave up after {self._restarts} restart(s)")
            return
        await self._backoff(reason)
        await self._launch()

    async def _stop(self) -> None:
        self._set(State.stopping)
        await self._stop_worker()
        self._set(State.cached)

    async def _stop_worker(self) -> None:
        self._upstream = None
        if self.replicas is not None:
            await self.replicas.stop()
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None
        self._gpus = []
