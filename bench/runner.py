"""Runs the parts of the benchmark in order and writes bench/results/*.json."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from . import aio
from .arms import (
    SCRAPED,
    Arm,
    LiteLLMUnavailable,
    ensure_litellm,
    remote_models,
    start_floor,
    start_litellm,
    start_modelhost,
    start_upstream,
)
from .large import LargePlan, run_large
from .loadgen import Client, closed_loop_max, closed_loop_streams
from .meta import machine
from .overhead import BODY, OverheadPlan, capacity_check, run_overhead
from .procs import Procs, pinning_possible, sigterm_as_interrupt
from .profiling import profile_gateway
from .raynode import RayPlan, ray_missing, run_ray
from .realmodel import ModelPlan, run_realmodel
from .scrape import Scraper, difference, idle_cost, start_scraper, summary
from .streaming import MODELS as STREAM_MODELS
from .streaming import PACED, StreamPlan, body, run_streaming

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
OVERHEAD_MODELS = ["ovh-size512"]

# Core 0: this process (the load generator) and the fake upstream. Core 1: the gateway under
# test, so that the gateways never compete with the load for a core.
LOAD_CPUS = {0}
GATEWAY_CPUS = {1}


@dataclass(frozen=True)
class Mode:
    name: str
    overhead: OverheadPlan
    streaming: StreamPlan
    profile_rate: int
    profile_seconds: float
    model: ModelPlan
    large: LargePlan
    ray: RayPlan


QUICK = Mode(
    name="quick",
    overhead=OverheadPlan(rates=[20, 100, 500, 1000, 2000], duration=1.5, warmup=0.5,
                          rounds=2, timeout=5.0),
    streaming=StreamPlan(rounds=2, paced_concurrency=4, paced_duration=2.5,
                         burst_concurrency=8, burst_duration=1.5,
                         levels=[100, 300, 1000], open_rate=300, long_seconds=5),
    profile_rate=300, profile_seconds=8,
    model=ModelPlan(rounds=4, max_tokens=64, swaps=2, idle_ttl=1.0, speech_rounds=4),
    large=LargePlan(duration=2.0, rounds=2),
    ray=RayPlan(overhead=OverheadPlan(rates=[100, 500], duration=2.0, warmup=0.5, rounds=3,
                                      timeout=5.0),
                cpu_rounds=4, cpu_seconds=3.0),
)
FULL = Mode(
    name="full",
    overhead=OverheadPlan(rates=[10, 20, 50, 100, 200, 350, 500, 750, 1000, 1500, 2000, 2500],
                          duration=8.0, warmup=1.0, rounds=3, timeout=10.0),
    streaming=StreamPlan(rounds=3, paced_concurrency=4, paced_duration=8.0,
                         burst_concurrency=8, burst_duration=5.0,
                         levels=[25, 100, 250, 500, 1000, 2000], open_rate=250,
                         long_seconds=20),
    profile_rate=500, profile_seconds=25,
    model=ModelPlan(rounds=12, max_tokens=128, swaps=5, idle_ttl=1.0, speech_rounds=8),
    large=LargePlan(duration=5.0, rounds=3),
    ray=RayPlan(overhead=OverheadPlan(rates=[100, 500, 1000], duration=6.0, warmup=1.0,
                                      rounds=4, timeout=10.0),
                cpu_rounds=6, cpu_seconds=5.0),
)


def say(line: str) -> None:
    print(line, flush=True)


def write(name: str, data: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f"{name}.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    tmp.replace(RESULTS / f"{name}.json")


@contextlib.contextmanager
def part(name: str, meta: dict[str, Any]) -> Iterator[None]:
    """A part that fails (a gateway that does not start, say) is recorded as failed in its
    results file, and the run goes on with the next part."""
    try:
        yield
    except Exception as exc:
        say(f"!! {name} failed: {type(exc).__name__}: {str(exc)[-3000:]}")
        write(name, {"failed": f"{type(exc).__name__}: {str(exc)[-3000:]}", "machine": meta})


def _busy_seconds() -> float:
    """CPU seconds spent by the whole machine (all processes) so far."""
    t = psutil.cpu_times()
    return float(t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0)
                 + getattr(t, "softirq", 0.0))


def _our_seconds() -> float:
    """CPU seconds of this process and every child it has reaped (all the benchmark's)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                    else 65536, hard))


async def _warm(arms: list[Arm]) -> None:
    """Every arm answers a few hundred requests and streams before anything is measured
    (LiteLLM in particular still imports modules on its first requests)."""
    for arm in arms:
        client = Client(arm.target)
        with arm.during():
            await closed_loop_max(client, BODY, 4, 3.0 if arm.name == "litellm" else 1.0)
            await closed_loop_streams(client, body(PACED), 4, 1.0)
        client.close()


def _scraped(procs: Procs, work: Path, models: list[dict[str, Any]], every: float,
             pin: bool) -> tuple[Arm, Scraper]:
    """A second modelhost gateway like the first, and a scraper of its /metrics on the load
    generator's core, on during the arm's steps only: the gateways share core 1, so a scrape
    of one while another is measured would be charged to that other."""
    arm = start_modelhost(procs, work / "modelhost-scraped", models,
                          cpus=GATEWAY_CPUS if pin else None, name="modelhost-scraped")
    scraper = start_scraper(procs, arm.target.port, every, work / "scraper",
                            LOAD_CPUS if pin else None)
    return replace(arm, name=SCRAPED, target=replace(arm.target, name=SCRAPED),
                   during=scraper.watching), scraper


def _scrapes(scraper: Scraper | None, arms: list[Arm], before: dict[str, Any] | None
             ) -> dict[str, Any] | None:
    """What the scraper did during a part (the scraped arm's scrapes, their duration and
    size), and what one scrape then costs the gateway with nothing else going on."""
    if scraper is None or before is None:
        return None
    arm = next(a for a in arms if a.name == SCRAPED)
    return {"arm": SCRAPED, "baseline": "modelhost",
            **summary(difference(scraper.counts(), before)),
            "idle": idle_cost(arm.proc, arm.target.port)}


def run_all(full: bool, parts: list[str], litellm: bool = True, scrape: float = 1.0) -> None:
    mode = FULL if full else QUICK
    _raise_fd_limit()
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = machine(ROOT, mode.name)
    pin = pinning_possible()
    meta["pinning"] = ({"load generator + upstream": sorted(LOAD_CPUS),
                        "gateway under test": sorted(GATEWAY_CPUS)} if pin else None)
    say(f"modelhost benchmarks, {mode.name} mode, on {meta['cpu']} ({meta['cores']} cores), "
        f"load average {meta['load_at_start'][0]}")
    work = Path(tempfile.mkdtemp(prefix="modelhost-bench-"))
    busy0, ours0 = _busy_seconds(), _our_seconds()
    all_cpus = os.sched_getaffinity(0) if pin else set()
    started = time.monotonic()
    try:
        with sigterm_as_interrupt(), Procs(work / "logs") as procs:
            relay_parts = [p for p in parts
                           if p in ("overhead", "streaming", "profile", "large")]
            if relay_parts:
                if pin:
                    os.sched_setaffinity(0, LOAD_CPUS)
                try:
                    _relay_benchmarks(procs, work, mode, relay_parts, meta, litellm, pin,
                                      scrape)
                finally:
                    procs.stop_all()
                    if pin:
                        os.sched_setaffinity(0, all_cpus)
            if "model" in parts:
                say("== real model: SmolLM2 through modelhost vs the llama.cpp worker directly")
                with part("realmodel", meta):
                    result = run_realmodel(procs, work / "model", mode.model, say)
                    result["machine"] = meta
                    write("realmodel", result)
            if "ray" in parts:
                _ray_part(procs, work, mode, meta, pin)
    except KeyboardInterrupt:
        say("interrupted: every process started was stopped")
        raise
    finally:
        meta["seconds"] = time.monotonic() - started
        foreign = (_busy_seconds() - busy0) - (_our_seconds() - ours0)
        meta["other_work_cores"] = round(max(foreign, 0.0) / meta["seconds"], 2)
        meta["load_at_end"] = [round(x, 2) for x in os.getloadavg()[:2]]
        if set(parts) - {"ray"}:
            # The `ray` part alone leaves the page's machine (that of the other parts) as it
            # was: its own is in ray.json.
            write("machine", meta)
        shutil.rmtree(work, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.0f} s; results in {RESULTS}")


def _ray_part(procs: Procs, work: Path, mode: Mode, meta: dict[str, Any], pin: bool) -> None:
    """The relay to a worker on another Ray node (`bench.raynode`); skipped, with the reason,
    where Ray is not installed (bench/results/ray.json is then left as it was)."""
    missing = ray_missing()
    if missing:
        say(f"== ray: skipped: {missing}")
        return
    say("== ray: the relay to a worker on another Ray node (two nodes on loopback)")
    all_cpus = os.sched_getaffinity(0) if pin else set()
    if pin:
        os.sched_setaffinity(0, LOAD_CPUS)  # the cluster's nodes inherit it
    try:
        with part("ray", meta):
            result = run_ray(procs, work / "ray", mode.ray, LOAD_CPUS if pin else None,
                             GATEWAY_CPUS if pin else None, say)
            result["machine"] = meta
            write("ray", result)
    finally:
        procs.stop_all()
        if pin:
            os.sched_setaffinity(0, all_cpus)


def _relay_benchmarks(procs: Procs, work: Path, mode: Mode, parts: list[str],
                      meta: dict[str, Any], litellm: bool, pin: bool, scrape: float) -> None:
    names = OVERHEAD_MODELS + STREAM_MODELS + [mode.streaming.long_model] + \
        mode.large.models()
    gateway_cpus = GATEWAY_CPUS if pin else None
    scraper: Scraper | None = None
    try:
        upstream = start_upstream(procs, LOAD_CPUS if pin else None)
        floor = start_floor(procs, upstream.target.port, gateway_cpus)
        modelhost = start_modelhost(procs, work / "modelhost",
                                    remote_models(upstream.target.port, names),
                                    cpus=gateway_cpus)
        arms = [upstream, floor, modelhost]
        if scrape > 0 and any(p in parts for p in ("overhead", "streaming")):
            scraped, scraper = _scraped(procs, work, remote_models(upstream.target.port, names),
                                        scrape, pin)
            arms.append(scraped)
    except RuntimeError as exc:
        for name in parts:
            with part(name, meta):
                raise exc
        return
    meta["scrape_every_s"] = scrape if scraper is not None else None
    litellm_info: dict[str, Any] = {"available": False, "reason": "left out (--no-litellm)"}
    if litellm and any(p in parts for p in ("overhead", "streaming")):
        try:
            version = ensure_litellm(work / "litellm-install.log")
            arms.append(start_litellm(procs, work / "litellm", upstream.target.port, names,
                                      cpus=gateway_cpus))
            litellm_info = {"available": True, "version": version}
        except LiteLLMUnavailable as exc:
            litellm_info = {"available": False, "reason": str(exc)}
            say(f"!! LiteLLM arm missing: {exc}")
    meta["litellm"] = litellm_info
    meta["versions"]["litellm"] = litellm_info.get("version")
    # Where each process under measure runs, read back from the kernel (not what was asked).
    meta["cores_seen"] = {"load generator": sorted(os.sched_getaffinity(0)),
                          **{arm.proc.name: arm.proc.cpus() for arm in arms}}
    if scraper is not None:
        meta["cores_seen"]["scraper"] = scraper.proc.cpus()
    say("warming up every arm")
    aio.run(_warm(arms))

    if "streaming" in parts:
        say("== streaming")
        with part("streaming", meta):
            before = scraper.counts() if scraper else None
            result = aio.run(run_streaming(arms, mode.streaming, say))
            result["scrape"] = _scrapes(scraper, arms, before)
            result["litellm"] = litellm_info
            result["machine"] = meta
            write("streaming", result)

    if "overhead" in parts:
        with part("overhead", meta):
            plan = mode.overhead
            say(f"== overhead: {', '.join(a.name for a in arms)}; rates {plan.rates} req/s, "
                f"{plan.rounds} rounds of {plan.duration:g} s (at most "
                f"{plan.max_requests(len(arms)):,} requests)")
            before = scraper.counts() if scraper else None
            result = aio.run(run_overhead(arms, plan, say))
            result["scrape"] = _scrapes(scraper, arms, before)
            check_rate = 3 * max(plan.rates)
            say(f"  upstream capacity check: direct at {check_rate} req/s")
            result["upstream_check"] = aio.run(capacity_check(upstream, check_rate,
                                                              max(plan.duration, 2.0),
                                                              plan.timeout))
            check = result["upstream_check"]
            say(f"  -> p99 {check['latency_ms'].get('p99', float('nan')):.2f} ms, errors "
                f"{check['error_rate'] * 100:.2f} %, closed-loop max "
                f"{check['closed_loop_max_rps']:,.0f} req/s: "
                f"{'sustained' if check['sustained'] else 'NOT sustained'}")
            result["litellm"] = litellm_info
            result["machine"] = meta
            write("overhead", result)

    if "large" in parts:
        large = mode.large
        say(f"== large answers: {', '.join(f'{s // (1024 * 1024)} MiB' for s in large.sizes)}"
            f", {large.rounds} rounds of {large.duration:g} s per arm")
        with part("large", meta):
            # The scraped arm is measured in the overhead and streaming parts only.
            result = aio.run(run_large([a for a in arms if a.name != SCRAPED], large, say))
            result["machine"] = meta
            write("large", result)

    if "profile" in parts:
        say(f"== profile: py-spy on modelhost at {mode.profile_rate} req/s")
        with part("profile", meta):
            result = profile_gateway(modelhost, mode.profile_rate, mode.profile_seconds,
                                     RESULTS / "profile-modelhost.txt", say)
            result["machine"] = meta
            write("profile", result)
