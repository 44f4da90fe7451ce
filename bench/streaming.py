"""Streaming: time to first token, gaps between chunks (buffering shows there), chunks per
second passed through, and the most concurrent streams each arm holds."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from .arms import Arm
from .loadgen import Client, StreamResult, closed_loop_streams, concurrent_streams
from .stats import finite, ms_summary, percentile, quantile_curve

PACED = "st-ttft50-gap10-n40"  # 50 ms to the first token, then 40 tokens 10 ms apart
PACED_GAP_MS = 10.0
PACED_TOKENS = 40
BURST = "st-gap0-n1000"  # 1,000 tokens as fast as the upstream writes them
LONG_GAP_MS = 100  # streams held at once send 10 tokens/s each
MODELS = [PACED, BURST]  # plus the long-stream model of the plan (StreamPlan.long_model)

TTFT_LIMIT_S = 1.0  # the ramp stops when TTFT p99 passes this, or on any failure


def body(model: str, max_tokens: int = 256) -> bytes:
    return json.dumps({"model": model, "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "Stream something."}]}).encode()


@dataclass(frozen=True)
class StreamPlan:
    rounds: int
    paced_concurrency: int
    paced_duration: float
    burst_concurrency: int
    burst_duration: float
    levels: list[int]  # concurrent streams, ramped
    open_rate: float  # streams opened per second while a level ramps up
    long_seconds: int  # how long each held stream lasts; longer than the largest level opens

    @property
    def long_model(self) -> str:
        tokens = int(self.long_seconds * 1000 / LONG_GAP_MS)
        return f"st-ttft20-gap{LONG_GAP_MS}-n{tokens}"


def _failures(results: list[StreamResult]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = r.error or "failed"
            out[key] = out.get(key, 0) + 1
    return out


async def run_streaming(arms: list[Arm], plan: StreamPlan, say: Any) -> dict[str, Any]:
    started = time.monotonic()
    paced: dict[str, list[StreamResult]] = {a.name: [] for a in arms}
    burst: dict[str, dict[str, float]] = {a.name: {"events": 0.0, "seconds": 0.0, "cpu": 0.0,
                                                   "streams": 0.0, "failed": 0.0}
                                          for a in arms}
    for rnd in range(plan.rounds):
        shift = rnd % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            # Warm-up: a few streams, unrecorded.
            client = Client(arm.target)
            with arm.during():
                await closed_loop_streams(client, body(PACED), 4, 0.5)
                results = await closed_loop_streams(client, body(PACED),
                                                    plan.paced_concurrency, plan.paced_duration)
            client.close()
            paced[arm.name] += results
            ttft = [r.ttft for r in results if r.ok and r.ttft is not None]
            say(f"  round {rnd + 1} paced  {arm.name:<19} streams {len(results):>4}  "
                f"TTFT p50 {percentile(ttft, 50) * 1e3:7.1f} ms  "
                f"p99 {percentile(ttft, 99) * 1e3:7.1f} ms  failed {len(_failures(results))}")
        for arm in arms[shift:] + arms[:shift]:
            client = Client(arm.target)
            with arm.during():
                cpu0 = arm.proc.cpu_seconds()
                t0 = time.perf_counter()
                results = await closed_loop_streams(client, body(BURST),
                                                    plan.burst_concurrency, plan.burst_duration)
                seconds = time.perf_counter() - t0
                cpu = arm.proc.cpu_seconds() - cpu0
            client.close()
            events = sum(r.events for r in results)
            slot = burst[arm.name]
            slot["events"] += events
            slot["seconds"] += seconds
            slot["cpu"] += cpu
            slot["streams"] += len(results)
            slot["failed"] += sum(1 for r in results if not r.ok)
            say(f"  round {rnd + 1} burst  {arm.name:<19} {events / seconds:9.0f} chunks/s  "
                f"cpu {cpu / max(events, 1) * 1e6:6.1f} us/chunk")

    paced_out = {name: _paced_summary(results) for name, results in paced.items()}
    direct = paced_out.get("direct")
    if direct is not None:
        for name, row in paced_out.items():
            if name != "direct" and row["ttft_ms"].get("n") and direct["ttft_ms"].get("n"):
                row["added_ttft_ms"] = {q: row["ttft_ms"][q] - direct["ttft_ms"][q]
                                        for q in ("p50", "p99")}
    burst_out = {name: {"chunks_per_s": s["events"] / s["seconds"] if s["seconds"] else None,
                        "cpu_us_per_chunk": s["cpu"] / s["events"] * 1e6 if s["events"] else None,
                        "streams": int(s["streams"]), "failed": int(s["failed"])}
                 for name, s in burst.items()}
    if "direct" in burst_out and burst_out["direct"]["chunks_per_s"]:
        for row in burst_out.values():
            if row["chunks_per_s"] is not None:
                row["vs_direct"] = row["chunks_per_s"] / burst_out["direct"]["chunks_per_s"]

    ramp: dict[str, Any] = {}
    for arm in arms:
        if arm.name == "floor":  # the byte relay adds nothing to learn here
            continue
        # The upstream alone is only checked at the top level: it must hold them all.
        levels = plan.levels[-1:] if arm.name == "direct" else plan.levels
        with arm.during():
            ramp[arm.name] = await _ramp(arm, levels, plan, say)
    return {"plan": {"rounds": plan.rounds, "paced_model": PACED, "paced_gap_ms": PACED_GAP_MS,
                     "paced_concurrency": plan.paced_concurrency,
                     "paced_duration_s": plan.paced_duration, "burst_model": BURST,
                     "burst_concurrency": plan.burst_concurrency,
                     "burst_duration_s": plan.burst_duration,
                     "long_model": plan.long_model, "long_seconds": plan.long_seconds,
                     "long_gap_ms": LONG_GAP_MS, "levels": plan.levels,
                     "open_rate": plan.open_rate, "ttft_limit_s": TTFT_LIMIT_S},
            "paced": paced_out, "burst": burst_out, "ramp": ramp,
            "seconds": time.monotonic() - started}


def _paced_summary(results: list[StreamResult]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    # Gaps between token events only: the finish event and [DONE] follow the last token.
    gaps = [g for r in ok for g in r.gaps[:PACED_TOKENS - 1]]
    coalesced = sum(1 for g in gaps if g < 0.001)
    stalled = sum(1 for g in gaps if g > 2 * PACED_GAP_MS / 1e3)
    return {"streams": len(results), "failed": _failures(results),
            "events_per_stream": (sum(r.events for r in ok) / len(ok)) if ok else None,
            "ttft_ms": ms_summary(ttft), "total_ms": ms_summary([r.total for r in ok]),
            "gap_ms": {k: finite(percentile(gaps, q) * 1e3) for k, q in
                       (("p1", 1), ("p10", 10), ("p50", 50), ("p90", 90), ("p99", 99))},
            "gap_coalesced_fraction": coalesced / len(gaps) if gaps else None,
            "gap_stalled_fraction": stalled / len(gaps) if gaps else None,
            "gap_quantiles_ms": quantile_curve(gaps)}


async def _ramp(arm: Arm, counts: list[int], plan: StreamPlan, say: Any) -> dict[str, Any]:
    levels: list[dict[str, Any]] = []
    held = 0
    stop_reason = f"all levels passed (up to {counts[-1]})"
    await asyncio.sleep(0.5)
    # Memory per stream is measured against the process before the ramp: a level's streams
    # may reuse memory freed by the level before (the allocator keeps it).
    rss_base = arm.proc.rss()
    for count in counts:
        await asyncio.sleep(0.5)
        rss0 = arm.proc.rss()
        samples: dict[str, float] = {}
        client = Client(arm.target, max_conns=count + 100)

        def sample(arm: Arm = arm, samples: dict[str, float] = samples) -> None:
            samples["rss"] = float(arm.proc.rss())
            samples["at"] = time.perf_counter()

        # Half a second after the last one opened, all of them are still open.
        spread = count / plan.open_rate
        results = await concurrent_streams(client, body(plan.long_model), count, spread,
                                           timeout=plan.long_seconds + 30.0, during=sample,
                                           at=0.5)
        client.close()
        failures = _failures(results)
        ttft = [r.ttft for r in results if r.ok and r.ttft is not None]
        p99 = percentile(ttft, 99) if ttft else float("inf")
        at = samples.get("at", 0.0)
        open_then = sum(1 for r in results if r.started <= at <= r.started + r.total)
        rss_delta = samples.get("rss", float(rss0)) - rss_base
        row = {"streams": count, "failed": failures, "ttft_ms": ms_summary(ttft),
               "open_at_sample": open_then, "rss_base_mb": rss_base / 2**20,
               "rss_before_level_mb": rss0 / 2**20, "rss_delta_mb": rss_delta / 2**20,
               "kib_per_stream": rss_delta / 1024 / open_then if open_then else None}
        levels.append(row)
        say(f"  ramp {arm.name:<19} {count:>5} streams  TTFT p99 {p99 * 1e3:8.1f} ms  "
            f"failed {sum(failures.values()):>4}  "
            f"{(row['kib_per_stream'] or 0):6.1f} KiB/stream")
        if failures:
            stop_reason = f"{sum(failures.values())} failed streams at {count}"
            break
        if p99 > TTFT_LIMIT_S:
            stop_reason = f"TTFT p99 {p99 * 1e3:.0f} ms > {TTFT_LIMIT_S * 1e3:.0f} ms at {count}"
            break
        held = count
    return {"held": held, "stop": stop_reason, "levels": levels}
