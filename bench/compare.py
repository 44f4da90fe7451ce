"""Two revisions of modelhost side by side: CPU per relayed request and closed-loop throughput.

    .venv/bin/python -m bench.compare REV_A [REV_B]     (REV_B: the working tree)

For a change that should not cost anything per request (a restructuring, say), the paced runs
of `bench/run` are too noisy on a small machine to tell a few percent: their steps last seconds
and the gateway's CPU per request at a few hundred requests a second moves by 20 % from one run
to the next. This measures the one figure such a change could move, the gateway's own CPU time
per request, where it is steadiest: both gateways run at once (on core 1, the load generator and
the fake upstream on core 0, when the machine has two), each serves the same chat request in a
closed loop at a fixed concurrency for a few seconds, in alternating rounds (A, B, A, B...), and
the medians are compared as a ratio. Nothing is written to bench/results.

`--scrape S` scrapes the second gateway's `/metrics` every S seconds while the two are measured
(as a Prometheus would, with the admin key), the first not at all: compare a revision with
itself (`python -m bench.compare HEAD --scrape 1`) to see what being watched costs alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

from .arms import ADMIN_KEY, Arm, remote_models, start_modelhost, start_upstream
from .overhead import MODEL, cpu_per_request
from .procs import Procs, pinning_possible
from .runner import GATEWAY_CPUS, LOAD_CPUS, ROOT


def export(rev: str, folder: Path) -> Path:
    """`rev`'s src/ in `folder` (what PYTHONPATH then points at)."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "src"


def scrape(arms: list[Arm], every: float, stop: threading.Event) -> int:
    """GET /metrics of every arm every `every` seconds until `stop`; the scrapes made."""
    done = 0
    while not stop.wait(every):
        for arm in arms:
            request = urllib.request.Request(
                f"http://127.0.0.1:{arm.target.port}/metrics",
                headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                answer.read()
            done += 1
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("a", help="a revision (e.g. main~3)")
    parser.add_argument("b", nargs="?", help="another revision (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--scrape", type=float, default=0.0, metavar="S",
                        help="scrape the second gateway's /metrics every S seconds meanwhile")
    args = parser.parse_args(argv)
    pin = pinning_possible()
    with tempfile.TemporaryDirectory(prefix="modelhost-compare-") as tmp:
        work = Path(tmp)
        a = f"A {args.a}"
        b = f"B {args.b or 'working tree'}"  # A and B: a revision may be compared with itself
        sources = {a: export(args.a, (work / "a").resolve())}
        if args.b:
            sources[b] = export(args.b, (work / "b").resolve())
        else:
            sources[b] = ROOT / "src"
        with Procs(work / "logs") as procs:
            if pin:
                os.sched_setaffinity(0, LOAD_CPUS)
            upstream = start_upstream(procs, LOAD_CPUS if pin else None)
            arms: dict[str, Arm] = {}
            for name, src in sources.items():
                os.environ["PYTHONPATH"] = str(src)
                arms[name] = start_modelhost(procs, work / f"gw-{len(arms)}",
                                             remote_models(upstream.target.port, [MODEL]),
                                             cpus=GATEWAY_CPUS if pin else None,
                                             name=f"modelhost-{len(arms)}")
            os.environ.pop("PYTHONPATH", None)
            figures: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
            stop = threading.Event()
            scrapes: list[int] = []
            scraper = threading.Thread(
                target=lambda: scrapes.append(scrape([arms[b]], args.scrape, stop)),
                daemon=True) if args.scrape > 0 else None
            if scraper is not None:
                scraper.start()
            try:
                for round_ in range(1, args.rounds + 1):
                    for name, arm in arms.items():
                        us, rps = asyncio.run(cpu_per_request(arm, args.concurrency,
                                                              args.seconds))
                        figures[name].append((us, rps))
                        print(f"round {round_}  {name:>14}  {us:6.1f} µs CPU per request  "
                              f"{rps:8.0f} req/s", flush=True)
            finally:
                stop.set()
                if scraper is not None:
                    scraper.join(30)
            if scrapes:
                print(f"({b}'s /metrics scraped {scrapes[0]} times meanwhile, every "
                      f"{args.scrape:g} s)")
    medians = {name: (statistics.median(us for us, _ in rows),
                      statistics.median(rps for _, rps in rows))
               for name, rows in figures.items()}
    for name, (us, rps) in medians.items():
        spread = [us for us, _ in figures[name]]
        print(f"median  {name:>14}  {us:6.1f} µs CPU per request (runs {min(spread):.1f} to "
              f"{max(spread):.1f})  {rps:8.0f} req/s")
    (us_a, rps_a), (us_b, rps_b) = medians[a], medians[b]
    scraped = f", {b} scraped every {args.scrape:g} s" if args.scrape else ""
    print(f"{b} / {a}: CPU per request x{us_b / us_a:.3f}, throughput "
          f"x{rps_b / rps_a:.3f} (concurrency {args.concurrency}, {args.rounds} rounds of "
          f"{args.seconds:g} s{scraped})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
