"""The relay to a worker on another Ray node: what a gateway costs per request when its model's
worker runs on another node of a Ray cluster, next to the same gateway and the same worker as a
local process.

A two-node Ray cluster on loopback (`tests/ray_cluster.py`, as the tests start it: the head,
node_a, on 127.0.0.2; node_b on 127.0.0.3), and three arms:

- `direct`: the fake upstream (`bench.upstream`) hit directly, the baseline of "added";
- `modelhost (local worker)`: a gateway whose model `ovh-size512` is `backend: command` with
  `bench.upstream` as its worker, a local process on 127.0.0.1 (no Ray);
- `modelhost (Ray node_b)`: a second gateway with MODELHOST_RAY_ADDRESS (Ray Client,
  `ray://127.0.0.2:PORT`) and the same model with `ray: {resources: {node_b: 1}}`: its worker
  is spawned by a Ray actor on node_b, listens on 127.0.0.3, and the gateway relays there.

The three upstreams (the direct one and both workers) run on the load generator's core, the two
gateways on the other (when the machine has two), so that a gateway's figures are its own.
The "other node" is an address on the same machine: what this measures is the gateway's own
cost of a worker on a Ray node plus loopback, not a network.

Measured: the open-loop paced load of the overhead part (`bench.overhead.run_overhead`, arms
interleaved round by round), the added p50/p99 over direct; the gateway's CPU per request in a
closed loop (`bench.overhead.cpu_per_request`, as `bench.compare`), the two gateways in
alternating rounds; and what each gateway burns idle (the Ray one pings its worker's actor).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from . import aio
from .arms import Arm, start_modelhost, start_upstream
from .loadgen import Client, closed_loop_max
from .overhead import BODY, MODEL, OverheadPlan, cpu_per_request, run_overhead
from .procs import Proc, Procs, _schedstat_seconds, http_post

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOCAL = "modelhost (local worker)"
REMOTE = "modelhost (Ray node_b)"
READY_TIMEOUT = 120.0  # the first request waits for the worker (a Ray actor: seconds)


@dataclass(frozen=True)
class RayPlan:
    overhead: OverheadPlan  # the paced steps (rates, rounds)
    cpu_rounds: int  # closed-loop rounds per gateway, alternating
    cpu_seconds: float
    concurrency: int = 8
    idle_seconds: float = 3.0


def ray_missing() -> str | None:
    """Why the part cannot run here (None: it can)."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install -e '.[ray]')"
    if not Path(sys.executable).with_name("ray").exists():
        return f"the `ray` command is not beside {sys.executable}"
    return None


class OwnCpu(Proc):
    """A gateway's own CPU, without its descendants: the local arm's worker is the gateway's
    child, the Ray arm's is not, and what is compared is the gateways."""

    def cpu_seconds(self) -> float:
        precise = _schedstat_seconds(self.pid)
        if precise is not None:
            return precise
        with contextlib.suppress(psutil.Error):
            times = self.ps.cpu_times()
            return float(times.user + times.system)
        return 0.0


def worker_command(cpus: set[int] | None) -> list[str]:
    """The fake upstream as a model's `command` worker; on `cpus` (the load generator's core,
    where the direct upstream runs) when pinning: a local worker would otherwise inherit the
    gateway's core and compete with it."""
    argv = [sys.executable, "-m", "bench.upstream", "--host", "{host}", "--port", "{port}"]
    taskset = shutil.which("taskset")
    if cpus and taskset:
        argv = [taskset, "-c", ",".join(map(str, sorted(cpus))), *argv]
    return argv


def model(cpus: set[int] | None, ray: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "id": MODEL, "backend": "command", "command": worker_command(cpus),
        # `-m bench.upstream` on either node; the modelhost under test for the shim in front.
        "env": {"PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)},
        # The worker answers at once: the gateway's per-model queue must not be measured.
        "max_concurrency": 100000, "max_queue": 100000, "idle_ttl": 0}
    if ray is not None:
        spec["ray"] = ray
    return spec


def _ready(arm: Arm) -> float:
    """Seconds until the model answers (its first request waits for the worker to start)."""
    started = time.monotonic()
    body = {"model": MODEL, "max_tokens": 8,
            "messages": [{"role": "user", "content": "ready?"}]}
    while True:
        status, answer, _ = http_post(arm.target.port, "/v1/chat/completions", body,
                                      arm.target.key, timeout=READY_TIMEOUT)
        if status == 200:
            return time.monotonic() - started
        if time.monotonic() - started > READY_TIMEOUT:
            raise RuntimeError(f"{arm.name}: the model did not answer in {READY_TIMEOUT:g} s: "
                               f"{status} {str(answer)[:500]}\n{arm.proc.output()}")
        time.sleep(0.5)


def _workers(pids: list[psutil.Process]) -> list[dict[str, Any]]:
    """The bench.upstream workers among `pids`: their pid and the address they were told."""
    found = []
    for proc in pids:
        with contextlib.suppress(psutil.Error):
            argv = proc.cmdline()
            # The worker itself (after taskset's exec), not the shim in front of it.
            if argv[1:3] == ["-m", "bench.upstream"] and "--host" in argv:
                found.append({"pid": proc.pid, "host": argv[argv.index("--host") + 1],
                              "cores": sorted(proc.cpu_affinity() or [])})
    return found


def _where(arm: Arm, node_pids: list[psutil.Process], expect: str) -> dict[str, Any]:
    """Where the arm's worker runs, read back from the processes; an error if not `expect`."""
    workers = _workers(node_pids)
    hosts = {w["host"] for w in workers}
    if hosts != {expect}:
        raise RuntimeError(f"{arm.name}: its worker was to listen on {expect}, found "
                           f"{workers or 'none'}")
    return workers[0]


async def _warm(arms: list[Arm]) -> None:
    for arm in arms:
        client = Client(arm.target)
        await closed_loop_max(client, BODY, 4, 1.0)
        client.close()


def _idle(gateways: list[Arm], seconds: float) -> dict[str, float]:
    """Each gateway's CPU ms per second with no request at all, side by side."""
    before = {arm.name: arm.proc.cpu_seconds() for arm in gateways}
    time.sleep(seconds)
    return {arm.name: (arm.proc.cpu_seconds() - before[arm.name]) / seconds * 1e3
            for arm in gateways}


def _closed_loop(gateways: list[Arm], plan: RayPlan, say: Callable[[str], None]
                 ) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, float]]] = {arm.name: [] for arm in gateways}
    for rnd in range(plan.cpu_rounds):
        for arm in gateways if rnd % 2 == 0 else gateways[::-1]:
            us, rps = aio.run(cpu_per_request(arm, plan.concurrency, plan.cpu_seconds))
            rounds[arm.name].append({"cpu_us": us, "rps": rps})
            say(f"  closed loop round {rnd + 1} {arm.name:<25} {us:7.1f} µs CPU per request "
                f"{rps:8.0f} req/s")
    medians = {name: {"cpu_us": statistics.median(r["cpu_us"] for r in rows),
                      "rps": statistics.median(r["rps"] for r in rows)}
               for name, rows in rounds.items()}
    return {"concurrency": plan.concurrency, "seconds": plan.cpu_seconds,
            "rounds": rounds, "median": medians}


def _ratio(b: float | None, a: float | None) -> float | None:
    return b / a if a and b is not None and a > 0 else None


def _compare(result: dict[str, Any], rates: list[int]) -> dict[str, Any]:
    """The Ray arm against the local one: the relay's cost (B - A) and the ratios B / A."""
    added = result["overhead"]["added"]
    arms = result["overhead"]["arms"]
    per_rate: dict[str, Any] = {}
    for rate in rates:
        a, b = added.get(LOCAL, {}).get(str(rate)), added.get(REMOTE, {}).get(str(rate))
        ra, rb = arms[LOCAL].get(str(rate), {}), arms[REMOTE].get(str(rate), {})
        if a is None or b is None:
            per_rate[str(rate)] = None
            continue
        per_rate[str(rate)] = {
            "relay_p50_ms": b["p50"] - a["p50"], "relay_p99_ms": b["p99"] - a["p99"],
            "added_p50_ratio": _ratio(b["p50"], a["p50"]),
            "added_p99_ratio": _ratio(b["p99"], a["p99"]),
            "cpu_per_1k_ratio": _ratio(rb.get("cpu_s_per_1k"), ra.get("cpu_s_per_1k")),
            "valid": bool(a["valid"] and b["valid"])}
    closed = result["closed_loop"]["median"]
    return {"paced": per_rate,
            "cpu_per_request_ratio": _ratio(closed[REMOTE]["cpu_us"], closed[LOCAL]["cpu_us"]),
            "cpu_per_request_us": closed[REMOTE]["cpu_us"] - closed[LOCAL]["cpu_us"],
            "throughput_ratio": _ratio(closed[REMOTE]["rps"], closed[LOCAL]["rps"])}


@contextlib.contextmanager
def _cluster(say: Callable[[str], None]) -> Iterator[Any]:
    # tests/ray_cluster.py is how the tests start theirs: one way to set up the loopback nodes.
    from tests.ray_cluster import start_cluster

    started = time.monotonic()
    cluster = start_cluster()
    try:
        say(f"  Ray cluster up in {time.monotonic() - started:.1f} s: node_a (head) on "
            f"127.0.0.2, node_b on 127.0.0.3, Ray Client on 127.0.0.2:{cluster.client_port}")
        yield cluster
    finally:
        cluster.close()


@contextlib.contextmanager
def _stopped_first(procs: Procs) -> Iterator[None]:
    """The processes started inside are stopped before the cluster is: the Ray gateway stops
    its worker's actor while the cluster is still there to ask."""
    before = set(map(id, procs.started))
    try:
        yield
    finally:
        for proc in reversed([p for p in procs.started if id(p) not in before]):
            procs.stop(proc)


def run_ray(procs: Procs, work: Path, plan: RayPlan, load_cpus: set[int] | None,
            gateway_cpus: set[int] | None, say: Callable[[str], None]) -> dict[str, Any]:
    """The part: the cluster, the three arms, the measurements; its results (bench/results/
    ray.json). The caller runs it pinned to `load_cpus`, so the cluster's nodes (and the
    workers their actors spawn) run there too."""
    started = time.monotonic()
    load0 = os.getloadavg()[:2]
    with _cluster(say) as cluster, _stopped_first(procs):
        address = f"ray://127.0.0.2:{cluster.client_port}"
        direct = start_upstream(procs, load_cpus)
        local = start_modelhost(procs, work / "local", [model(load_cpus, None)],
                                cpus=gateway_cpus, name="modelhost-local")
        remote = start_modelhost(procs, work / "ray", [model(load_cpus, {"resources":
                                                                         {"node_b": 1}})],
                                 cpus=gateway_cpus, name="modelhost-ray",
                                 env={"MODELHOST_RAY_ADDRESS": address,
                                      "MODELHOST_RAY_PLACEMENT_TIMEOUT": "30"})
        gateways = [replace(arm, name=name, target=replace(arm.target, name=name),
                            proc=OwnCpu(arm.proc.name, arm.proc.popen, arm.proc.log))
                    for arm, name in ((local, LOCAL), (remote, REMOTE))]
        ready = {arm.name: round(_ready(arm), 2) for arm in gateways}
        node_b = next(n for n in cluster.nodes if n.name == "node_b")
        workers = {LOCAL: _where(gateways[0], local.proc.tree(), "127.0.0.1"),
                   REMOTE: _where(gateways[1], node_b.descendants(), "127.0.0.3")}
        workers[LOCAL]["node"] = "this machine (a child of the gateway)"
        workers[REMOTE]["node"] = "node_b (spawned by a Ray actor there)"
        say(f"  workers ready ({', '.join(f'{k} {v} s' for k, v in ready.items())}): "
            f"local on {workers[LOCAL]['host']}, Ray's on {workers[REMOTE]['host']} (node_b)")
        arms = [direct, *gateways]
        say("  warming up")
        aio.run(_warm(arms))
        idle = _idle(gateways, plan.idle_seconds)
        say("  idle: " + ", ".join(f"{k} {v:.1f} ms CPU/s" for k, v in idle.items()))
        op = plan.overhead
        say(f"  paced: rates {op.rates} req/s, {op.rounds} rounds of {op.duration:g} s, arms "
            f"interleaved")
        result: dict[str, Any] = {
            "cluster": {"address": address, "nodes": [
                {"name": n.name, "ip": n.ip} for n in cluster.nodes],
                "ray": _ray_version()},
            "workers": workers, "ready_s": ready, "idle_cpu_ms_per_s": idle}
        result["overhead"] = aio.run(run_overhead(arms, op, say))
        result["closed_loop"] = _closed_loop(gateways, plan, say)
    result["compare"] = _compare(result, op.rates)
    result["plan"] = {"rates": op.rates, "duration_s": op.duration, "warmup_s": op.warmup,
                      "rounds": op.rounds, "cpu_rounds": plan.cpu_rounds,
                      "cpu_seconds": plan.cpu_seconds, "concurrency": plan.concurrency,
                      "model": MODEL}
    result["pinning"] = ({"load generator, upstream, workers, Ray nodes": sorted(load_cpus),
                          "gateways": sorted(gateway_cpus)}
                         if load_cpus and gateway_cpus else None)
    result["load"] = {"start": [round(x, 2) for x in load0],
                      "end": [round(x, 2) for x in os.getloadavg()[:2]]}
    result["seconds"] = time.monotonic() - started
    _say_summary(result, op.rates, say)
    return result


def _ray_version() -> str | None:
    import importlib.metadata

    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version("ray")
    return None


def _say_summary(result: dict[str, Any], rates: list[int], say: Callable[[str], None]) -> None:
    compare = result["compare"]
    for rate in rates:
        row = compare["paced"].get(str(rate))
        if row is None:
            say(f"  {rate} req/s: no comparison (an arm was not measured)")
            continue
        say(f"  {rate:>5} req/s: the relay to node_b adds {row['relay_p50_ms']:+.3f} ms p50, "
            f"{row['relay_p99_ms']:+.3f} ms p99 over the local worker; added latency Ray / "
            f"local x{row['added_p50_ratio'] or float('nan'):.2f} (p50), "
            f"x{row['added_p99_ratio'] or float('nan'):.2f} (p99)")
    closed = result["closed_loop"]["median"]
    say(f"  CPU per request, closed loop: local {closed[LOCAL]['cpu_us']:.1f} µs, Ray "
        f"{closed[REMOTE]['cpu_us']:.1f} µs: x{compare['cpu_per_request_ratio'] or 0:.3f}")
