"""The page's section on the `ray` part (bench/raynode.py): the relay to a worker on another
Ray node, next to the same gateway with a local worker."""

from __future__ import annotations

from typing import Any

from .raynode import LOCAL, REMOTE
from .report_fmt import f, table

TITLE = "## Relay to a worker on another Ray node"

NOT_RUN = f"""{TITLE}

Not in this run: `bench/run --ray` (or `bench/run --only ray`) measures what a gateway costs
per request when its model's worker runs on another node of a Ray cluster (a two-node cluster
on loopback); it needs Ray (`pip install -e '.[ray]'`)."""

ABOUT = """What a gateway costs per request when its model's worker is a Ray actor's process on
another node, next to the same gateway with the same worker as a local process. `bench/run
--ray` (or `--only ray`) starts a two-node Ray cluster on loopback, as the tests do
(`tests/ray_cluster.py`: node_a, the head, on 127.0.0.2; node_b on 127.0.0.3), and three arms:

- **direct**: the fake upstream hit directly, the baseline of *added*;
- **modelhost (local worker)**: a gateway without Ray whose model `ovh-size512` is `backend:
  command` with the fake upstream (`bench.upstream --host {host} --port {port}`) as its worker,
  a process on 127.0.0.1;
- **modelhost (Ray node_b)**: a second gateway with `MODELHOST_RAY_ADDRESS` (Ray Client,
  `ray://127.0.0.2:PORT`) and the same model with `ray: {resources: {node_b: 1}}`: its worker is
  spawned by a Ray actor on node_b and listens on 127.0.0.3, where the gateway relays to.

**The other node is the same machine.** 127.0.0.3 is a loopback address: the figures are the
gateway's own cost of a worker on a Ray node plus loopback, not a network's latency (add your
network's round trip per request to them). Ray itself is not on the request's path: the gateway
relays HTTP to the worker's address; Ray places and supervises the worker (the gateway pings its
actor once a second: that is in the idle figure, and in the paced steps' CPU per request).
The upstreams, both workers and the Ray nodes
run on the load generator's core, the two gateways on the other; a gateway's CPU is its own
process's, without the local worker (its child). Paced steps: the overhead part's open-loop load,
the three arms interleaved round by round; closed loop: each gateway in turn at a fixed
concurrency, as `bench.compare`, the medians compared."""


def ray_section(ray: dict[str, Any] | None) -> str:
    if ray is None:
        return NOT_RUN
    if "failed" in ray:
        return f"{TITLE}\n\nThe `ray` part failed in its last run:\n\n```\n" \
               f"{ray['failed'].strip()[-1500:]}\n```"
    out = [TITLE, ABOUT, _run(ray), _paced(ray), _closed(ray)]
    return "\n\n".join(out)


def _run(ray: dict[str, Any]) -> str:
    meta = ray.get("machine", {})
    plan = ray.get("plan", {})
    workers = ray.get("workers", {})
    idle = ray.get("idle_cpu_ms_per_s", {})
    load = ray.get("load", {})
    rows = [
        ["run", f"{meta.get('date')}, {meta.get('mode')} mode, {f(ray.get('seconds'), 0)} s, "
                f"git {meta.get('git') or '-'}, Ray {ray.get('cluster', {}).get('ray')}"],
        ["CPU", f"{meta.get('cpu')}, {meta.get('cores')} cores; load average "
                f"{load.get('start', ['-'])[0]} at start, {load.get('end', ['-'])[0]} at end"],
        ["plan", f"rates {', '.join(map(str, plan.get('rates', [])))} req/s, "
                 f"{plan.get('rounds')} rounds of {plan.get('duration_s')} s; closed loop "
                 f"{plan.get('cpu_rounds')} rounds of {plan.get('cpu_seconds')} s per gateway "
                 f"at concurrency {plan.get('concurrency')}"],
    ]
    for arm in (LOCAL, REMOTE):
        w = workers.get(arm, {})
        rows.append([f"{arm}: worker", f"listens on {w.get('host')}, {w.get('node')}, "
                                       f"core(s) {','.join(map(str, w.get('cores', [])))}"])
    rows.append(["gateways idle", "; ".join(f"{arm} {f(idle.get(arm), 1)} ms CPU per second"
                                             for arm in (LOCAL, REMOTE))])
    return table(["", ""], rows)


def _paced(ray: dict[str, Any]) -> str:
    over = ray["overhead"]
    compare = ray["compare"]["paced"]
    rows = []
    for rate in over["plan"]["rates"]:
        for arm in ("direct", LOCAL, REMOTE):
            row = over["arms"].get(arm, {}).get(str(rate), {})
            if row.get("skipped"):
                rows.append([str(rate), arm, "skipped", "", "", "", "", "", ""])
                continue
            lat = row.get("latency_ms", {})
            added = over["added"].get(arm, {}).get(str(rate)) or {}
            rows.append([f"{rate:,}", arm, f(lat.get("p50"), 3), f(lat.get("p99"), 3),
                         f(added.get("p50"), 3), f(added.get("p99"), 3),
                         # direct's CPU is the upstream's, not a gateway's
                         f(row.get("cpu_s_per_1k") if arm != "direct" else None, 3),
                         f(row.get("achieved_rps"), 0),
                         f"{row.get('error_rate', 0) * 100:.2f} %"])
    paced = table(["req/s", "arm", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms",
                   "gateway CPU s / 1k req", "achieved req/s", "errors"], rows)
    rel = []
    for rate in over["plan"]["rates"]:
        c = compare.get(str(rate))
        if c is None:
            rel.append([f"{rate:,}", "-", "-", "-", "-", "-"])
            continue
        rel.append([f"{rate:,}", f(c["relay_p50_ms"], 3), f(c["relay_p99_ms"], 3),
                    _x(c["added_p50_ratio"]), _x(c["added_p99_ratio"]),
                    _x(c["cpu_per_1k_ratio"]) + ("" if c["valid"] else " (errors)")])
    higher = total = 0
    for rate in over["plan"]["rates"]:
        pairs = zip(over["arms"].get(LOCAL, {}).get(str(rate), {}).get("rounds", []),
                    over["arms"].get(REMOTE, {}).get(str(rate), {}).get("rounds", []),
                    strict=False)  # a collapsed arm has fewer rounds
        for a, b in pairs:
            if a.get("p99_ms") is not None and b.get("p99_ms") is not None:
                total += 1
                higher += b["p99_ms"] > a["p99_ms"]
    rounds = (f"\n\nThe Ray gateway's p99 was above the local one's in {higher} of {total} "
              "paced rounds (same rate, same round). Besides the worker's address, what "
              "differs between the two gateways is in the Ray one's process: Ray Client's "
              "threads and the ping of its worker's actor every second (see the idle CPU "
              "above); which of them delays a request was not measured here.")
    return ("### Paced load (open loop)\n\n" + paced + rounds
            + "\n\nThe Ray arm against the local one: "
            "*relay* is its added latency minus the local arm's (what the worker on node_b "
            "costs over a local one), the ratios are Ray / local.\n\n"
            + table(["req/s", "relay p50 ms", "relay p99 ms", "added p50 Ray / local",
                     "added p99 Ray / local", "CPU per request Ray / local"], rel))


def _closed(ray: dict[str, Any]) -> str:
    closed = ray["closed_loop"]
    compare = ray["compare"]
    rows = []
    for arm in (LOCAL, REMOTE):
        med = closed["median"][arm]
        spread = [r["cpu_us"] for r in closed["rounds"][arm]]
        rows.append([arm, f(med["cpu_us"], 1), f"{f(min(spread), 1)} to {f(max(spread), 1)}",
                     f(med["rps"], 0)])
    return ("### Gateway CPU per request (closed loop)\n\n" + table(
        ["gateway", "CPU µs per request (median)", "rounds", "req/s (median)"], rows)
        + f"\n\nRay / local: CPU per request {_x(compare['cpu_per_request_ratio'])} "
          f"({f(compare['cpu_per_request_us'], 1, ' µs')} per request), throughput "
          f"{_x(compare['throughput_ratio'])} (concurrency {closed['concurrency']}, "
          f"{len(closed['rounds'][LOCAL])} rounds of {closed['seconds']:g} s per gateway, "
          f"alternating).")


def _x(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"
