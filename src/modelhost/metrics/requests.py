"""Per-request metrics of the relayed calls, counted at a few hundred nanoseconds a request.

prometheus_client's own Counter and Histogram take a lock and look their labels up on every
observation (about a microsecond each, three or four per request): a measurable share of the
gateway's ~45 µs of CPU per relayed request. So a call records into plain per-(model, path)
tallies (a list slot per status class, a list slot per histogram bucket found by bisection, a
sum), from the event loop's one thread; a collector turns the tallies into the Prometheus
families only when /metrics is scraped (`RequestMetrics.collect`). The names and labels are
docs/operations.md's ("Metrics"):

- `modelhost_requests_total{model,route,status}`: status `2xx`, `4xx` or `5xx`;
- `modelhost_request_duration_seconds{model,route}`: from the request's body being in to its
  answer written (a stream: to its end);
- `modelhost_gateway_overhead_seconds{model,route}`: what the gateway itself adds: from the
  model being admitted and ready to the request sent to the worker, plus from the worker's
  answer being in to the answer written (for a stream, the first part only);
- `modelhost_time_to_first_token_seconds{model,route}`: a stream's first chunk;
- `modelhost_rejections_total{model,reason}`: requests refused for the model's sake (queue
  full, not ready, failed, not downloaded, downloading).

Labels are bounded: only a configured model's id ever gets a series (a request for an unknown
name is refused before a call exists), the routes are the relayed paths, and a model removed
from the registry takes its series with it at the next scrape. Every configured model has its
series on the routes of its task from the start, every status class at 0 included: Prometheus
sees no increase in a series' first sample, so a counter born at its first 5xx would hide that
error from the alert rules' `increase()`.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Seconds. The request's whole time spans a cached answer to a long generation; the gateway's
# own part is a fraction of a millisecond when all is well.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 1.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The worker's path of a relayed call -> the `route` label.
ROUTES = {
    "/chat/completions": "chat",
    "/completions": "completions",
    "/embeddings": "embeddings",
    "/audio/transcriptions": "transcriptions",
    "/audio/translations": "translations",
    "/audio/diarization": "diarization",
}
STATUS_CLASSES = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")
SHOWN_CLASSES = (2, 4, 5)  # always written, at 0 until the first
# A model's task -> the worker paths of its relayed routes.
PATHS_BY_TASK = {
    "chat": ("/chat/completions", "/completions"),
    "completion": ("/completions",),
    "embedding": ("/embeddings",),
    "transcription": ("/audio/transcriptions", "/audio/translations"),
    "diarization": ("/audio/diarization",),
}
REJECTIONS = ("queue_full", "not_ready", "failed", "not_downloaded", "downloading")


class _Tally:
    """What the calls of one model on one route add up to."""

    __slots__ = ("duration", "duration_sum", "first_token", "first_token_sum", "overhead",
                 "overhead_sum", "statuses")

    def __init__(self) -> None:
        self.statuses = [0] * len(STATUS_CLASSES)
        self.duration = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.overhead = [0] * (len(OVERHEAD_BUCKETS) + 1)
        self.overhead_sum = 0.0
        self.first_token = [0] * (len(TTFT_BUCKETS) + 1)
        self.first_token_sum = 0.0


class RequestMetrics(Collector):
    """The relayed calls' tallies, and their collector (register it on the app's registry).

    `models` gives the models that exist now, each with its task (`PATHS_BY_TASK`'s keys):
    their series are written from the start; those of other models are dropped."""

    def __init__(self, models: Callable[[], Mapping[str, str]]) -> None:
        self.models = models
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._rejections: dict[tuple[str, str], int] = {}

    def tally(self, model: str, path: str) -> _Tally:
        """The tally of `model` on the worker path `path` (a call keeps it for its records)."""
        key = (model, path)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally()
        return tally

    @staticmethod
    def record(tally: _Tally, status: int, duration: float, overhead: float) -> None:
        """A call ended: its status, its whole time and the gateway's own part (seconds)."""
        tally.statuses[status // 100 if 100 <= status < 600 else 5] += 1
        tally.duration[bisect_right(DURATION_BUCKETS, duration)] += 1
        tally.duration_sum += duration
        tally.overhead[bisect_right(OVERHEAD_BUCKETS, overhead)] += 1
        tally.overhead_sum += overhead

    @staticmethod
    def first_token(tally: _Tally, seconds: float) -> None:
        tally.first_token[bisect_right(TTFT_BUCKETS, seconds)] += 1
        tally.first_token_sum += seconds

    def rejected(self, model: str, reason: str) -> None:
        key = (model, reason)
        self._rejections[key] = self._rejections.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        alive = self.models()
        for model, task in alive.items():
            for path in PATHS_BY_TASK.get(task, ()):
                self.tally(model, path)
        for key in [k for k in self._tallies if k[0] not in alive]:
            del self._tallies[key]
        for key in [k for k in self._rejections if k[0] not in alive]:
            del self._rejections[key]
        requests = CounterMetricFamily(
            "modelhost_requests", "Relayed requests by model, route and status class.",
            labels=["model", "route", "status"])
        duration = HistogramMetricFamily(
            "modelhost_request_duration_seconds",
            "Time from a request's body being in to its answer written (a stream: its end).",
            labels=["model", "route"])
        overhead = HistogramMetricFamily(
            "modelhost_gateway_overhead_seconds",
            "What the gateway itself adds to a request (its work before sending to the "
            "worker once admitted and ready, and after the worker's answer is in).",
            labels=["model", "route"])
        first_token = HistogramMetricFamily(
            "modelhost_time_to_first_token_seconds",
            "Time from a streamed request's body being in to its first chunk written.",
            labels=["model", "route"])
        for (model, path), tally in sorted(self._tallies.items()):
            route = ROUTES.get(path, path.strip("/"))
            for index, count in enumerate(tally.statuses):
                if count or index in SHOWN_CLASSES:
                    requests.add_metric([model, route, STATUS_CLASSES[index]], count)
            duration.add_metric([model, route], _buckets(DURATION_BUCKETS, tally.duration),
                                tally.duration_sum)
            overhead.add_metric([model, route], _buckets(OVERHEAD_BUCKETS, tally.overhead),
                                tally.overhead_sum)
            if any(tally.first_token):
                first_token.add_metric([model, route],
                                       _buckets(TTFT_BUCKETS, tally.first_token),
                                       tally.first_token_sum)
        rejections = CounterMetricFamily(
            "modelhost_rejections", "Requests refused for their model's sake, by reason.",
            labels=["model", "reason"])
        for (model, reason), count in sorted(self._rejections.items()):
            rejections.add_metric([model, reason], count)
        yield from (requests, duration, overhead, first_token, rejections)


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Cumulative (upper bound, count) pairs, as the exposition wants them."""
    pairs = []
    total = 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        total += count
        pairs.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
    return pairs
