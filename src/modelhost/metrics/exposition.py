"""The Prometheus text format (0.0.4) of a registry, written for what this gateway exposes.

`prometheus_client.generate_latest` checks and escapes every label name and metric name of
every sample line against the legacy and UTF-8 name rules (prometheus_client 0.2x): about two
thirds of a scrape's time, some 5 ms of the event loop for the few hundred series of a gateway
with a handful of models, during which requests wait. The names here are the gateway's own,
valid by construction (the engines' own metrics are relayed as text, `engines.py`, not through
the registry), so they are written as they are; label values are escaped as the format wants
(backslash, double quote, line feed). The output is byte for byte `generate_latest`'s
(`tests/test_metrics.py` compares them).
"""

from __future__ import annotations

import math
from typing import SupportsFloat

from prometheus_client.registry import Collector

INF = float("inf")
# OpenMetrics-only samples, put in gauges of their own after their family (as the client does).
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
_TYPES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram",
          "unknown": "untyped"}


def _number(value: float) -> str:
    """A sample's value as Go writes it (prometheus_client's `floatToGoString`, typed)."""
    d = float(value)
    if d == INF:
        return "+Inf"
    if d == -INF:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    text = repr(d)
    dot = text.find(".")
    if d > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _value(text: str) -> str:
    if "\\" in text or '"' in text or "\n" in text:
        return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return text


# A sample's name and labels as written, by (name, its labels): series are few and come back
# at every scrape (bounded: cleared past `MAX_HEADS`, when models come and go).
_heads: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
MAX_HEADS = 50_000


def _line(name: str, labels: dict[str, str], value: float,
          timestamp: SupportsFloat | None) -> str:
    key = (name, tuple(labels.items()))
    head = _heads.get(key)
    if head is None:
        if len(_heads) >= MAX_HEADS:
            _heads.clear()
        if labels:
            inner = ",".join(f'{k}="{_value(v)}"' for k, v in sorted(labels.items()))
            head = _heads[key] = f"{name}{{{inner}}}"
        else:
            head = _heads[key] = name
    if timestamp is not None:
        return f"{head} {_number(value)} {int(float(timestamp) * 1000):d}\n"
    return f"{head} {_number(value)}\n"


def render(registry: Collector) -> bytes:
    """What `generate_latest(registry)` gives, cheaper (module docstring)."""
    output: list[str] = []
    append = output.append
    for metric in registry.collect():
        name, kind = metric.name, metric.type
        if kind == "counter":
            shown = name + "_total"
        elif kind == "info":
            shown = name + "_info"
        else:
            shown = name
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        append(f"# HELP {shown} {doc}\n# TYPE {shown} {_TYPES.get(kind, kind)}\n")
        extra: dict[str, list[str]] = {}
        for sample in metric.samples:
            line = _line(sample.name, sample.labels, sample.value, sample.timestamp)
            for suffix in _OM_SUFFIXES:
                if sample.name == name + suffix:
                    extra.setdefault(suffix, []).append(line)
                    break
            else:
                append(line)
        for suffix, lines in sorted(extra.items()):
            append(f"# HELP {name}{suffix} {doc}\n# TYPE {name}{suffix} gauge\n")
            output.extend(lines)
    return "".join(output).encode("utf-8")
