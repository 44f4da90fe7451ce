"""Python function calls per relayed request, two revisions side by side: which functions a
change added to (or took from) every request. Exact counts, whatever the machine's load.

    .venv/bin/python -m bench.calls REV_A [REV_B] [--requests N] [--top K]

Each gateway runs with a profiler that a signal turns on and off (`--child`: SIGUSR1 starts
cProfile, SIGUSR2 stops it and writes its statistics); `N` requests are sent one after another
between the two signals. The table lists, per request, the calls of each function in A and in
B, the functions whose count changed most first, with their own time under the profiler (which
inflates small functions: read the counts, and `bench.instructions` for the true cost).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import runpy
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from .arms import start_upstream
from .compare import export
from .instructions import gateway_setup, send_requests
from .procs import Procs, wait_http
from .runner import ROOT


def child(out: str, argv: list[str]) -> None:
    """Run `python -m modelhost ARGV` with the profiler behind SIGUSR1/SIGUSR2."""
    profile = cProfile.Profile()

    def on(signum: int, frame: FrameType | None) -> None:
        profile.enable()

    def off(signum: int, frame: FrameType | None) -> None:
        profile.disable()
        profile.dump_stats(out)

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)
    sys.argv = ["modelhost", *argv]
    runpy.run_module("modelhost", run_name="__main__", alter_sys=True)


def _key(func: tuple[str, int, str]) -> str:
    path, line, name = func
    if not line:  # a built-in function: "<method 'write' of ...>"
        return name
    marker = path.rfind("/modelhost/")
    short = path[marker + 1:] if marker >= 0 else "/".join(path.rsplit("/", 2)[-2:])
    return f"{short}:{name}"


def measure(procs: Procs, work: Path, name: str, src: Path, upstream_port: int, n: int,
            warmup: int) -> dict[str, tuple[float, float]]:
    workdir, config, port, env = gateway_setup(work / name, upstream_port,
                                               f"{src}{os.pathsep}{ROOT}")
    out = workdir / "calls.prof"
    proc = procs.start(name, [sys.executable, "-m", "bench.calls", "--child", str(out), "--",
                              "serve", "--config", str(config), "--port", str(port)],
                       env=env, cwd=workdir)
    wait_http(proc, port, "/health", 120)
    send_requests(port, warmup)
    os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(0.2)
    send_requests(port, n)
    os.kill(proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    procs.stop(proc)
    stats = pstats.Stats(str(out))
    table: dict[str, tuple[float, float]] = {}
    for func, (_cc, ncalls, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        key = _key(func)
        calls, own = table.get(key, (0.0, 0.0))
        table[key] = (calls + ncalls / n, own + tottime / n * 1e6)
    return table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[3:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.calls",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("a")
    parser.add_argument("b", nargs="?")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--top", type=int, default=60)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="modelhost-calls-") as tmp:
        work = Path(tmp)
        sources = {"A": export(args.a, (work / "a").resolve())}
        sources["B"] = export(args.b, (work / "b").resolve()) if args.b else ROOT / "src"
        with Procs(work / "logs") as procs:
            upstream = start_upstream(procs, None)
            a, b = (measure(procs, work, name, src, upstream.target.port, args.requests,
                            args.warmup) for name, src in sources.items())
    total_a = sum(c for c, _ in a.values())
    total_b = sum(c for c, _ in b.values())
    print(f"calls per request: A {args.a} {total_a:.1f}, B {args.b or 'working tree'} "
          f"{total_b:.1f}")
    names = set(a) | set(b)
    rows = sorted(names, key=lambda k: -abs(b.get(k, (0, 0))[0] - a.get(k, (0, 0))[0]))
    print(f"{'function':<70} {'A calls':>8} {'B calls':>8} {'A µs':>7} {'B µs':>7}")
    for key in rows[:args.top]:
        ca, ta = a.get(key, (0.0, 0.0))
        cb, tb = b.get(key, (0.0, 0.0))
        print(f"{key[-70:]:<70} {ca:8.2f} {cb:8.2f} {ta:7.2f} {tb:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
