"""What /metrics reads at scrape time: the models' lifecycle and load, the GPUs, the workers'
processes, and the gateway itself.

Nothing here runs per request. The collectors (prometheus_client `Collector`s) read what the
models' owners and the GPU monitor already keep, only when /metrics is scraped; the few
figures nobody keeps (restarts as a counter that never goes back, the time of the last
failure, how long each load took) are noted by `LifecycleMetrics`, a registry listener called
on each state change of a model, never by a request. Labels are bounded by construction: the
`model` label comes from the registry's models (configured ids only, never a name a client
typed), `state` from the lifecycle's states, `gpu` and `name` from NVML's devices.

- `LifecycleMetrics`: restarts, last failure time, the load-duration histogram (a model
  going cached -> starting -> ready; a crash restart is counted as a restart, not a load).
- `ModelCollector`: in flight, queue depth and limit, state (one-hot), restarts, last failure,
  download progress, and each local worker's resident memory and CPU time, read from /proc for
  the worker's process tree (the shim and everything it started), with no psutil (a test-only
  dependency) and nothing where /proc is not there.
- `GpuCollector`: the GPU monitor's latest NVML samples (nothing at all without a GPU).
- `InfoCollector`: `modelhost_up` and `modelhost_build_info{version}`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelhost import __version__
from modelhost.gpu.inventory import GpuMonitor
from modelhost.registry.lifecycle import State
from modelhost.registry.model import Model
from modelhost.registry.registry import Registry

# Seconds from cached to ready: a small model on CPU in a second, a large one in minutes.
LOAD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class LifecycleMetrics:
    """Figures noted on a model's state changes (`changed` is a registry listener), kept by
    model id, so that they survive the model's spec being replaced."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.restarts: dict[str, int] = {}
        self.failed_at: dict[str, float] = {}  # time.time() of the latest failure
        self.started = time.time()
        self._loading: dict[str, float] = {}  # model id -> monotonic time the load began
        self.load_duration = Histogram(
            "modelhost_model_load_duration_seconds",
            "Seconds a model took from cached to ready (its worker started and answering).",
            ["model"], buckets=LOAD_BUCKETS, registry=registry)

    def changed(self, model: Model, previous: State) -> None:
        new, model_id = model.state, model.spec.id
        if new is State.starting:
            if previous in (State.starting, State.ready):  # a start retried, a crash
                self.restarts[model_id] = self.restarts.get(model_id, 0) + 1
            elif previous is State.cached:
                self._loading[model_id] = time.monotonic()
        elif new is State.ready:
            began = self._loading.pop(model_id, None)
            if began is not None:
                self.load_duration.labels(model_id).observe(time.monotonic() - began)
        else:
            self._loading.pop(model_id, None)  # the load was given up or failed
        if new is State.failed:
            self.failed_at[model_id] = time.time()

    def last_failure(self, model: Model) -> float:
        """When the model last failed (0: never). A model found failed at start (its source
        unavailable) failed when the gateway started."""
        at = self.failed_at.get(model.spec.id)
        if at is None and model.state is State.failed:
            return self.started
        return at or 0.0


class ModelCollector(Collector):
    """The per-model gauges and counters, read from the models at scrape time."""

    def __init__(self, models: Registry, lifecycle: LifecycleMetrics) -> None:
        self.models = models
        self.lifecycle = lifecycle

    def collect(self) -> Iterator[Metric]:
        label = ["model"]
        in_flight = GaugeMetricFamily("modelhost_requests_in_flight",
                                      "Requests at the model's worker now.", labels=label)
        depth = GaugeMetricFamily("modelhost_queue_depth",
                                  "Requests waiting for a slot at the model's worker.",
                                  labels=label)
        limit = GaugeMetricFamily("modelhost_queue_limit",
                                  "Requests that may wait (max_queue); past it: 429.",
                                  labels=label)
        state = GaugeMetricFamily("modelhost_model_state",
                                  "1 for the model's lifecycle state, 0 for the others.",
                                  labels=["model", "state"])
        restarts = CounterMetricFamily("modelhost_model_restarts",
                                       "Worker restarts (a crash, a start retried).",
                                       labels=label)
        failure = GaugeMetricFamily("modelhost_model_last_failure_timestamp_seconds",
                                    "Unix time of the model's last failure (0: never).",
                                    labels=label)
        done = GaugeMetricFamily("modelhost_download_bytes",
                                 "Bytes of the model's weights downloaded.", labels=label)
        total = GaugeMetricFamily("modelhost_download_total_bytes",
                                  "Bytes of the model's weights to download.", labels=label)
        rss = GaugeMetricFamily("modelhost_worker_resident_memory_bytes",
                                "Resident memory of the model's worker processes.",
                                labels=label)
        cpu = CounterMetricFamily("modelhost_worker_cpu_seconds",
                                  "CPU time of the model's worker processes (user + system).",
                                  labels=label)
        for model in list(self.models.models.values()):
            model_id = model.spec.id
            in_flight.add_metric([model_id], model.admission.active)
            depth.add_metric([model_id], model.admission.waiting)
            limit.add_metric([model_id], model.admission.max_queue)
            for each in State:
                state.add_metric([model_id, each.value], 1.0 if model.state is each else 0.0)
            restarts.add_metric([model_id], self.lifecycle.restarts.get(model_id, 0))
            failure.add_metric([model_id], self.lifecycle.last_failure(model))
            progress = model.download_progress or {}
            got, size = progress.get("bytes_done"), progress.get("bytes_total")
            if isinstance(got, int | float):
                done.add_metric([model_id], got)
            if isinstance(size, int | float):
                total.add_metric([model_id], size)
            pid = model.worker_pid
            usage = process_tree_usage(pid) if pid is not None else None
            if usage is not None:
                rss.add_metric([model_id], usage[0])
                cpu.add_metric([model_id], usage[1])
        yield from (in_flight, depth, limit, state, restarts, failure)
        # Families with no sample at all are left out rather than written empty.
        yield from (family for family in (done, total, rss, cpu) if family.samples)


def process_tree_usage(root: int) -> tuple[int, float] | None:
    """(resident bytes, CPU seconds) of process `root` and all its descendants, from
    /proc/<pid>/stat; the CPU time includes the children they have reaped (cutime, cstime),
    so a counter that only a restart resets. None when `root` is gone (or no /proc)."""
    rss = ticks = 0
    seen: set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            # Fields 14-17 (utime, stime, cutime, cstime) and 24 (rss, pages), counted from 1;
            # the split starts at field 3.
            ticks += sum(int(value) for value in fields[11:15])
            rss += int(fields[21])
        except (OSError, IndexError, ValueError):
            if pid == root:
                return None
            continue  # exited meanwhile
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError):
                    children = Path(f"/proc/{pid}/task/{task}/children").read_text()
                    todo.extend(int(child) for child in children.split())
    return rss * _PAGE, ticks / _TICKS


class GpuCollector(Collector):
    """Per GPU, from the monitor's latest NVML samples (taken every few seconds by its own
    sampler; a scrape never calls the driver). No GPU: no family at all."""

    def __init__(self, monitor: GpuMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        samples = self.monitor.latest()
        if not samples:
            return
        labels = ["gpu", "name"]
        used = GaugeMetricFamily("modelhost_gpu_memory_used_bytes", "GPU memory in use.",
                                 labels=labels)
        total = GaugeMetricFamily("modelhost_gpu_memory_total_bytes", "GPU memory in all.",
                                  labels=labels)
        util = GaugeMetricFamily("modelhost_gpu_utilization_ratio",
                                 "Share of the last sample period the GPU was busy (0..1).",
                                 labels=labels)
        temp = GaugeMetricFamily("modelhost_gpu_temperature_celsius", "GPU temperature.",
                                 labels=labels)
        power = GaugeMetricFamily("modelhost_gpu_power_watts", "GPU power draw.",
                                  labels=labels)
        for sample in samples:
            key = [str(sample.index), sample.name]
            used.add_metric(key, sample.memory_used)
            total.add_metric(key, sample.memory_total)
            # A figure the board does not report (None) has no sample.
            if sample.utilization_gpu is not None:
                util.add_metric(key, sample.utilization_gpu / 100)
            if sample.temperature_c is not None:
                temp.add_metric(key, sample.temperature_c)
            if sample.power_w is not None:
                power.add_metric(key, sample.power_w)
        yield from (family for family in (used, total, util, temp, power) if family.samples)


class InfoCollector(Collector):
    """`modelhost_up` (1 whenever the gateway answers) and `modelhost_build_info`."""

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("modelhost_up", "1: the gateway answers.", value=1)
        info = GaugeMetricFamily("modelhost_build_info", "The gateway's version (value 1).",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
