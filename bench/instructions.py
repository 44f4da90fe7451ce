"""Instructions per relayed request, counted by Valgrind: a figure that load cannot move.

    .venv/bin/python -m bench.instructions REV_A [REV_B ...] [--requests N]
                                        (one revision: compared with the working tree)

`bench.compare` measures CPU time, which moves by several percent with whatever else the
machine runs; to tell where a few microseconds per request went between two revisions that is
too coarse. Here each gateway runs under Valgrind's callgrind with counting off while it starts
(the import alone is billions of instructions). Counting is then switched on, `--warmup`
requests are sent, and two windows of `--seconds` each are counted: `N` requests paced evenly
over the first, `2N` over the second, one after another on one keep-alive connection. The
gateway's timers (the usage ledger's flush to the database once a second, the access log, the
metrics) do the same in both windows, whatever the rate: the difference of the two counts is
what `N` requests cost on their own, divided by `N`. The result is instructions (Ir) per
request, the same from one run to the next within about a percent, whatever the load (a run
whose requests overran a window says so: the timers' share then differs).

Each dump is a callgrind profile (`callgrind_annotate FILE` shows where the instructions went,
by C function: the interpreter's, the libraries', the kernel boundary's). Slow: the gateway runs
about 50 times slower under Valgrind (half a minute to start). Needs `valgrind` (Debian's).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .arms import MODELHOST_KEY, clean_env, remote_models, start_upstream
from .compare import export
from .overhead import BODY, MODEL
from .procs import Proc, Procs, free_port, wait_http
from .runner import ROOT

START_TIMEOUT = 900.0


def _dump(pid: int, out: Path, label: str) -> int:
    """Dump the counters since the last zeroing into a file of their own; its total Ir."""
    before = set(out.parent.glob(f"{out.name}*"))
    subprocess.run(["callgrind_control", "--dump=" + label, str(pid)], check=True,
                   capture_output=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = [p for p in set(out.parent.glob(f"{out.name}*")) - before if p.stat().st_size]
        for path in new:
            text = path.read_text(errors="replace")
            found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
            if found:
                return int(found.group(1))
        time.sleep(0.2)
    raise RuntimeError(f"callgrind wrote no dump for {label}")


def _zero(pid: int) -> None:
    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)


def send_requests(port: int, n: int, seconds: float = 0.0) -> float:
    """`n` chat requests one after another on one connection, paced evenly over `seconds`
    (0: as fast as they go); the seconds they took."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Authorization": f"Bearer {MODELHOST_KEY}", "Content-Type": "application/json"}
    start = time.monotonic()
    for i in range(n):
        wait = start + i * seconds / n - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        conn.request("POST", "/v1/chat/completions", body=BODY, headers=headers)
        answer = conn.getresponse()
        body = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"status {answer.status}: {body[:200]!r}")
    if seconds:
        time.sleep(max(start + seconds - time.monotonic(), 0.0))
    conn.close()
    return time.monotonic() - start


def gateway_setup(workdir: Path, upstream_port: int, pythonpath: str
                  ) -> tuple[Path, Path, int, dict[str, str]]:
    """A gateway's folder, models file (the fake upstream's chat model), port and
    environment (`pythonpath`: the revision's src/ first)."""
    workdir.mkdir(parents=True)
    config = workdir / "models.yaml"
    config.write_text(json.dumps({"include_builtin": False,
                                  "models": remote_models(upstream_port, [MODEL])}))
    env = clean_env(OPENAI_API_KEYS=MODELHOST_KEY, MODELHOST_DATA_DIR=str(workdir / "data"),
                    HF_HUB_OFFLINE="1", MODELHOST_STOP_TIMEOUT="5", PYTHONPATH=pythonpath)
    return workdir, config, free_port(), env


def measure(procs: Procs, work: Path, name: str, src: Path, upstream_port: int,
            n: int, warmup: int, seconds: float) -> dict[str, float]:
    """Two windows of `seconds` each, `n` and then `2n` requests paced over it: what the
    gateway's timers do in that time is in both, so the difference is `n` requests' own."""
    workdir, config, port, env = gateway_setup(work / name, upstream_port, str(src))
    out = workdir / "callgrind.out"
    proc: Proc = procs.start(name, [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, "-m", "modelhost", "serve", "--config", str(config),
        "--port", str(port)], env=env, cwd=workdir)
    started = wait_http(proc, port, "/health", START_TIMEOUT)
    print(f"{name}: up under valgrind in {started:.0f} s", flush=True)
    subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True,
                   capture_output=True)
    send_requests(port, warmup)
    _zero(proc.pid)
    took_low = send_requests(port, n, seconds)
    low = _dump(proc.pid, out, "low")
    _zero(proc.pid)
    took_high = send_requests(port, 2 * n, seconds)
    high = _dump(proc.pid, out, "high")
    procs.stop(proc)
    if max(took_low, took_high) > seconds * 1.1:
        print(f"{name}: the requests overran their window ({took_low:.1f} s, {took_high:.1f} s "
              f"for {seconds:g} s): use fewer --requests or more --seconds", flush=True)
    per = (high - low) / n
    print(f"{name}: {n} requests in {took_low:.1f} s {low:,} Ir, {2 * n} in {took_high:.1f} s "
          f"{high:,} Ir: {per:,.0f} Ir per request", flush=True)
    return {"ir_per_request": per, "low": low, "high": high}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("revisions", nargs="+", metavar="REV",
                        help="revisions (e.g. 061adbe HEAD); one alone: with the working tree")
    parser.add_argument("--requests", type=int, default=400,
                        help="requests in the first window (twice as many in the second)")
    parser.add_argument("--seconds", type=float, default=30.0, help="each window's length")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--keep", type=Path, help="copy the callgrind dumps here")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="modelhost-ir-") as tmp:
        work = Path(tmp)
        sources: dict[str, Path] = {}
        labels: dict[str, str] = {}
        for i, rev in enumerate(args.revisions):
            name = chr(ord("A") + i)
            sources[name], labels[name] = export(rev, (work / f"src-{name}").resolve()), rev
        if len(args.revisions) == 1:
            sources["B"], labels["B"] = ROOT / "src", "working tree"
        results: dict[str, dict[str, float]] = {}
        with Procs(work / "logs") as procs:
            upstream = start_upstream(procs, None)
            for name, src in sources.items():
                try:
                    results[name] = measure(procs, work, name, src, upstream.target.port,
                                            args.requests, args.warmup, args.seconds)
                except RuntimeError as exc:  # a revision that does not start: the others go on
                    print(f"{name} {labels[name]}: not measured: "
                          f"{str(exc).splitlines()[-1]}", flush=True)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for path in work.glob("*/callgrind.out*"):
                shutil.copy(path, args.keep / f"{path.parent.name}-{path.name}")
    if not results:
        return 1
    first = next(iter(results.values()))["ir_per_request"]
    for name, figures in results.items():
        per = figures["ir_per_request"]
        print(f"{name} {labels[name]:>14}: {per:10,.0f} Ir per request  x{per / first:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
