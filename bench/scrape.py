"""A Prometheus stand-in for the "modelhost (scraped)" arm: a process on the load side that
GETs the gateway's `/metrics` every S seconds while the arm is being measured.

    python -m bench.scrape --port P --every S --stats FILE

It runs in its own process (on the load generator's core), so that a scrape never holds the
load generator's GIL: what the scraped arm shows is the gateway's cost, not the client's. It
scrapes only while switched on (SIGUSR1; SIGUSR2 switches it off), on a fixed grid of S
seconds as Prometheus does, over one keep-alive connection, with Prometheus's own headers and
the admin key. After every scrape, and when it ends (SIGTERM), it rewrites FILE with what it
has counted so far: scrapes, errors, time switched on, duration and size of the answers.

`Scraper` is the runner's side: it starts the process, switches it on around each of the arm's
steps (`Scraper.watching`) and reads the counters back.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import http.client
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .arms import ADMIN_KEY, clean_env
from .procs import Proc, Procs

ROOT = Path(__file__).resolve().parent.parent
ON, OFF = signal.SIGUSR1, signal.SIGUSR2
# What Prometheus 2.x sends (its scrape timeout: 10 s, the default).
HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,"
              "application/openmetrics-text;version=0.0.1;q=0.4,"
              "text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.53.0",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
    "Authorization": f"Bearer {ADMIN_KEY}",
}
TIMEOUT_S = 10.0


@dataclass
class Counts:
    """What the scraper has done so far (FILE's content): one entry per scrape answered."""

    every_s: float
    errors: int = 0
    last_error: str | None = None
    seconds_on: float = 0.0  # switched on (the scraped arm's steps), in all
    ms: list[float] = field(default_factory=list)  # request to last byte
    sizes: list[int] = field(default_factory=list)  # as received (gzip if the gateway does)
    text_sizes: list[int] = field(default_factory=list)  # the exposition text
    samples: int = 0  # lines that are not comments (one per series) in the last scrape
    encodings: list[str] = field(default_factory=list)

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)


def summary(counts: dict[str, Any]) -> dict[str, Any]:
    """The figures reported for a part, from `difference` of two readings of FILE."""
    ms, sizes, text = counts["ms"], counts["sizes"], counts["text_sizes"]
    n = len(ms)
    return {"every_s": counts["every_s"], "scrapes": n, "errors": counts["errors"],
            "last_error": counts.get("last_error"),
            "seconds_on": counts["seconds_on"],
            "mean_ms": statistics.fmean(ms) if n else None,
            "median_ms": statistics.median(ms) if n else None,
            "max_ms": max(ms) if n else None,
            "mean_bytes": statistics.fmean(sizes) if n else None,
            "max_bytes": max(sizes) if n else None,
            "mean_text_bytes": statistics.fmean(text) if n else None,
            "samples": counts["samples"] or None,
            "encodings": counts.get("encodings") or []}


def difference(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """What happened between two readings of FILE (the last scrape's series: `after`'s)."""
    out = dict(after)
    out["errors"] = after["errors"] - before["errors"]
    out["seconds_on"] = after["seconds_on"] - before["seconds_on"]
    for key in ("ms", "sizes", "text_sizes"):
        out[key] = after[key][len(before[key]):]
    return out


def get_metrics(conn: http.client.HTTPConnection) -> tuple[bytes, str]:
    """One scrape: the answer as received, and its encoding."""
    conn.request("GET", "/metrics", headers=HEADERS)
    answer = conn.getresponse()
    raw = answer.read()
    if answer.status != 200:
        raise RuntimeError(f"/metrics answered {answer.status}: {raw[:200]!r}")
    return raw, answer.getheader("Content-Encoding") or "identity"


def _scrape(conn: http.client.HTTPConnection, counts: Counts) -> None:
    start = time.perf_counter()
    try:
        raw, encoding = get_metrics(conn)
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        # The gateway closed the idle keep-alive connection (its keep-alive timeout passed
        # while the arm was not measured): reconnect and ask again, as Prometheus's client
        # does for an idempotent request on a stale connection.
        conn.close()
        start = time.perf_counter()
        raw, encoding = get_metrics(conn)
    took = time.perf_counter() - start
    text = gzip.decompress(raw) if encoding == "gzip" else raw
    counts.ms.append(took * 1e3)
    counts.sizes.append(len(raw))
    counts.text_sizes.append(len(text))
    counts.samples = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    if encoding not in counts.encodings:
        counts.encodings.append(encoding)


def idle_cost(proc: Proc, port: int, scrapes: int = 20) -> dict[str, Any]:
    """The gateway's CPU per scrape with no other load (after a part, when its histograms
    are full): what one scrape costs it, whatever the request rate. The median over
    `scrapes`, each read on its own, so that a collection or a busy neighbour on the machine
    does not weigh on it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    ms, cpu_ms = [], []
    try:
        get_metrics(conn)  # connected and warm
        for _ in range(scrapes):
            time.sleep(0.05)
            cpu0, start = proc.cpu_seconds(), time.perf_counter()
            get_metrics(conn)
            ms.append((time.perf_counter() - start) * 1e3)
            cpu_ms.append((proc.cpu_seconds() - cpu0) * 1e3)
    finally:
        conn.close()
    return {"scrapes": scrapes, "gateway_cpu_ms_per_scrape": statistics.median(cpu_ms),
            "gateway_cpu_ms_mean": statistics.fmean(cpu_ms), "median_ms": statistics.median(ms)}


def serve(port: int, every: float, stats: Path) -> None:
    """Scrape on a grid of `every` seconds while on, until SIGTERM."""
    signals = {ON, OFF, signal.SIGTERM}
    # Blocked, then taken one at a time: a signal is never lost nor handled mid-scrape.
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    counts = Counts(every_s=every)
    counts.write(stats)  # the runner waits for this: from now on SIGUSR1 is safe to send
    origin = time.monotonic()
    on_since: float | None = None
    due = math.inf
    conn: http.client.HTTPConnection | None = None
    while True:
        now = time.monotonic()
        info = signal.sigtimedwait(signals, 3600.0 if on_since is None else max(due - now, 0.0))
        now = time.monotonic()
        if info is None:
            if on_since is None or now < due:
                continue
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
                _scrape(conn, counts)
            except (OSError, http.client.HTTPException, RuntimeError) as exc:
                counts.errors += 1
                counts.last_error = f"{type(exc).__name__}: {exc}"[:300]
                if conn is not None:
                    conn.close()
                conn = None
            # The next point of the grid (a slow scrape skips points, as Prometheus does).
            due = origin + math.floor((time.monotonic() - origin) / every + 1) * every
            counts.write(stats)
        elif info.si_signo == ON and on_since is None:
            on_since = now
            due = origin + math.ceil((now - origin) / every) * every
        elif info.si_signo == OFF and on_since is not None:
            counts.seconds_on += now - on_since
            on_since = None
            due = math.inf
            counts.write(stats)
        elif info.si_signo == signal.SIGTERM:
            if on_since is not None:
                counts.seconds_on += now - on_since
            counts.write(stats)
            return


class Scraper:
    """The runner's handle on a `python -m bench.scrape` process."""

    def __init__(self, proc: Proc, stats: Path, every: float) -> None:
        self.proc = proc
        self.stats_path = stats
        self.every = every

    def counts(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.stats_path.read_text())
        return data

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Scraped inside (a step of the scraped arm), not outside."""
        if not self.proc.alive():
            raise RuntimeError(f"the scraper exited:\n{self.proc.output()}")
        os.kill(self.proc.pid, ON)
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, OFF)


def start_scraper(procs: Procs, port: int, every: float, workdir: Path,
                  cpus: set[int] | None) -> Scraper:
    workdir.mkdir(parents=True, exist_ok=True)
    stats = workdir / "scrapes.json"
    stats.unlink(missing_ok=True)
    proc = procs.start("scraper", [sys.executable, "-m", "bench.scrape", "--port", str(port),
                                   "--every", str(every), "--stats", str(stats)],
                       env=clean_env(), cpus=cpus, cwd=ROOT)
    deadline = time.monotonic() + 30
    while not stats.exists():
        if not proc.alive() or time.monotonic() > deadline:
            procs.stop(proc)
            raise RuntimeError(f"the scraper did not start:\n{proc.output()}")
        time.sleep(0.02)
    return Scraper(proc, stats, every)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scrape",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True, help="the gateway's port")
    parser.add_argument("--every", type=float, default=1.0, metavar="S")
    parser.add_argument("--stats", type=Path, required=True, metavar="FILE")
    args = parser.parse_args(argv)
    if args.every <= 0:
        parser.error("--every must be positive")
    serve(args.port, args.every, args.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
