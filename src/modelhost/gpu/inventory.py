"""GPU inventory and live samples through NVML (the `nvidia-ml-py` package, `import pynvml`).

What is read, for every device NVML lists: index, name, UUID, memory total/used/free (bytes),
GPU and memory-controller utilisation (percent), temperature (°C), power draw and enforced
power limit (watts), and the compute processes with the memory each one holds. A metric the
device does not support (NVML raises `NVMLError`, typically NotSupported on some boards, in
MIG mode or in a VM) is `None`; the memory figures and the device list are required.

GPU numbering
-------------
modelhost names GPUs by their **NVML index**: NVML enumerates the physical devices in PCI bus
order and ignores `CUDA_VISIBLE_DEVICES`. A model's `gpus: [1, 2]` means NVML devices 1 and 2;
the gateway starts its worker with `CUDA_VISIBLE_DEVICES=1,2` built from those indices. CUDA
numbers devices fastest-first unless `CUDA_DEVICE_ORDER=PCI_BUS_ID` is set, so the worker's
launch plan must set `CUDA_DEVICE_ORDER=PCI_BUS_ID` for CUDA's numbering to agree with NVML's
(that is the worker's business, not this module's). Inside a container NVML sees only the
devices given to it, numbered from 0, which is also what CUDA sees there.

Processes
---------
`GpuSample.processes` lists NVML's compute processes. The gateway attributes GPU memory to a
worker by passing the pids of the worker's process group to `GpuMonitor.memory_used_by`. In a
container that does not share the host's pid namespace, NVML may report host pids (or none):
then nothing matches, and the gateway must fall back to its own estimate of the worker's size.

No GPU
------
With no driver, no device or any NVML failure at start, `GpuMonitor.start()` records a short
reason (`unavailable_reason`, e.g. "no NVIDIA driver (NVML library not found)"), logs it once
at warning level ("...; running on CPU"), without a traceback, and the monitor stays empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from modelhost.gpu.placement import GpuState

log = logging.getLogger(__name__)

T = TypeVar("T")

# pynvml's error codes, used when the module passed in does not define the constants.
_ERROR_REASONS: tuple[tuple[str, int, str], ...] = (
    ("NVML_ERROR_LIBRARY_NOT_FOUND", 12, "no NVIDIA driver (NVML library not found)"),
    ("NVML_ERROR_DRIVER_NOT_LOADED", 9, "the NVIDIA driver is not loaded"),
    ("NVML_ERROR_NO_PERMISSION", 4, "no permission to query the NVIDIA driver (NVML)"),
    ("NVML_ERROR_LIB_RM_VERSION_MISMATCH", 18, "the NVIDIA driver and its NVML library have "
     "different versions (reload the driver or reboot)"),
    ("NVML_ERROR_GPU_IS_LOST", 15, "a GPU fell off the bus (NVML: GPU is lost)"),
)


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on one GPU and the device memory it holds."""

    pid: int
    used_bytes: int


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU. Memory in bytes; `None` where the device does not say."""

    index: int
    name: str
    uuid: str
    memory_total: int
    memory_used: int
    memory_free: int
    utilization_gpu: int | None
    utilization_memory: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None
    processes: tuple[GpuProcess, ...]
    taken_at: float  # time.time()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _optional(nvml: Any, read: Callable[..., T], *args: Any) -> T | None:
    """A metric that a device may not support: NVMLError (NotSupported, ...) reads as None."""
    try:
        return read(*args)
    except nvml.NVMLError:
        return None


def _processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    found = _optional(nvml, nvml.nvmlDeviceGetComputeRunningProcesses, handle)
    # usedGpuMemory is None where the driver cannot tell (Windows WDDM): counted as 0.
    return tuple(GpuProcess(pid=int(p.pid), used_bytes=int(p.usedGpuMemory or 0))
                 for p in found or ())


def read_gpus(nvml: Any) -> list[GpuSample]:
    """Read every GPU through `nvml`, an initialised pynvml module (or a stand-in with the same
    functions). Optional metrics that raise `nvml.NVMLError` are None; a failure to list the
    devices or to read a device's memory raises `nvml.NVMLError`. Blocking: call it in a
    thread from async code."""
    taken_at = time.time()
    samples = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        rates = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
        temperature = _optional(nvml, nvml.nvmlDeviceGetTemperature, handle,
                                nvml.NVML_TEMPERATURE_GPU)
        power_mw = _optional(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = _optional(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        uuid = _optional(nvml, nvml.nvmlDeviceGetUUID, handle)
        samples.append(GpuSample(
            index=index,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            uuid=_text(uuid) if uuid is not None else "",
            memory_total=int(memory.total),
            memory_used=int(memory.used),
            memory_free=int(memory.free),
            utilization_gpu=int(rates.gpu) if rates is not None else None,
            utilization_memory=int(rates.memory) if rates is not None else None,
            temperature_c=int(temperature) if temperature is not None else None,
            power_w=power_mw / 1000 if power_mw is not None else None,
            power_limit_w=limit_mw / 1000 if limit_mw is not None else None,
            processes=_processes(nvml, handle),
            taken_at=taken_at,
        ))
    return samples


def describe_nvml_error(nvml: Any, exc: BaseException) -> str:
    """A short human reason for an NVML failure ("no NVIDIA driver (...)", "NVML error: ...")."""
    value = getattr(exc, "value", None)
    for name, default, reason in _ERROR_REASONS:
        if value is not None and value == getattr(nvml, name, default):
            return reason
    return f"NVML error: {exc}"


def gpu_states(samples: Iterable[GpuSample]) -> list[GpuState]:
    """The measured memory of each GPU, as placement takes it."""
    return [GpuState(index=s.index, memory_total=s.memory_total, memory_free=s.memory_free)
            for s in samples]


class GpuMonitor:
    """NVML inventory plus a background sampler keeping a short history per GPU.

    `start()` initialises NVML and takes a first sample (blocking, quick: call it once at
    startup, or through `asyncio.to_thread`); `start_sampling()` then starts an asyncio task
    that samples every `interval` seconds in a worker thread, so the event loop never blocks
    on the driver; `stop()` ends the task and shuts NVML down. Each GPU keeps its last
    `history` samples (150 samples every 2 s = 5 minutes by default) for charts.

    `nvml` is the pynvml module to use; by default `pynvml` itself is imported by `start()`.
    """

    def __init__(self, interval: float = 2.0, history: int = 150, nvml: Any = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if history < 1:
            raise ValueError("history must keep at least one sample")
        self.interval = interval
        self.unavailable_reason: str | None = None
        self.last_error: str | None = None  # the latest sampling failure, None once recovered
        self._nvml = nvml
        self._keep = history
        self._initialized = False
        self._latest: list[GpuSample] = []
        self._history: dict[int, deque[GpuSample]] = {}
        self._logged: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._wake: asyncio.Event | None = None

    # -- start and stop ------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """True while NVML is initialised and lists at least one GPU."""
        return self._initialized

    def start(self) -> bool:
        """Initialise NVML and take a first sample; True when GPUs are available.

        On failure (no driver, no device, an NVML error) `unavailable_reason` says why, the
        reason is logged once at warning level, and every reading stays empty. Calling
        `start()` again retries; the same reason is not logged twice.
        """
        if self._initialized:
            return True
        nvml = self._nvml
        if nvml is None:
            try:
                nvml = self._nvml = importlib.import_module("pynvml")
            except ImportError:
                return self._unavailable("nvidia-ml-py is not installed")
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return self._unavailable(describe_nvml_error(nvml, exc))
        try:
            samples = read_gpus(nvml)
        except nvml.NVMLError as exc:
            self._shutdown()
            return self._unavailable(describe_nvml_error(nvml, exc))
        if not samples:
            self._shutdown()
            return self._unavailable("no NVIDIA GPU found (NVML lists no device)")
        self._initialized = True
        self.unavailable_reason = None
        self._record(samples)
        log.info("GPUs: %s", "; ".join(
            f"{s.index}: {s.name}, {s.memory_total / 1024**3:.1f} GiB" for s in samples))
        return True

    def start_sampling(self) -> asyncio.Task[None] | None:
        """Start the background sampler in the running event loop (None without GPUs)."""
        if not self._initialized:
            return None
        if self._task is None or self._task.done():
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(self.run(),
                                                                name="gpu-monitor")
        return self._task

    async def run(self) -> None:
        """Sample every `interval` seconds until `stop()` (returns at once without GPUs)."""
        self._wake = asyncio.Event()
        try:
            while self._initialized and not self._closing:
                await self.sample_now()
                if self._closing:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
        finally:
            self._wake = None

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the sampler (letting a reading in progress finish) and shut NVML down."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        task, self._task = self._task, None
        hung = False
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                # A driver call that never returns (a wedged GPU): leave NVML alone.
                hung = True
                task.cancel()
                log.warning("GPU sampler did not stop within %.0f s", timeout)
        if self._initialized:
            self._initialized = False
            if not hung:
                self._shutdown()

    # -- readings ------------------------------------------------------------------------

    def sample(self) -> list[GpuSample]:
        """Read the GPUs now (blocking) and record the result; [] without GPUs."""
        if not self._initialized:
            return []
        try:
            samples = read_gpus(self._nvml)
        except self._nvml.NVMLError as exc:
            self._sampling_failed(exc)
            return self.latest()
        self._record(samples)
        return samples

    async def sample_now(self) -> list[GpuSample]:
        """Read the GPUs now, in a thread, and record the result (for example right before a
        placement decision, or after a worker stopped); [] without GPUs. On an NVML error
        the previous readings are returned and `last_error` says what failed."""
        if not self._initialized:
            return []
        nvml = self._nvml
        try:
            samples = await asyncio.to_thread(read_gpus, nvml)
        except nvml.NVMLError as exc:
            self._sampling_failed(exc)
            return self.latest()
        self._record(samples)
        return samples

    def latest(self) -> list[GpuSample]:
        """The most recent sample of each GPU, by index ([] without GPUs)."""
        return list(self._latest)

    def history(self, index: int) -> list[GpuSample]:
        """The recent samples of GPU `index`, oldest first ([] for an unknown index)."""
        return list(self._history.get(index, ()))

    def memory_used_by(self, pids: set[int]) -> dict[int, int]:
        """Bytes of device memory held by the processes `pids`, per GPU index, from the latest
        samples. Only GPUs where one of the pids appears are listed: {} means none of them
        holds GPU memory (or NVML cannot see them, see the module's notes on containers)."""
        used: dict[int, int] = {}
        for sample in self._latest:
            mine = [p.used_bytes for p in sample.processes if p.pid in pids]
            if mine:
                used[sample.index] = sum(mine)
        return used

    # -- internals -----------------------------------------------------------------------

    def _record(self, samples: list[GpuSample]) -> None:
        self._latest = list(samples)
        for sample in samples:
            kept = self._history.get(sample.index)
            if kept is None:
                kept = self._history[sample.index] = deque(maxlen=self._keep)
            kept.append(sample)
        if self.last_error is not None:
            log.info("GPU sampling works again (after: %s)", self.last_error)
            self.last_error = None

    def _sampling_failed(self, exc: BaseException) -> None:
        reason = describe_nvml_error(self._nvml, exc)
        if reason != self.last_error:
            log.warning("GPU sampling failed: %s; keeping the previous readings", reason)
        self.last_error = reason

    def _unavailable(self, reason: str) -> bool:
        self.unavailable_reason = reason
        if reason != self._logged:
            self._logged = reason
            log.warning("no GPU: %s; running on CPU", reason)
        return False

    def _shutdown(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()
