"""modelhost's own worker apps (speech, diarization, embeddings) as real processes, started the
way the gateway starts them (`python -m modelhost.workers.apps.X --host 127.0.0.1 --port N`),
for the tests that drive them over HTTP:

    with worker_app("speech", "--model", str(model), log=tmp / "worker.log") as app:
        httpx.get(app.url + "/v1/models")

`worker_app` waits until `GET /v1/models` answers, and insists that its first answer is a 200
(an app loads its model before it opens its port: there is no window where it answers without
one); it fails the test with the app's log if the app exits or is not ready in time. On the
way out the app gets SIGTERM (a graceful stop), then SIGKILL if it is still there after
`stop_seconds`: no process outlives the `with`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from modelhost.workers.process import free_port


@dataclass
class WorkerApp:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    load_seconds: float  # from the start of the process to its first 200


def worker_argv(app: str, port: int, *args: str) -> list[str]:
    """The command line of worker app `app` on the loopback port `port`, plus `args`."""
    return [sys.executable, "-m", f"modelhost.workers.apps.{app}", "--host", "127.0.0.1",
            "--port", str(port), *args]


def log_tail(log: Path, chars: int = 5000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


@contextlib.contextmanager
def worker_app(app: str, *args: str, log: Path, env: Mapping[str, str] | None = None,
               ready_seconds: float = 120, stop_seconds: float = 20) -> Iterator[WorkerApp]:
    """Worker app `app` started with `args` on a free loopback port, its output in `log`,
    with `env` added to this process's environment; ready when this yields, stopped after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(worker_argv(app, port, *args), stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        ready = _wait_ready(app, proc, url, log, started + ready_seconds)
        yield WorkerApp(url, proc, log, ready - started)
    finally:
        stop(proc, stop_seconds)
        print(f"\n{app} worker log:\n{log_tail(log, 3000)}")


def _wait_ready(app: str, proc: subprocess.Popen[bytes], url: str, log: Path,
                deadline: float) -> float:
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the {app} worker exited ({proc.returncode}):\n{log_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"the {app} worker was not ready in time:\n{log_tail(log)}")
        try:
            resp = httpx.get(url + "/v1/models", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.1)  # not listening yet: the model loads before the port opens
            continue
        # The first answer is already "ready": there is no window where it answers 200
        # without a model.
        assert resp.status_code == 200, resp.text
        return time.monotonic()


def stop(proc: subprocess.Popen[bytes], grace: float = 20) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; reaped either way."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
