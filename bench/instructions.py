"""Instructions per relayed request, counted by Valgrind: a figure that load cannot move.

    .venv/bin/python -m bench.instructions REV_A [REV_B] [--requests N]    (REV_B: working tree)

`bench.compare` measures CPU time, which moves by several percent with whatever else the
machine runs; to tell where a few microseconds per request went between two revisions that is
too coarse. Here each gateway runs under Valgrind's callgrind with counting off while it starts
(the import alone is billions of instructions). Counting is then switched on, `--warmup`
requests are sent and the counters zeroed; `N` requests are sent one after another on one
keep-alive connection and the counters dumped; then the gateway is left idle for as long as
those requests took, and the counters dumped again: what its timers (usage ledger, access log,
metrics) cost in that time, taken off the first figure. The result is instructions (Ir) per
request, the same from one run to the next within a fraction of a percent, whatever the load.

Each dump is a callgrind profile (`callgrind_annotate FILE` shows where the instructions went,
by C function: the interpreter's, the libraries', the kernel boundary's). Slow: the gateway runs
about 50 times slower under Valgrind (about 2 minutes to start). Needs `valgrind` (Debian's).
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


def _requests(port: int, n: int) -> float:
    """`n` chat requests one after another on one connection; the seconds they took."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Authorization": f"Bearer {MODELHOST_KEY}", "Content-Type": "application/json"}
    start = time.monotonic()
    for _ in range(n):
        conn.request("POST", "/v1/chat/completions", body=BODY, headers=headers)
        answer = conn.getresponse()
        body = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"status {answer.status}: {body[:200]!r}")
    conn.close()
    return time.monotonic() - start


def measure(procs: Procs, work: Path, name: str, src: Path, upstream_port: int,
            n: int, warmup: int) -> dict[str, float]:
    workdir = work / name
    workdir.mkdir(parents=True)
    config = workdir / "models.yaml"
    config.write_text(json.dumps({"include_builtin": False,
                                  "models": remote_models(upstream_port, [MODEL])}))
    out = workdir / "callgrind.out"
    port = free_port()
    env = clean_env(OPENAI_API_KEYS=MODELHOST_KEY, MODELHOST_DATA_DIR=str(workdir / "data"),
                    HF_HUB_OFFLINE="1", MODELHOST_STOP_TIMEOUT="5", PYTHONPATH=str(src))
    proc: Proc = procs.start(name, [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, "-m", "modelhost", "serve", "--config", str(config),
        "--port", str(port)], env=env, cwd=workdir)
    started = wait_http(proc, port, "/health", START_TIMEOUT)
    print(f"{name}: up under valgrind in {started:.0f} s", flush=True)
    subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True,
                   capture_output=True)
    _requests(port, warmup)
    _zero(proc.pid)
    took = _requests(port, n)
    busy = _dump(proc.pid, out, "requests")
    _zero(proc.pid)
    time.sleep(took)
    idle = _dump(proc.pid, out, "idle")
    procs.stop(proc)
    per = (busy - idle) / n
    print(f"{name}: {n} requests in {took:.1f} s: {busy:,} Ir, idle for as long {idle:,} Ir: "
          f"{per:,.0f} Ir per request", flush=True)
    return {"ir_per_request": per, "busy": busy, "idle": idle, "seconds": took}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("a", help="a revision (e.g. 061adbe)")
    parser.add_argument("b", nargs="?", help="another revision (default: the working tree)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--keep", type=Path, help="copy the callgrind dumps here")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="modelhost-ir-") as tmp:
        work = Path(tmp)
        sources = {"A": export(args.a, (work / "a").resolve())}
        sources["B"] = export(args.b, (work / "b").resolve()) if args.b else ROOT / "src"
        labels = {"A": args.a, "B": args.b or "working tree"}
        results: dict[str, dict[str, float]] = {}
        with Procs(work / "logs") as procs:
            upstream = start_upstream(procs, None)
            for name, src in sources.items():
                results[name] = measure(procs, work, name, src, upstream.target.port,
                                        args.requests, args.warmup)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for path in work.glob("*/callgrind.out*"):
                shutil.copy(path, args.keep / f"{path.parent.name}-{path.name}")
    a, b = results["A"]["ir_per_request"], results["B"]["ir_per_request"]
    print(f"A {labels['A']}: {a:,.0f} Ir per request")
    print(f"B {labels['B']}: {b:,.0f} Ir per request")
    print(f"B / A: x{b / a:.3f} instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
