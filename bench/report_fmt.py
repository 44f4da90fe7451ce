"""Formatting shared by the report's sections: numbers, percentages, Markdown tables."""

from __future__ import annotations

import math
from typing import Any


def f(value: Any, digits: int = 2, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}{unit}"
    return str(value)


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def cores(where: dict[str, list[int]]) -> str:
    """`{"upstream": [0], ...}` as "upstream on core(s) 0, ..."."""
    return ", ".join(f"{k} on core(s) {','.join(map(str, v))}" for k, v in where.items())
