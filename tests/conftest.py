"""Test fixtures: a real `modelhost serve` process on a free loopback port.

Like vLLM's RemoteOpenAIServer: tests drive the gateway over real HTTP, with the official
`openai` client where it applies, and the workers are real processes.

What a test module reaches for:
- `gateway_factory` (one test) and `module_gateway_factory` (a module's shared gateway):
  `Gateway`s started on demand, all stopped at the end of the test or the module. A module
  that serves every test from one gateway writes
  `def gateway(module_gateway_factory): return module_gateway_factory(...)` with its scope.
  A module-scoped fixture with params uses `with gateways(folder) as make:` instead, so that
  each param's gateway stops before the next one starts.
- `openai_client(gateway_or_url)`: the official client on its /v1, without retries.
  (A worker app tested on its own, without a gateway: tests/workerapp.py.)
- `fake_model(...)`: a models-file entry for the fake worker (tests/fake_worker.py), which
  the gateway starts; `upstream_server(script, ...)`: a fake worker or big upstream that the
  test starts itself, for a `remote` model.
- process helpers: `pid_alive`, `wait_gone`, `describe_process`, `started_pids`, `wait_for`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
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
        try:
            self._wait_healthy()
        except BaseException:  # not handed to a factory yet: nobody else would stop it
            self.stop()
            raise

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

    def admin_card(self, model_id: str, key: str | None = None) -> dict[str, Any]:
        """The admin API's card of a model (usage, worker pid...)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        resp = httpx.get(f"{self.url}/api/admin/models/{model_id}", headers=headers,
                         timeout=10)
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


def openai_client(target: Gateway | str, api_key: str = "x",
                  timeout: float | openai.Timeout = openai.DEFAULT_TIMEOUT) -> openai.OpenAI:
    """The official client on a gateway's (or a worker's URL's) /v1, without retries: a
    failure shows at once. Use it as a context manager so its connections are closed."""
    url = target.url if isinstance(target, Gateway) else target
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0,
                         timeout=timeout)


@dataclass
class UpstreamServer:
    """A stand-in OpenAI-compatible server running as a real process (see `upstream_server`)."""

    port: int
    url: str  # http://127.0.0.1:<port>, without /v1
    proc: subprocess.Popen[bytes]


@contextmanager
def upstream_server(script: str, *args: str, api_key: str | None = None,
                    timeout: float = 20) -> Iterator[UpstreamServer]:
    """`python <script> --port <free port> [--api-key K] <args>` (tests/fake_worker.py,
    tests/big_upstream.py): a server for a `remote` model or a fault test, a real process on
    loopback. Handed over once `GET /v1/models` answers 200 (with `api_key` as bearer);
    terminated on leaving."""
    port = free_port()
    argv = [sys.executable, script, "--port", str(port), *args]
    headers = {}
    if api_key is not None:
        argv += ["--api-key", api_key]
        headers["Authorization"] = f"Bearer {api_key}"
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/v1/models", headers=headers, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    proc = subprocess.Popen(argv)
    try:
        assert wait_for(up, timeout), f"{script} did not answer in {timeout} s"
        yield UpstreamServer(port, url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pid_alive(pid: int) -> bool:
    """Whether `pid` still runs: not absent, not a zombie waiting to be reaped, not a pid
    already reused by another user's process (PermissionError)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        # Gone between the two looks, or no /proc on this system (then it runs).
        return not Path("/proc/self").exists()
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X", "x")


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
    """Whether `pid` stops running within `timeout` seconds."""
    return wait_for(lambda: not pid_alive(pid), timeout, interval=0.02)


@contextmanager
def constant_load(url: str, body: dict[str, Any], clients: int = 4
                  ) -> Iterator[tuple[list[str], list[int]]]:
    """`clients` threads POSTing `body` to `url`, one request after another, until the
    block ends; yields the failures (any answer but a 200, any HTTP error) and the list of
    requests done (its length)."""
    failures: list[str] = []
    done: list[int] = []
    stop = threading.Event()

    def client(index: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                try:
                    resp = http.post(url, json=body)
                    if resp.status_code != 200:
                        failures.append(f"client {index}: {resp.status_code} {resp.text}")
                    done.append(1)
                except httpx.HTTPError as exc:
                    failures.append(f"client {index}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield failures, done
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)


def started_pids(events: Path) -> list[int]:
    if not events.exists():
        return []
    return [int(line.split()[1]) for line in events.read_text().splitlines()
            if line.startswith("started ")]


def wait_for(predicate: Callable[..., object], timeout: float = 10,
             interval: float = 0.05) -> bool:
    """Whether `predicate()` becomes true within `timeout` seconds (asked once more at the
    end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


GatewayFactory = Callable[..., Gateway]
"""`factory(models=None, include_builtin=False, env=None)`: a started `Gateway`."""


@contextmanager
def gateways(folder: Path) -> Iterator[GatewayFactory]:
    """A factory of gateways, each in its own subfolder of `folder`; every gateway it
    started is stopped on leaving."""
    started: list[Gateway] = []

    def make(models: list[dict[str, Any]] | None = None, **kwargs: Any) -> Gateway:
        sub = folder / f"gw{len(started)}"
        sub.mkdir()
        gw = Gateway(sub, models, **kwargs)
        started.append(gw)
        return gw

    try:
        yield make
    finally:
        for gw in started:
            gw.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Gateways for one test, stopped when it ends."""
    with gateways(tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def module_gateway_factory(tmp_path_factory: pytest.TempPathFactory
                           ) -> Iterator[GatewayFactory]:
    """Gateways shared by a module's tests (through its own module-scoped fixture), stopped
    when the module is done."""
    with gateways(tmp_path_factory.mktemp("gateways")) as make:
        yield make


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A PostgreSQL server of the test module's own, on loopback, torn down after it
    (`tests/postgres.py`); skipped, saying why, where one cannot run."""
    from tests.postgres import missing, postgres_server

    if (why := missing()) is not None:
        pytest.skip(why)
    with postgres_server() as url:
        yield url


# Parallel runs (pytest-xdist): how many workers, and which tests go together
# (tests/parallel.py, docs/testing.md).

@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """A whole-suite run (no paths named) runs on `parallel.WORKERS` xdist workers unless
    `-n` says otherwise; `-n 0`, `-p no:xdist` or `--pdb` keep it in one process. Tests are
    handed out by module (`--dist loadfile`, with `parallel.ModuleScheduling`)."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    from tests import parallel

    option = config.option
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    if option.numprocesses is None and not option.usepdb and whole_suite:
        option.numprocesses = parallel.WORKERS
    if option.numprocesses and option.dist == "no":
        option.dist = "loadfile"


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """By module (`--dist loadfile`, the default here, or `loadgroup`): modules that must
    not overlap together, the longest first (tests/parallel.py). Other `--dist` modes are
    xdist's own."""
    if config.option.dist not in ("loadfile", "loadgroup"):
        return None
    from tests import parallel

    return parallel.ModuleScheduling(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On an xdist worker, a lone surrogate in a test's captured output (test_logs logs one
    on purpose) is written as its escape: the worker sends reports to the controller in
    UTF-8, which has no lone surrogates, and would otherwise crash."""
    report = yield
    if hasattr(item.config, "workerinput"):
        report.sections = [(name, text.encode("utf-8", "backslashreplace").decode())
                           for name, text in report.sections]
    return report
