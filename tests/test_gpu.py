"""GPU inventory and monitoring.

On this machine (no NVIDIA driver) the real pynvml is used for the "no GPU" path. The device
readings are checked against `FakeNvml`, a small stand-in for the NVIDIA driver with pynvml's
function names and signatures; `test_real_nvml` checks the real path where a driver exists.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from modelhost.gpu.inventory import (
    GpuMonitor,
    GpuProcess,
    GpuSample,
    describe_nvml_error,
    gpu_states,
    read_gpus,
)
from modelhost.gpu.placement import GpuState

# nvidia-ml-py has no type information: a module object (attributes typed Any).
pynvml = importlib.import_module("pynvml")

LOGGER = "modelhost.gpu.inventory"
GIB = 1024**3


def _has_nvidia_driver() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


HAS_DRIVER = _has_nvidia_driver()


# -- a stand-in for the NVIDIA driver ------------------------------------------------------


class FakeNVMLError(Exception):
    """pynvml.NVMLError's shape: an error code in `value`."""

    NAMES = {1: "Uninitialized", 3: "Not Supported", 9: "Driver Not Loaded",
             12: "NVML Shared Library Not Found", 15: "GPU is lost"}

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self.NAMES.get(self.value, f"NVML Error with code {self.value}")


@dataclass
class FakeGpu:
    name: str | bytes
    uuid: str
    total: int
    used: int
    utilization: tuple[int, int] = (0, 0)
    temperature: int = 40
    power_mw: int = 70_000
    limit_mw: int = 700_000
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)


class FakeNvml:
    """The functions of pynvml that modelhost uses, over a list of FakeGpu."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_ERROR_UNINITIALIZED = 1
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_GPU_IS_LOST = 15

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None,
                 delay: float = 0.0) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.delay = delay
        self.lost = False
        self.initialized = False
        self.inits = 0
        self.shutdowns = 0
        self.reads = 0
        self.in_read = False
        self.threads: set[int] = set()

    def _check(self, gpu: FakeGpu, metric: str) -> None:
        if not self.initialized:
            raise FakeNVMLError(self.NVML_ERROR_UNINITIALIZED)
        if metric in gpu.unsupported:
            raise FakeNVMLError(self.NVML_ERROR_NOT_SUPPORTED)

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)
        self.inits += 1
        self.initialized = True

    def nvmlShutdown(self) -> None:
        if not self.initialized:
            raise FakeNVMLError(self.NVML_ERROR_UNINITIALIZED)
        self.shutdowns += 1
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        if not self.initialized:
            raise FakeNVMLError(self.NVML_ERROR_UNINITIALIZED)
        if self.lost:
            raise FakeNVMLError(self.NVML_ERROR_GPU_IS_LOST)
        self.threads.add(threading.get_ident())
        self.reads += 1
        if self.delay:
            self.in_read = True
            time.sleep(self.delay)
            self.in_read = False
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if not self.initialized:
            raise FakeNVMLError(self.NVML_ERROR_UNINITIALIZED)
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str | bytes:
        self._check(handle, "name")
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        self._check(handle, "uuid")
        return handle.uuid

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        self._check(handle, "memory")
        return SimpleNamespace(total=handle.total, used=handle.used,
                               free=handle.total - handle.used)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> SimpleNamespace:
        self._check(handle, "utilization")
        return SimpleNamespace(gpu=handle.utilization[0], memory=handle.utilization[1])

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        self._check(handle, "temperature")
        assert sensor == self.NVML_TEMPERATURE_GPU
        return handle.temperature

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        self._check(handle, "power")
        return handle.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeGpu) -> int:
        self._check(handle, "power_limit")
        return handle.limit_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[SimpleNamespace]:
        self._check(handle, "processes")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.processes]


def two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu("NVIDIA H200", "GPU-aaaa", 141 * GIB, 20 * GIB, utilization=(87, 40),
                temperature=61, power_mw=512_345, limit_mw=700_000,
                processes=[(101, 12 * GIB), (102, 6 * GIB), (999, 1 * GIB)]),
        # An older board (and an older pynvml returning bytes) without temperature or
        # power readings; a process whose memory the driver cannot tell.
        FakeGpu(b"NVIDIA A10", "GPU-bbbb", 24 * GIB, 3 * GIB, utilization=(5, 2),
                processes=[(101, 2 * GIB), (103, None)],
                unsupported={"temperature", "power", "power_limit"}),
    ]


# -- no GPU: the real pynvml on a machine without a driver ----------------------------------


@pytest.mark.skipif(HAS_DRIVER, reason="this machine has an NVIDIA driver")
def test_no_driver_says_why_once_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    monitor = GpuMonitor()
    assert monitor.start() is False
    assert monitor.start() is False  # a retry does not repeat the warning
    assert monitor.available is False
    assert monitor.unavailable_reason == "no NVIDIA driver (NVML library not found)"
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert records[0].getMessage() == \
        "no GPU: no NVIDIA driver (NVML library not found); running on CPU"
    assert records[0].exc_info is None and records[0].exc_text is None
    assert "Traceback" not in caplog.text
    assert monitor.latest() == []
    assert monitor.history(0) == []
    assert monitor.sample() == []
    assert monitor.memory_used_by({1, 2}) == {}

    async def sampler() -> None:
        assert monitor.start_sampling() is None
        assert await monitor.sample_now() == []
        await monitor.run()  # returns at once
        await monitor.stop()

    asyncio.run(sampler())
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1


@pytest.mark.parametrize(("code", "reason"), [
    (12, "no NVIDIA driver (NVML library not found)"),
    (9, "the NVIDIA driver is not loaded"),
    (999, "NVML error: NVML Error with code 999"),
], ids=["library-not-found", "driver-not-loaded", "other"])
def test_init_failure_reasons(code: int, reason: str,
                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    fake = FakeNvml(two_gpus(), init_error=code)
    monitor = GpuMonitor(nvml=fake)
    assert monitor.start() is False
    assert monitor.unavailable_reason == reason
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == \
        [f"no GPU: {reason}; running on CPU"]
    assert monitor.latest() == []


def test_driver_without_devices() -> None:
    fake = FakeNvml([])
    monitor = GpuMonitor(nvml=fake)
    assert monitor.start() is False
    assert monitor.unavailable_reason == "no NVIDIA GPU found (NVML lists no device)"
    assert fake.shutdowns == 1 and not fake.initialized


def test_a_driver_that_appears_later_is_found_by_a_retry() -> None:
    fake = FakeNvml(two_gpus(), init_error=9)
    monitor = GpuMonitor(nvml=fake)
    assert monitor.start() is False
    fake.init_error = None
    assert monitor.start() is True
    assert monitor.available and monitor.unavailable_reason is None
    assert len(monitor.latest()) == 2


@pytest.mark.parametrize(("code", "reason"), [
    ("NVML_ERROR_LIBRARY_NOT_FOUND", "no NVIDIA driver (NVML library not found)"),
    ("NVML_ERROR_NO_PERMISSION", "no permission to query the NVIDIA driver (NVML)"),
    ("NVML_ERROR_TIMEOUT", "NVML error: Timeout"),
], ids=["library-not-found", "no-permission", "other"])
def test_describe_real_pynvml_errors(code: str, reason: str) -> None:
    error = pynvml.NVMLError(getattr(pynvml, code))
    assert describe_nvml_error(pynvml, error) == reason


# -- readings ------------------------------------------------------------------------------


def test_read_gpus() -> None:
    fake = FakeNvml(two_gpus())
    fake.nvmlInit()
    before = time.time()
    h200, a10 = read_gpus(fake)
    assert h200 == GpuSample(
        index=0, name="NVIDIA H200", uuid="GPU-aaaa", memory_total=141 * GIB,
        memory_used=20 * GIB, memory_free=121 * GIB, utilization_gpu=87,
        utilization_memory=40, temperature_c=61, power_w=512.345, power_limit_w=700.0,
        processes=(GpuProcess(101, 12 * GIB), GpuProcess(102, 6 * GIB),
                   GpuProcess(999, 1 * GIB)),
        taken_at=h200.taken_at)
    assert before <= h200.taken_at <= time.time()
    assert a10.index == 1
    assert a10.name == "NVIDIA A10"  # bytes decoded
    assert (a10.memory_total, a10.memory_used, a10.memory_free) == \
        (24 * GIB, 3 * GIB, 21 * GIB)
    assert (a10.utilization_gpu, a10.utilization_memory) == (5, 2)
    assert a10.temperature_c is None
    assert a10.power_w is None and a10.power_limit_w is None
    assert a10.processes == (GpuProcess(101, 2 * GIB), GpuProcess(103, 0))


def test_read_gpus_without_process_list_or_utilisation() -> None:
    gpu = FakeGpu("NVIDIA GH200", "GPU-cccc", 96 * GIB, 1 * GIB,
                  unsupported={"processes", "utilization", "uuid"})
    fake = FakeNvml([gpu])
    fake.nvmlInit()
    (sample,) = read_gpus(fake)
    assert sample.processes == ()
    assert sample.utilization_gpu is None and sample.utilization_memory is None
    assert sample.uuid == ""
    assert sample.temperature_c == 40


def test_read_gpus_needs_memory() -> None:
    gpus = two_gpus()
    gpus[1].unsupported.add("memory")
    fake = FakeNvml(gpus)
    fake.nvmlInit()
    with pytest.raises(FakeNVMLError):
        read_gpus(fake)


def test_monitor_readings_history_and_process_memory() -> None:
    gpus = two_gpus()
    fake = FakeNvml(gpus)
    monitor = GpuMonitor(history=3, nvml=fake)
    assert monitor.start() is True and monitor.available
    assert [s.name for s in monitor.latest()] == ["NVIDIA H200", "NVIDIA A10"]
    for used in (21, 22, 23, 24, 25):
        gpus[0].used = used * GIB
        monitor.sample()
    kept = monitor.history(0)
    assert [s.memory_used // GIB for s in kept] == [23, 24, 25]
    assert [s.taken_at for s in kept] == sorted(s.taken_at for s in kept)
    assert len(monitor.history(1)) == 3
    assert monitor.history(7) == []
    assert monitor.latest()[0].memory_used == 25 * GIB
    assert monitor.latest()[0].memory_free == 116 * GIB
    # A worker's process group: pids 101 and 103 (103's memory cannot be told).
    assert monitor.memory_used_by({101, 103}) == {0: 12 * GIB, 1: 2 * GIB}
    assert monitor.memory_used_by({101, 102}) == {0: 18 * GIB, 1: 2 * GIB}
    assert monitor.memory_used_by({102}) == {0: 6 * GIB}
    assert monitor.memory_used_by({4242}) == {}
    assert monitor.memory_used_by(set()) == {}
    assert gpu_states(monitor.latest()) == [GpuState(0, 141 * GIB, 116 * GIB),
                                            GpuState(1, 24 * GIB, 21 * GIB)]


def test_sampling_failure_keeps_readings_and_is_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    fake = FakeNvml(two_gpus())
    monitor = GpuMonitor(nvml=fake)
    monitor.start()
    before = monitor.latest()
    caplog.clear()
    fake.lost = True
    for _ in range(3):
        assert monitor.sample() == before
    assert monitor.last_error == "a GPU fell off the bus (NVML: GPU is lost)"
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.WARNING]
    fake.lost = False
    assert monitor.sample() != before
    assert monitor.last_error is None
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 2 and messages[1].startswith("GPU sampling works again")
    assert "Traceback" not in caplog.text


def test_monitor_arguments() -> None:
    with pytest.raises(ValueError, match="interval"):
        GpuMonitor(interval=0)
    with pytest.raises(ValueError, match="history"):
        GpuMonitor(history=0)


# -- the background sampler ----------------------------------------------------------------


def test_sampler_runs_in_a_thread_and_stops_cleanly() -> None:
    fake = FakeNvml(two_gpus(), delay=0.03)
    monitor = GpuMonitor(interval=0.01, history=1000, nvml=fake)
    assert monitor.start() is True
    start_reads = fake.reads
    ticks_during_reads = 0

    async def ticker() -> None:
        nonlocal ticks_during_reads
        while True:
            if fake.in_read:
                ticks_during_reads += 1
            await asyncio.sleep(0.002)

    async def main() -> None:
        tick = asyncio.create_task(ticker())
        task = monitor.start_sampling()
        assert task is not None
        assert monitor.start_sampling() is task  # one sampler at a time
        deadline = time.monotonic() + 10
        while fake.reads < start_reads + 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await monitor.stop()
        assert task.done() and not task.cancelled() and task.exception() is None
        tick.cancel()
        await asyncio.gather(tick, return_exceptions=True)

    asyncio.run(main())
    assert fake.reads >= start_reads + 5
    assert len(monitor.history(0)) == fake.reads  # every reading was recorded
    # The driver was read outside the event loop's thread, which kept running meanwhile.
    assert fake.threads - {threading.get_ident()}
    assert ticks_during_reads > 0
    # Stopped: NVML shut down once, no more readings.
    assert fake.shutdowns == 1 and not fake.initialized
    assert monitor.available is False
    reads = fake.reads
    time.sleep(0.05)
    assert fake.reads == reads
    assert monitor.sample() == []
    # The last readings stay for whoever looks.
    assert len(monitor.latest()) == 2


def test_sampler_can_be_stopped_before_it_runs_and_restarted() -> None:
    fake = FakeNvml(two_gpus())
    monitor = GpuMonitor(interval=0.01, nvml=fake)

    async def main() -> None:
        assert monitor.start()
        task = monitor.start_sampling()
        assert task is not None
        await monitor.stop()  # before the task had a chance to run
        assert task.done()
        await monitor.stop()  # twice is harmless
        assert monitor.start()
        again = monitor.start_sampling()
        assert again is not None and again is not task
        await asyncio.sleep(0.05)
        await monitor.stop()
        assert again.done()

    asyncio.run(main())
    assert fake.inits == 2 and fake.shutdowns == 2


def test_sample_now_reads_in_a_thread() -> None:
    fake = FakeNvml(two_gpus())
    monitor = GpuMonitor(nvml=fake)
    monitor.start()
    fake.gpus[1].used = 10 * GIB

    async def main() -> list[GpuSample]:
        return await monitor.sample_now()

    samples = asyncio.run(main())
    assert samples[1].memory_free == 14 * GIB
    assert monitor.latest() == samples
    assert fake.threads - {threading.get_ident()}


# -- the real driver, where there is one ---------------------------------------------------


@pytest.mark.skipif(not HAS_DRIVER, reason="no NVIDIA driver on this machine")
def test_real_nvml() -> None:
    monitor = GpuMonitor(interval=0.2)
    assert monitor.start() is True, monitor.unavailable_reason
    samples = monitor.latest()
    assert samples
    for index, s in enumerate(samples):
        assert s.index == index
        assert s.name and s.uuid.startswith(("GPU-", "MIG-"))
        assert s.memory_total > 0 and 0 <= s.memory_free <= s.memory_total
        assert 0 <= s.memory_used <= s.memory_total
        assert all(p.pid > 0 and p.used_bytes >= 0 for p in s.processes)

    async def main() -> None:
        monitor.start_sampling()
        await asyncio.sleep(0.7)
        await monitor.stop()

    asyncio.run(main())
    assert len(monitor.history(0)) >= 3
    assert gpu_states(monitor.latest())[0].memory_total == samples[0].memory_total
