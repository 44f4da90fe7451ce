"""Overhead: the same open-loop load sent directly to the fake upstream and through each
gateway, interleaved over several rounds; what each gateway adds to the direct latency."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .arms import Arm
from .loadgen import Client, OpenLoopResult, closed_loop_max, open_loop, settle
from .stats import finite, ms_summary, percentile

MODEL = "ovh-size512"  # the upstream answers at once with 512 bytes of content
BODY = json.dumps({
    "model": MODEL, "max_tokens": 128, "temperature": 0,
    "messages": [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "Say hello to the benchmark, briefly."}],
}).encode()

# A step is "collapsed" past this: the arm is not asked for higher rates any more.
COLLAPSE_ERROR_RATE = 0.05
COLLAPSE_P99_S = 2.0
# The knee: errors above 0.1 %, or p99 (from the due time) above 10x the arm's own p99 at
# the lowest rate (and above 10 ms).
KNEE_ERROR_RATE = 0.001
KNEE_P99_FACTOR = 10.0
KNEE_P99_FLOOR_MS = 10.0


@dataclass(frozen=True)
class OverheadPlan:
    rates: list[int]
    duration: float  # measured seconds per step
    warmup: float  # unmeasured seconds at the same rate before each step
    rounds: int
    timeout: float  # per request
    poisson: bool = True
    seed: int = 20240601

    def max_requests(self, arms: int) -> int:
        per_round = sum(rate * (self.duration + self.warmup) for rate in self.rates)
        capacity_check = 3 * max(self.rates) * (self.duration + self.warmup)
        return int(per_round * arms * self.rounds * 1.1 + capacity_check * 1.1)


def _step_summary(res: OpenLoopResult, cpu: float) -> dict[str, Any]:
    return {
        "rate": res.rate, "sent": res.sent, "ok": res.ok, "errors": res.errors,
        "error_rate": res.error_count / res.sent if res.sent else 0.0,
        "achieved_rps": res.ok / res.duration,
        "latency_ms": ms_summary(res.latency),
        "p99_from_due_ms": finite(percentile(res.sched_latency, 99) * 1e3),
        "lag_p99_ms": finite(percentile(res.lag, 99) * 1e3),
        "cpu_s_per_1k": cpu / res.total * 1000 if res.total else None,
        "peak_connections": res.peak_conns,
    }


def _collapsed(res: OpenLoopResult) -> bool:
    error_rate = res.error_count / res.sent if res.sent else 0.0
    p99 = percentile(res.sched_latency, 99) if res.sched_latency else float("inf")
    return error_rate > COLLAPSE_ERROR_RATE or p99 > COLLAPSE_P99_S


async def run_overhead(arms: list[Arm], plan: OverheadPlan, say: Any) -> dict[str, Any]:
    # Per arm, per rate: every round's samples, pooled at the end.
    pooled: dict[str, dict[int, dict[str, Any]]] = {
        a.name: {r: {"lat": [], "due": [], "lag": [], "sent": 0, "ok": 0, "errors": {},
                     "cpu": 0.0, "total": 0, "rounds": []} for r in plan.rates} for a in arms}
    collapsed_at: dict[str, int | None] = {a.name: None for a in arms}
    started = time.monotonic()
    for rnd in range(plan.rounds):
        for ri, rate in enumerate(plan.rates):
            shift = (rnd + ri) % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                limit = collapsed_at[arm.name]
                if limit is not None and rate > limit:
                    continue
                client = Client(arm.target)
                with arm.during():
                    cpu0 = arm.proc.cpu_seconds()
                    res = await open_loop(client, BODY, rate, plan.duration,
                                          warmup=plan.warmup,
                                          seed=plan.seed + 7919 * rnd + rate,
                                          timeout=plan.timeout, poisson=plan.poisson)
                    cpu = arm.proc.cpu_seconds() - cpu0
                client.close()
                step = _step_summary(res, cpu)
                slot = pooled[arm.name][rate]
                slot["lat"] += res.latency
                slot["due"] += res.sched_latency
                slot["lag"] += res.lag
                slot["sent"] += res.sent
                slot["ok"] += res.ok
                slot["cpu"] += cpu
                slot["total"] += res.total
                for kind, count in res.errors.items():
                    slot["errors"][kind] = slot["errors"].get(kind, 0) + count
                slot["rounds"].append({k: step[k] for k in (
                    "error_rate", "achieved_rps", "p99_from_due_ms", "cpu_s_per_1k")}
                    | {"p50_ms": step["latency_ms"].get("p50"),
                       "p99_ms": step["latency_ms"].get("p99")})
                lat = step["latency_ms"]
                say(f"  round {rnd + 1} {rate:>5} req/s {arm.name:<19} "
                    f"p50 {lat.get('p50', float('nan')):8.2f} ms  "
                    f"p99 {lat.get('p99', float('nan')):8.2f} ms  "
                    f"errors {res.error_count:>5}  cpu/1k {step['cpu_s_per_1k'] or 0:.3f} s")
                if _collapsed(res):
                    collapsed_at[arm.name] = rate if limit is None else min(limit, rate)
                    say(f"    {arm.name} collapsed at {rate} req/s: not asked for more")
                    waited = await settle(Client(arm.target), BODY)
                    say(f"    {arm.name} settled after {waited:.1f} s")

    per_arm: dict[str, dict[str, Any]] = {}
    for arm in arms:
        rows = {}
        for rate in plan.rates:
            slot = pooled[arm.name][rate]
            if not slot["sent"]:
                rows[str(rate)] = {"rate": rate, "skipped": True,
                                   "reason": f"collapsed at {collapsed_at[arm.name]} req/s"}
                continue
            errors = sum(slot["errors"].values())
            rows[str(rate)] = {
                "rate": rate, "sent": slot["sent"], "ok": slot["ok"], "errors": slot["errors"],
                "error_rate": errors / slot["sent"],
                "achieved_rps": slot["ok"] / (plan.duration * len(slot["rounds"])),
                "latency_ms": ms_summary(slot["lat"]),
                "p99_from_due_ms": finite(percentile(slot["due"], 99) * 1e3),
                "lag_p99_ms": finite(percentile(slot["lag"], 99) * 1e3),
                "cpu_s_per_1k": slot["cpu"] / slot["total"] * 1000 if slot["total"] else None,
                "rounds": slot["rounds"],
                "collapsed": collapsed_at[arm.name] == rate,
            }
        per_arm[arm.name] = rows

    added = _added(per_arm, plan.rates)
    knees = {name: _knee(rows, plan.rates) for name, rows in per_arm.items()}
    return {"plan": {"rates": plan.rates, "duration_s": plan.duration, "warmup_s": plan.warmup,
                     "rounds": plan.rounds, "timeout_s": plan.timeout,
                     "arrivals": "poisson" if plan.poisson else "uniform", "model": MODEL,
                     "request_bytes": len(BODY)},
            "arms": per_arm, "added": added, "knee": knees, "collapsed_at": collapsed_at,
            "seconds": time.monotonic() - started}


def _added(per_arm: dict[str, dict[str, Any]], rates: list[int]) -> dict[str, Any]:
    """Per gateway, per rate: its p50/p99 minus the direct arm's, and LiteLLM's / modelhost's."""
    direct = per_arm.get("direct", {})
    out: dict[str, Any] = {}
    for name, rows in per_arm.items():
        if name == "direct":
            continue
        out[name] = {}
        for rate in rates:
            row, base = rows.get(str(rate), {}), direct.get(str(rate), {})
            if row.get("skipped") or base.get("skipped") or not row or not base:
                out[name][str(rate)] = None
                continue
            lat, blat = row["latency_ms"], base["latency_ms"]
            if "p50" not in lat or "p50" not in blat:
                out[name][str(rate)] = None
                continue
            out[name][str(rate)] = {"p50": lat["p50"] - blat["p50"],
                                    "p99": lat["p99"] - blat["p99"],
                                    "valid": row["error_rate"] <= KNEE_ERROR_RATE}
    if "modelhost" in out and "litellm" in out:
        ratio: dict[str, Any] = {}
        for rate in rates:
            mh, ll = out["modelhost"].get(str(rate)), out["litellm"].get(str(rate))
            if mh is None or ll is None:
                ratio[str(rate)] = None
                continue
            ratio[str(rate)] = {q: (ll[q] / mh[q] if mh[q] > 0 else None) for q in ("p50", "p99")}
        out["litellm_over_modelhost"] = ratio
    return out


def _knee(rows: dict[str, Any], rates: list[int]) -> dict[str, Any]:
    base = None
    for rate in rates:
        row = rows[str(rate)]
        if row.get("skipped"):
            return {"rate": rate, "why": row["reason"]}
        p99 = row["p99_from_due_ms"]
        if base is None:
            base = p99
        if row["error_rate"] > KNEE_ERROR_RATE:
            return {"rate": rate, "why": f"errors {row['error_rate'] * 100:.2f} %"}
        if p99 is not None and base is not None and \
                p99 > max(KNEE_P99_FACTOR * base, KNEE_P99_FLOOR_MS):
            return {"rate": rate, "why": f"p99 {p99:.1f} ms vs {base:.2f} ms at {rates[0]} req/s"}
    return {"rate": None, "why": f"none up to {rates[-1]} req/s"}


async def capacity_check(direct: Arm, rate: int, duration: float, timeout: float
                         ) -> dict[str, Any]:
    """The upstream hit directly at `rate` (3x the most sent through a gateway), and its
    closed-loop maximum: it must never be what limits a gateway."""
    client = Client(direct.target)
    res = await open_loop(client, BODY, rate, duration, warmup=0.5, seed=99, timeout=timeout)
    client.close()
    error_rate = res.error_count / res.sent if res.sent else 1.0
    p99_due = percentile(res.sched_latency, 99) * 1e3
    client = Client(direct.target)
    peak, peak_errors = await closed_loop_max(client, BODY, 32, 2.0)
    client.close()
    return {"rate": rate, "sent": res.sent, "error_rate": error_rate,
            "achieved_rps": res.ok / res.duration, "latency_ms": ms_summary(res.latency),
            "p99_from_due_ms": finite(p99_due), "lag_p99_ms": finite(percentile(res.lag, 99) * 1e3),
            "sustained": error_rate <= KNEE_ERROR_RATE and p99_due < 20.0,
            "closed_loop_max_rps": peak, "closed_loop_errors": peak_errors}


async def cpu_per_request(arm: Arm, concurrency: int, seconds: float) -> tuple[float, float]:
    """The gateway's CPU µs per request and the requests per second, in a closed loop."""
    client = Client(arm.target)
    try:
        await closed_loop_max(client, BODY, concurrency, 0.5)  # warm connections
        cpu0, t0 = arm.proc.cpu_seconds(), time.perf_counter()
        rps, errors = await closed_loop_max(client, BODY, concurrency, seconds)
        cpu1, t1 = arm.proc.cpu_seconds(), time.perf_counter()
    finally:
        client.close()
    if errors:
        raise RuntimeError(f"{arm.name}: {errors} errors")
    return (cpu1 - cpu0) / (rps * (t1 - t0)) * 1e6, rps
