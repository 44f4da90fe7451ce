"""The report's section on large non-streamed answers (`bench/large.py`)."""

from __future__ import annotations

from typing import Any

from .report_fmt import f, pct, table

MiB = 1024 * 1024


def large_section(large: dict[str, Any]) -> str:
    plan = large["plan"]
    machine = large.get("machine") or {}
    mode = machine.get("mode")
    rows = []
    for row in large["rows"]:
        arms = row["arms"]
        direct = arms["direct"]
        for name, data in arms.items():
            rows.append([
                f"{row['size'] // MiB} MiB", str(row["clients"]), name,
                f(data["mb_per_s"], 0), "" if name == "direct" else pct(data["vs_direct"]),
                f(data["answers_per_s"], 1),
                f(data["cpu_s_per_gb"], 2) if name != "direct"
                else "(upstream) " + f(direct["cpu_s_per_gb"], 2),
                str(data["errors"])])
    text = (
        "## Large answers\n\n"
        f"Non-streamed chat answers of {', '.join(f'{s // MiB} MiB' for s in plan['sizes'])} "
        "(`large-size<N>`: one JSON completion whose content has N bytes), asked for one after "
        f"another by {' or '.join(str(c) for c in plan['clients'])} client(s), "
        f"{plan['duration']:g} s per arm in {plan['rounds']} rounds of alternating order. "
        "Throughput is answer bytes received per second (MB = 10^6 bytes), median over the "
        "rounds; `vs direct` is that against the upstream alone. The upstream declares each "
        "answer's length, so modelhost passes it on as it arrives, with back-pressure, holding "
        "at most about 256 KiB of it (an answer of undeclared length is collected, up to "
        "`MODELHOST_MAX_ANSWER_BYTES`, and sent in the pieces it came in); the floor passes "
        "bytes through as they come. Gateway CPU is the gateway process's (the upstream's for "
        "direct) per GB relayed."
        + (f" Measured in {mode} mode." if mode else "") + "\n\n")
    text += table(["size", "clients", "arm", "MB/s", "vs direct", "answers/s",
                   "CPU s / GB", "errors"], rows)
    return text
