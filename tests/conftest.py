"""Test fixtures: a real `modelhost serve` process on a free loopback port.

Like vLLM's RemoteOpenAIServer: tests drive the gateway over real HTTP, with the official
`openai` client where it applies, and the workers are real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from modelhost.workers.process import free_port

TESTS = Path(__file__).parent
FAKE_WORKER = str(TESTS / "fake_worker.py")


def fake_model(model_id: str, events: Path | None = None, *args: str,
               **fields: Any) -> dict[str, Any]:
    """A models-file entry for the fake worker (backend `command`)."""
    command = [sys.executable, FAKE_WORKER, "--port", "{port}", *args]
    if events is not None:
        command += ["--events", str(events)]
    return {"id": model_id, "backend": "command", "command": command, **fields}


class Gateway:
    """`python -m modelhost serve` in a subprocess, stopped (and checked) at teardown."""

    def __init__(self, tmp: Path, models: list[dict[str, Any]] | None = None,
                 include_builtin: bool = False, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "modelhost", "serve", "--port", str(self.port)]
        if models is not None or not include_builtin:
            config = tmp / "models.yaml"
            config.write_text(yaml.safe_dump(
                {"include_builtin": include_builtin, "models": models or []}))
            args += ["--config", str(config)]
        self.log = tmp / "gateway.out"
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("MODELHOST_", "OPENAI_API_KEYS", "LAZY_LOAD"))}
        full_env.update({"MODELHOST_DATA_DIR": str(tmp / "data"), "HF_HUB_OFFLINE": "1",
                         "MODELHOST_STOP_TIMEOUT": "5", **(env or {})})
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(args, env=full_env, stdout=out,
                                         stderr=subprocess.STDOUT)
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway not healthy in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def model(self, model_id: str, key: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        resp = httpx.get(f"{self.url}/v1/models/{model_id}", headers=headers, timeout=5)
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    def wait_state(self, model_id: str, state: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        card = self.model(model_id)
        while card["state"] != state:
            if time.monotonic() > deadline:
                raise AssertionError(f"{model_id} is {card['state']}, not {state}: {card}")
            time.sleep(0.1)
            card = self.model(model_id)
        return card

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def describe_process(pid: int, parents: int = 1) -> str:
    """State, parent, group and command line of a process and of its first `parents`
    ancestors (Linux), for failure messages."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, IndexError):
        return f"pid {pid}: no /proc entry"
    state, ppid, pgid = fields[0], int(fields[1]), int(fields[2])
    return (f"pid {pid} state {state} ppid {ppid} pgid {pgid}: {cmdline.strip()}; "
            f"parent: {describe_process(ppid, parents - 1) if parents and ppid > 1 else ppid}")


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def started_pids(events: Path) -> list[int]:
    if not events.exists():
        return []
    return [int(line.split()[1]) for line in events.read_text().splitlines()
            if line.startswith("started ")]


def wait_for(predicate: Any, timeout: float = 10, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    started: list[Gateway] = []

    def make(models: list[dict[str, Any]] | None = None, **kwargs: Any) -> Gateway:
        sub = tmp_path / f"gw{len(started)}"
        sub.mkdir()
        gw = Gateway(sub, models, **kwargs)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()
