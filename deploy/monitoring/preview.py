"""A static HTML preview of the Grafana dashboard, drawn from a real Prometheus.

Grafana is what operators use; this is for where there is none (docs/monitoring.md's
screenshot was made with it): each panel of grafana/dashboards/modelhost.json is queried
through Prometheus's HTTP API (`/api/v1/query_range`, the dashboard's variables set to "All")
and drawn as a plain SVG line chart, or as a list of current values for tables and stats,
at the panel's place in Grafana's 24-column grid. No JavaScript, no dependency: print it with
a headless browser, e.g.

    python3 deploy/monitoring/preview.py http://127.0.0.1:9090 [MINUTES [END]] > /tmp/modelhost.html
    chromium --headless --screenshot=dashboard.png --window-size=1600,2200 /tmp/modelhost.html
"""

from __future__ import annotations

import html
import json
import math
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).parent / "grafana" / "dashboards" / "modelhost.json"
VARIABLES = {"$__rate_interval": "1m", "$__interval": "5s", "$model": ".*", "$instance": ".*"}
COLOURS = ["#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9",
           "#705da0", "#508642", "#cca300"]
ROW_PX = 30
WIDTH, HEIGHT = 1560, 0


def query(base: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=30) as resp:
        result: list[dict[str, Any]] = json.load(resp)["data"]["result"]
    return result


def legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template or ", ".join(f"{k}={v}" for k, v in labels.items() if k != "__name__")


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "NaN"
    if unit == "percentunit":
        return f"{value * 100:.1f} %"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if unit == "bytes":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024:
                return f"{value:.1f} {suffix}"
            value /= 1024
    if unit == "reqps":
        return f"{value:.2f} req/s"
    return f"{value:.3g}"


def chart(series: list[tuple[str, list[tuple[float, float]]]], unit: str, width: int,
          height: int, start: float, end: float) -> str:
    values = [v for _, points in series for _, v in points if not math.isnan(v)]
    if not values:
        return '<div class="nodata">No data</div>'
    low, high = min(0.0, min(values)), max(values)
    high = high if high > low else low + 1
    left, bottom = 70, 18
    inner_w, inner_h = width - left - 10, height - bottom - 10

    def xy(t: float, v: float) -> str:
        x = left + (t - start) / (end - start) * inner_w
        y = 10 + inner_h - (v - low) / (high - low) * inner_h
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg width="{width}" height="{height}">']
    for i in range(3):
        v = low + (high - low) * i / 2
        y = 10 + inner_h - inner_h * i / 2
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y}" y2="{y}" class="grid"/>'
                     f'<text x="{left - 4}" y="{y + 4}" class="axis">{fmt(v, unit)}</text>')
    for n, (_, points) in enumerate(series):
        line = " ".join(xy(t, v) for t, v in points if not math.isnan(v))
        parts.append(f'<polyline points="{line}" fill="none" stroke-width="1.5" '
                     f'stroke="{COLOURS[n % len(COLOURS)]}"/>')
    parts.append("</svg>")
    return "".join(parts)


def panel_html(base: str, panel: dict[str, Any], start: float, end: float, step: float) -> str:
    grid = panel["gridPos"]
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    series: list[tuple[str, list[tuple[float, float]]]] = []
    for target in panel["targets"]:
        for result in query(base, target["expr"], start, end, step):
            points = [(float(t), float(v)) for t, v in result["values"]]
            if panel["type"] != "timeseries" and points[-1][0] < end - 2 * step:
                continue  # a table or a stat shows what is true now, not what was
            series.append((legend(target.get("legendFormat", ""), result["metric"]), points))
    width = grid["w"] * WIDTH // 24 - 12
    height = grid["h"] * ROW_PX - 40
    if panel["type"] == "timeseries":
        body = chart(series, unit, width, height - 40, start, end)
        keys = "".join(f'<span style="color:{COLOURS[n % len(COLOURS)]}">&#9644;</span> '
                       f"{html.escape(name)} " for n, (name, _) in enumerate(series[:8]))
        body += f'<div class="legend">{keys}</div>'
    elif not series:
        body = '<div class="nodata">No data</div>'
    else:
        rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{fmt(points[-1][1], unit)}</td></tr>"
                       for name, points in series[:12])
        body = f"<table>{rows}</table>"
    style = (f"grid-column: {grid['x'] + 1} / span {grid['w']}; "
             f"grid-row: {grid['y'] + 1} / span {grid['h']};")
    return (f'<div class="panel" style="{style}"><h3>{html.escape(panel["title"])}</h3>'
            f"{body}</div>")


def render(base: str, minutes: float = 10, end: float | None = None) -> str:
    """The page for the `minutes` before `end` (a Unix time; now by default)."""
    dashboard = json.loads(DASHBOARD.read_text())
    end = end or time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 300)
    cells = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            grid = panel["gridPos"]
            cells.append(f'<div class="row" style="grid-column: 1 / span 24; '
                         f'grid-row: {grid["y"] + 1} / span 1">{html.escape(panel["title"])}'
                         "</div>")
        else:
            cells.append(panel_html(base, panel, start, end, step))
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>
body {{ background: #111217; color: #ccccdc; font: 12px sans-serif; margin: 8px; }}
h1 {{ font-size: 16px; margin: 4px; }}
.dash {{ display: grid; grid-template-columns: repeat(24, 1fr); grid-auto-rows: {ROW_PX}px;
        gap: 4px; width: {WIDTH}px; }}
.panel {{ background: #181b1f; border: 1px solid #2c3235; padding: 4px; overflow: hidden; }}
.panel h3 {{ font-size: 12px; margin: 0 0 4px; }}
.row {{ font-size: 14px; font-weight: bold; padding-top: 8px; }}
.grid {{ stroke: #2c3235; }} .axis {{ fill: #8e8e8e; font-size: 10px; text-anchor: end; }}
.legend {{ font-size: 10px; }} .nodata {{ color: #8e8e8e; padding: 30px; text-align: center; }}
td {{ padding: 1px 8px; }}
</style></head><body><h1>{html.escape(dashboard["title"])}: last {minutes:g} minutes
(static preview of grafana/dashboards/modelhost.json)</h1>
<div class="dash">{"".join(cells)}</div></body></html>"""


if __name__ == "__main__":
    print(render(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 10,
                 float(sys.argv[3]) if len(sys.argv) > 3 else None))
