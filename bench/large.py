"""Large non-streamed answers: MB/s through each gateway against the upstream directly.

The upstream answers `large-size<N>` with one JSON chat completion whose content has N bytes
(1 MiB and 16 MiB by default). For each size and number of clients, every arm is measured for
the same time in alternating order, round after round: clients send one request after another
(closed loop), and the throughput is the answer bytes received per second (MB = 10^6 bytes).
The gateway's CPU per GB relayed comes from the scheduler's counters, as in the other parts.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .arms import Arm
from .loadgen import Client

MiB = 1024 * 1024


@dataclass(frozen=True)
class LargePlan:
    sizes: list[int] = field(default_factory=lambda: [MiB, 16 * MiB])
    clients: list[int] = field(default_factory=lambda: [1, 4])
    duration: float = 2.0  # seconds per arm, size, client count and round
    rounds: int = 2
    timeout: float = 60.0

    @staticmethod
    def model(size: int) -> str:
        return f"large-size{size}"

    def models(self) -> list[str]:
        return [self.model(size) for size in self.sizes]


def body(size: int) -> bytes:
    return json.dumps({"model": LargePlan.model(size), "max_tokens": 16,
                       "messages": [{"role": "user", "content": "a long answer, please"}]}
                      ).encode()


async def _measure(arm: Arm, request: bytes, clients: int, duration: float,
                   timeout: float) -> dict[str, float]:
    """`clients` closed loops for `duration` seconds: bytes, answers and errors per second."""
    client = Client(arm.target)
    try:
        reply = await client.send(request, timeout)  # a connection, and the answer, warm
        if not reply.ok:
            raise RuntimeError(f"{arm.name} answered {reply.status}: {reply.error}")
        counts = {"bytes": 0, "answers": 0, "errors": 0}
        cpu0 = arm.proc.cpu_seconds()
        start = time.perf_counter()
        deadline = start + duration

        async def loop() -> None:
            while time.perf_counter() < deadline:
                reply = await client.send(request, timeout)
                if reply.ok:
                    counts["answers"] += 1
                    counts["bytes"] += reply.nbytes
                else:
                    counts["errors"] += 1

        await asyncio.gather(*(loop() for _ in range(clients)))
        seconds = time.perf_counter() - start
        cpu = arm.proc.cpu_seconds() - cpu0
    finally:
        client.close()
    return {"mb_per_s": counts["bytes"] / seconds / 1e6,
            "answers_per_s": counts["answers"] / seconds,
            "errors": counts["errors"], "seconds": seconds,
            "cpu_s_per_gb": cpu / (counts["bytes"] / 1e9) if counts["bytes"] else float("nan")}


async def run_large(arms: list[Arm], plan: LargePlan, say: Callable[[str], None]
                    ) -> dict[str, Any]:
    arms = [arm for arm in arms if arm.name in ("direct", "floor", "modelhost")]
    rows = []
    for size in plan.sizes:
        request_body = body(size)
        for clients in plan.clients:
            runs: dict[str, list[dict[str, float]]] = {arm.name: [] for arm in arms}
            for r in range(plan.rounds):
                for arm in arms if r % 2 == 0 else arms[::-1]:
                    runs[arm.name].append(await _measure(
                        arm, arm.target.request(request_body), clients, plan.duration,
                        plan.timeout))
            row: dict[str, Any] = {"size": size, "clients": clients, "arms": {}}
            for name, measured in runs.items():
                row["arms"][name] = {
                    "mb_per_s": statistics.median(m["mb_per_s"] for m in measured),
                    "answers_per_s": statistics.median(m["answers_per_s"] for m in measured),
                    "cpu_s_per_gb": statistics.median(m["cpu_s_per_gb"] for m in measured),
                    "errors": sum(int(m["errors"]) for m in measured),
                    "rounds": [round(m["mb_per_s"], 1) for m in measured]}
            direct = row["arms"]["direct"]["mb_per_s"]
            for data in row["arms"].values():
                data["vs_direct"] = data["mb_per_s"] / direct if direct else None
            rows.append(row)
            say("  " + f"{size // MiB} MiB x {clients} client(s): " + ", ".join(
                f"{name} {data['mb_per_s']:,.0f} MB/s"
                + ("" if name == "direct" else f" ({data['vs_direct']:.2f}x)")
                + (f", {data['errors']} errors" if data["errors"] else "")
                for name, data in row["arms"].items()))
    return {"plan": asdict(plan), "rows": rows}
