"""The report's figures (PNG, matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

COLORS = {"direct": "#555555", "floor": "#2ca02c", "modelhost": "#1f77b4",
          "modelhost (scraped)": "#9467bd", "litellm": "#d62728"}
ERROR_RATE_MARK = 0.001
GAP_FLOOR_MS = 0.1


def _rows(arm_rows: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in arm_rows.values() if not r.get("skipped") and r["latency_ms"].get("n")]


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def overhead_latency(overhead: dict[str, Any], path: Path) -> Path:
    """Latency (p50, p99) against offered load, per arm; x marks steps with errors."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, q in zip(axes, ("p50", "p99"), strict=True):
        for name, arm_rows in overhead["arms"].items():
            rows = _rows(arm_rows)
            xs = [r["rate"] for r in rows]
            ys = [r["latency_ms"][q] for r in rows]
            ax.plot(xs, ys, marker="o", label=name, color=COLORS.get(name))
            bad = [(r["rate"], r["latency_ms"][q]) for r in rows
                   if r["error_rate"] > ERROR_RATE_MARK]
            if bad:
                ax.scatter([b[0] for b in bad], [b[1] for b in bad], marker="x", s=90,
                           color="black", zorder=5)
        _style(ax, f"latency {q} (ms)", "offered load (requests/s)")
        ax.set_title(f"{q} latency against load (x: errors > 0.1 %)")
    axes[0].legend()
    return _save(fig, path)


def overhead_added(overhead: dict[str, Any], path: Path) -> Path:
    """What each gateway adds to the direct latency, against load, with the goals."""
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for name, per_rate in overhead["added"].items():
        if name == "litellm_over_modelhost":
            continue
        for q, style in (("p50", "-"), ("p99", "--")):
            # Steps with errors over 0.1 % are left out: their latency is not comparable.
            pts = [(int(rate), v[q]) for rate, v in per_rate.items()
                   if v is not None and v["valid"] and v[q] > 0]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                        color=COLORS.get(name), label=f"{name} {q}")
    ax.axhline(0.5, color="#1f77b4", linewidth=0.8, linestyle=":", label="goal p50 0.5 ms")
    ax.axhline(2.0, color="#1f77b4", linewidth=0.8, linestyle="-.", label="goal p99 2 ms")
    _style(ax, "added latency (ms, gateway - direct)", "offered load (requests/s)")
    ax.set_title("latency added by the gateway (steps without errors)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def stream_gaps(streaming: dict[str, Any], path: Path) -> Path:
    """Distribution of the gaps between streamed chunks: a buffering relay bunches them."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, row in streaming["paced"].items():
        curve = row.get("gap_quantiles_ms") or []
        if curve:
            ys = [i / (len(curve) - 1) for i in range(len(curve))]
            ax.plot([max(v, GAP_FLOOR_MS) for v in curve], ys, label=name,
                    color=COLORS.get(name))
    gap = streaming["plan"]["paced_gap_ms"]
    ax.axvline(gap, color="black", linewidth=0.8, linestyle=":",
               label=f"upstream gap {gap:g} ms")
    ax.set_xscale("log")
    ax.set_xlim(left=GAP_FLOOR_MS)
    ax.set_xlabel(f"gap between consecutive chunks at the client (ms; under {GAP_FLOOR_MS:g} ms "
                  "drawn at the left edge)")
    ax.set_ylabel("fraction of gaps")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("inter-chunk gaps (same upstream stream, per arm)")
    ax.legend()
    return _save(fig, path)


def stream_ramp(streaming: dict[str, Any], path: Path) -> Path:
    """Time to first token p99 against concurrent open streams, per arm."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, ramp in streaming["ramp"].items():
        pts = [(lv["streams"], lv["ttft_ms"]["p99"]) for lv in ramp["levels"]
               if lv["ttft_ms"].get("n")]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    color=COLORS.get(name))
    ax.axhline(streaming["plan"]["ttft_limit_s"] * 1e3, color="black", linewidth=0.8,
               linestyle=":", label="limit 1 s")
    _style(ax, "time to first token p99 (ms)", "concurrent streams")
    ax.set_title("holding many streams at once")
    ax.legend()
    return _save(fig, path)


def _style(ax: Axes, ylabel: str, xlabel: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
