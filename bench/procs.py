"""The processes a benchmark starts: spawned in their own process group, pinned to cores when
asked, measured (CPU seconds, memory) and always stopped, Ctrl-C included."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The cores this benchmark may use, read once: the runner later pins itself to some of them,
# and what it may give the processes it starts is still all of these.
CPUS: frozenset[int] = (frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else frozenset())


def pinning_possible() -> bool:
    return hasattr(os, "sched_setaffinity") and len(CPUS) >= 2


def _schedstat_seconds(pid: int) -> float | None:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log
        self.ps = psutil.Process(popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        procs = [self.ps]
        with contextlib.suppress(psutil.Error):
            procs += self.ps.children(recursive=True)
        return procs

    def cpu_seconds(self) -> float:
        """CPU time of the process and its live descendants: from the scheduler's own
        nanosecond counters (/proc/PID/task/*/schedstat) where Linux has them, else
        user + system time (10 ms ticks)."""
        total = 0.0
        for proc in self.tree():
            precise = _schedstat_seconds(proc.pid)
            if precise is not None:
                total += precise
                continue
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def cpus(self) -> list[int]:
        """The cores the process may run on, as the kernel has it now."""
        with contextlib.suppress(OSError):
            return sorted(os.sched_getaffinity(self.pid))
        return []

    def rss(self) -> int:
        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def output(self, last: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-last:]
        except OSError:
            return ""


class Procs:
    """Every process the benchmark started; `stop_all` (also on exit) ends them all."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              cpus: set[int] | None = None, cwd: Path | None = None) -> Proc:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        with log.open("wb") as out:
            popen = subprocess.Popen(
                list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=pin if cpus and pinning_possible() else None)
        proc = Proc(name, popen, log)
        self.started.append(proc)
        if cpus and pinning_possible() and proc.cpus() != sorted(cpus):
            # Every figure's reading rests on where its processes ran: never go on unpinned.
            self.stop(proc)
            raise RuntimeError(f"{name} was to run on core(s) {sorted(cpus)} but runs on "
                               f"{proc.cpus()}")
        return proc

    def stop(self, proc: Proc, grace: float = 10.0) -> None:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(grace)
        # Whatever is left in its group (a worker of a gateway that did not stop it).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5)
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            self.stop(proc)

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def http_get(port: int, path: str, key: str | None = None, timeout: float = 2.0
             ) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


def http_post(port: int, path: str, body: dict[str, Any], key: str | None = None,
              timeout: float = 300.0) -> tuple[int, Any, float]:
    """POST a JSON body; (status, parsed answer, seconds taken)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        start = time.perf_counter()
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        took = time.perf_counter() - start
        try:
            return resp.status, json.loads(raw), took
        except ValueError:
            return resp.status, raw.decode(errors="replace"), took
    finally:
        conn.close()


def wait_http(proc: Proc, port: int, path: str, timeout: float, key: str | None = None
              ) -> float:
    """Poll `path` until it answers 200; seconds waited. Raises when the process exits."""
    start = time.monotonic()
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with status {proc.popen.returncode}:\n"
                               f"{proc.output()}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, _ = http_get(port, path, key, timeout=2)
            if status == 200:
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{proc.name} did not answer {path} in {timeout:g} s:\n"
                               f"{proc.output()}")
        time.sleep(0.05)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM to the benchmark unwinds like Ctrl-C, so every `finally` runs."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
