"""Percentiles and summaries, in milliseconds where they are times."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`, by linear interpolation; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def percentiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    if not values:
        return [math.nan for _ in qs]
    ordered = sorted(values)
    out = []
    for q in qs:
        pos = (len(ordered) - 1) * q / 100
        low = math.floor(pos)
        high = min(low + 1, len(ordered) - 1)
        out.append(ordered[low] + (ordered[high] - ordered[low]) * (pos - low))
    return out


def ms_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/mean/max of durations given in seconds, in milliseconds."""
    if not seconds:
        return {"n": 0}
    p50, p90, p99, p999 = percentiles(seconds, (50, 90, 99, 99.9))
    return {"n": len(seconds), "p50": p50 * 1e3, "p90": p90 * 1e3, "p99": p99 * 1e3,
            "p999": p999 * 1e3, "mean": sum(seconds) / len(seconds) * 1e3,
            "max": max(seconds) * 1e3}


def quantile_curve(seconds: Sequence[float], steps: int = 100) -> list[float]:
    """The distribution as `steps + 1` quantiles (0 %, 1 %, ... 100 %), in milliseconds."""
    if not seconds:
        return []
    return [v * 1e3 for v in percentiles(seconds, [100 * i / steps for i in range(steps + 1)])]


def finite(value: float | None) -> float | None:
    """JSON has no NaN: None instead."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return value
