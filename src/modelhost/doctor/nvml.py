"""The host's GPUs as doctor sees them: NVML's inventory (`gpu/inventory.py:read_gpus`, the
same reading the gateway's monitor takes) plus what only doctor asks: the driver's version,
the newest CUDA it supports, and each GPU's compute capability.

"No GPU" has two kinds. NVML's library is absent, or lists no device: the GPU checks do not
apply (`absent`). NVML is there but fails (the driver not loaded, its library and kernel
module of different versions, no permission, a GPU lost): that is a broken driver, reported
as such.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any

from modelhost.gpu.inventory import GpuSample, describe_nvml_error, read_gpus

_LIBRARY_NOT_FOUND = 12  # pynvml.NVML_ERROR_LIBRARY_NOT_FOUND


@dataclass(frozen=True)
class Gpu:
    sample: GpuSample
    capability: tuple[int, int] | None  # CUDA compute capability, e.g. (8, 0)

    @property
    def index(self) -> int:
        return self.sample.index

    @property
    def label(self) -> str:
        return f"GPU {self.sample.index} ({self.sample.name})"

    @property
    def capability_text(self) -> str:
        if self.capability is None:
            return "unknown"
        return f"{self.capability[0]}.{self.capability[1]}"


@dataclass(frozen=True)
class GpuReading:
    gpus: tuple[Gpu, ...] = ()
    driver: str | None = None  # "550.54.15"
    cuda: tuple[int, int] | None = None  # the newest CUDA the driver supports
    reason: str | None = None  # why there is no GPU reading
    absent: bool = False  # no driver or no device (not a failure)

    @property
    def available(self) -> bool:
        return bool(self.gpus)

    @property
    def cuda_text(self) -> str:
        return "unknown" if self.cuda is None else f"{self.cuda[0]}.{self.cuda[1]}"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _cuda(nvml: Any) -> tuple[int, int] | None:
    # NVML encodes CUDA 12.4 as 12040.
    try:
        version = int(nvml.nvmlSystemGetCudaDriverVersion())
    except nvml.NVMLError:
        return None
    return version // 1000, (version % 1000) // 10


def _capability(nvml: Any, index: int) -> tuple[int, int] | None:
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(
            nvml.nvmlDeviceGetHandleByIndex(index))
    except nvml.NVMLError:
        return None
    return int(major), int(minor)


def read_host(nvml: Any = None) -> GpuReading:
    """Initialise NVML, read everything, shut it down. `nvml`: a pynvml-like module (the
    tests' stand-in); by default `pynvml` itself."""
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            return GpuReading(reason="nvidia-ml-py is not installed", absent=True)
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        absent = getattr(exc, "value", None) == getattr(
            nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", _LIBRARY_NOT_FOUND)
        return GpuReading(reason=describe_nvml_error(nvml, exc), absent=absent)
    try:
        samples = read_gpus(nvml)
        if not samples:
            return GpuReading(reason="no NVIDIA GPU found (NVML lists no device)", absent=True)
        try:
            driver: str | None = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            driver = None
        gpus = tuple(Gpu(s, _capability(nvml, s.index)) for s in samples)
        return GpuReading(gpus, driver, _cuda(nvml))
    except nvml.NVMLError as exc:
        return GpuReading(reason=describe_nvml_error(nvml, exc))
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
