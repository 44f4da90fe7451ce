"""The Traffic page's live figures, sampled only while a dashboard page is open.

Nothing here runs on the request path: the relayed calls keep counting into their plain
tallies (`metrics/requests.py:RequestMetrics`) as they always do, and this sampler reads those
tallies through their public collector, every `INTERVAL` seconds, only while at least one
dashboard event stream is connected (`Traffic.watch`). Each sample is the difference from the
previous reading: requests per second by status class, latency percentiles estimated from
the histogram buckets, the gateway's mean overhead, time to first token, rejections by reason,
and completion tokens per second (from the usage ledger's rows, flushed once a second). With
no page open there is no sampler task and no history: the history covers the time someone
watched (Prometheus, `/metrics`, is the long-term record).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from prometheus_client.core import Metric

log = logging.getLogger(__name__)

INTERVAL = 5.0
KEEP = 720  # samples: an hour at INTERVAL

Histogram = dict[float, float]  # cumulative count by upper bound


class Reading:
    """One reading of the collector's families, by model."""

    def __init__(self, families: Iterable[Metric], tokens: dict[str, float]) -> None:
        self.at = time.monotonic()
        self.statuses: dict[tuple[str, str], float] = {}
        self.duration: dict[str, Histogram] = {}
        self.sums: dict[tuple[str, str], float] = {}  # (family, model) -> sum
        self.counts: dict[tuple[str, str], float] = {}
        self.ttft: dict[str, Histogram] = {}
        self.rejections: dict[tuple[str, str], float] = {}
        self.tokens = tokens
        for family in families:
            for sample in family.samples:
                model = sample.labels.get("model", "")
                name = sample.name
                if name == "modelhost_requests_total":
                    key = (model, sample.labels["status"])
                    self.statuses[key] = self.statuses.get(key, 0) + sample.value
                elif name == "modelhost_rejections_total":
                    key = (model, sample.labels["reason"])
                    self.rejections[key] = sample.value
                elif name.endswith("_bucket"):
                    into = self.duration if family.name.startswith(
                        "modelhost_request_duration") else self.ttft if family.name.startswith(
                        "modelhost_time_to_first") else None
                    if into is not None:
                        bound = float(sample.labels["le"])
                        hist = into.setdefault(model, {})
                        hist[bound] = hist.get(bound, 0) + sample.value
                elif name.endswith(("_sum", "_count")):
                    kind = name.rsplit("_", 1)[1]
                    target = self.sums if kind == "sum" else self.counts
                    key = (family.name, model)
                    target[key] = target.get(key, 0) + sample.value


def quantile(hist: Histogram, q: float) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated within its bucket (as
    Prometheus' histogram_quantile does); None without observations."""
    bounds = sorted(hist)
    if not bounds or hist[bounds[-1]] <= 0:
        return None
    rank = q * hist[bounds[-1]]
    low, below = 0.0, 0.0
    for bound in bounds:
        count = hist[bound]
        if count >= rank:
            if bound == float("inf"):
                return low
            inside = count - below
            return low + (bound - low) * ((rank - below) / inside if inside else 1.0)
        low, below = bound, count
    return low


def _delta(now: Histogram, before: Histogram | None) -> Histogram:
    before = before or {}
    return {b: max(0.0, v - before.get(b, 0.0)) for b, v in now.items()}


def sample(now: Reading, before: Reading) -> dict[str, Any]:
    """What happened between two readings, by model (rates per second)."""
    span = max(now.at - before.at, 1e-6)
    models: dict[str, dict[str, Any]] = {}

    def entry(model: str) -> dict[str, Any]:
        return models.setdefault(model, {"rps": 0.0, "errors": {}, "p50": None, "p95": None,
                                         "p99": None, "overhead_ms": None, "ttft_p50": None,
                                         "tokens_per_s": 0.0})

    for (model, status), value in now.statuses.items():
        diff = value - before.statuses.get((model, status), 0.0)
        if diff > 0:
            row = entry(model)
            row["rps"] += diff / span
            if status != "2xx":
                row["errors"][status] = row["errors"].get(status, 0) + diff
    for (model, reason), value in now.rejections.items():
        diff = value - before.rejections.get((model, reason), 0.0)
        if diff > 0:
            entry(model)["errors"][reason] = diff
    for model, hist in now.duration.items():
        recent = _delta(hist, before.duration.get(model))
        if any(recent.values()):
            row = entry(model)
            for q in (50, 95, 99):
                found = quantile(recent, q / 100)
                row[f"p{q}"] = None if found is None else round(found * 1000, 2)
    for (family, model), total in now.sums.items():
        if not family.startswith("modelhost_gateway_overhead"):
            continue
        count = now.counts.get((family, model), 0) - before.counts.get((family, model), 0)
        if count > 0:
            spent = total - before.sums.get((family, model), 0.0)
            entry(model)["overhead_ms"] = round(spent / count * 1000, 3)
    for model, hist in now.ttft.items():
        recent = _delta(hist, before.ttft.get(model))
        found = quantile(recent, 0.5)
        if found is not None:
            entry(model)["ttft_p50"] = round(found * 1000, 1)
    for model, tokens in now.tokens.items():
        diff = tokens - before.tokens.get(model, tokens)
        if diff > 0:
            entry(model)["tokens_per_s"] = round(diff / span, 2)
    for row in models.values():
        row["rps"] = round(row["rps"], 3)
    return {"t": time.time(), "models": models}


class Traffic:
    """Samples while watched. `collect` reads the request tallies' families; `tokens`
    reads the completion tokens counted so far by model (the usage table)."""

    def __init__(self, collect: Callable[[], Iterable[Metric]],
                 tokens: Callable[[], Awaitable[dict[str, float]]],
                 interval: float = INTERVAL) -> None:
        self.collect = collect
        self.tokens = tokens
        self.interval = interval
        self.history: deque[dict[str, Any]] = deque(maxlen=KEEP)
        self.watchers = 0
        self._task: asyncio.Task[None] | None = None
        self._listeners: set[asyncio.Queue[dict[str, Any]]] = set()

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """The samples taken while the caller watches; the first watcher starts the sampler,
        the last one to leave stops it."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(16)
        self._listeners.add(queue)
        self.watchers += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="dashboard-traffic")
        try:
            yield queue
        finally:
            self._listeners.discard(queue)
            self.watchers -= 1
            if self.watchers == 0 and self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
                self._task = None

    async def _read(self) -> Reading:
        try:
            tokens = await self.tokens()
        except Exception:  # the database being busy must not stop the charts
            log.debug("dashboard: usage not read", exc_info=True)
            tokens = {}
        return Reading(self.collect(), tokens)

    async def _run(self) -> None:
        before = await self._read()
        while True:
            await asyncio.sleep(self.interval)
            now = await self._read()
            point = sample(now, before)
            before = now
            self.history.append(point)
            for queue in self._listeners:
                if queue.full():
                    with contextlib.suppress(asyncio.QueueEmpty):
                        queue.get_nowait()
                queue.put_nowait(point)
