"""Supervision of one worker process: spawn, readiness probe, output capture, stop.

A `WorkerProcess` is one run of a worker; a restart is a new `WorkerProcess`. Restart policy
lives with the model's owner (`registry.model`); where a worker runs, with its launcher
(`workers.launchers`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from modelhost.upstream import UpstreamClient

log = logging.getLogger(__name__)

OUTPUT_LINES = 400
LOG_FILE_BYTES = 10 * 1024 * 1024
PROBE_TIMEOUT = 5.0  # seconds one readiness probe may take in all


@dataclass
class LaunchPlan:
    """What to run for a worker: the command, its environment, and how to probe it."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    probe_path: str = "/v1/models"


class BackendConfigError(Exception):
    """A model spec that cannot be turned into a worker command line."""


class WorkerStartError(Exception):
    """The worker exited or did not answer its probe in time; the message says which.

    `permanent` when retrying cannot help (the command cannot be executed at all).
    """

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


# Exit statuses of the shim when the worker's command cannot be executed (as in a shell).
CANNOT_EXECUTE = (126, 127)


# What a worker inherits from the gateway's environment: an allow-list (docs/operations.md).
# Everything else (the gateway's keys and settings, cloud credentials, tokens) stays with the
# gateway; a worker that needs a token gets it through its launch plan, and a model's `env`
# adds what the operator declares.
WORKER_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP",
    "TMP", "TERM", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME",
    "VIRTUAL_ENV", "CONDA_PREFIX", "HF_HOME", "HF_ENDPOINT", "HF_HUB_CACHE",
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "CUDA_HOME", "CUDA_PATH", "NUMBA_CACHE_DIR",
    "TOKENIZERS_PARALLELISM", "SENTENCE_TRANSFORMERS_HOME", "XLA_FLAGS", "TRITON_CACHE_DIR",
})
WORKER_ENV_PREFIXES = (
    "LC_", "XDG_", "CUDA_", "NVIDIA_", "NCCL_", "CUBLAS_", "CUDNN_", "HF_HUB_",
    "TRANSFORMERS_", "TORCH_", "TORCHINDUCTOR_", "PYTORCH_", "VLLM_", "OMP_", "MKL_",
    "OPENBLAS_", "KMP_", "GGML_", "LLAMA_", "CT2_", "ONNXRUNTIME_", "ORT_",
)
# Never inherited, even under an allowed prefix: a name with one of these words holds a secret.
WORKER_ENV_SECRET = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|KEY|APIKEY|CREDENTIALS?|AUTH)(_|$)")


def inherited(name: str) -> bool:
    """Whether a worker inherits the gateway's variable `name`."""
    upper = name.upper()
    if WORKER_ENV_SECRET.search(upper) or upper.startswith("MODELHOST_"):
        return False
    return name in WORKER_ENV_NAMES or upper.startswith(WORKER_ENV_PREFIXES)


def worker_environment(extra: dict[str, str]) -> dict[str, str]:
    """The gateway's allowed variables (`inherited`), then the launch plan's and the model's
    `env` (`extra`), which may set anything."""
    env = {k: v for k, v in os.environ.items() if inherited(k)}
    env.update(extra)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` (an IPv4 or IPv6 address, or a name), for a worker to bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host.strip("[]"), 0))
        return int(sock.getsockname()[1])


def url_host(host: str) -> str:
    """`host` as the host part of a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class WorkerProcess:
    def __init__(self, name: str, plan: LaunchPlan, host: str, port: int,
                 log_file: Path | None, stop_timeout: float,
                 log_bytes: int = LOG_FILE_BYTES, log_backups: int = 3) -> None:
        self.name = name
        self.plan = plan
        self.host = host
        self.port = port
        self.base_url = f"http://{url_host(host)}:{port}"
        self.log_file = log_file
        self.stop_timeout = stop_timeout
        self.log_bytes = log_bytes
        self.log_backups = log_backups
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self.started_at = 0.0
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.output)[-lines:])

    async def start(self) -> None:
        env = worker_environment({**self.plan.env, "MODELHOST_SHIM_PARENT": str(os.getpid()),
                                  "PYTHONUNBUFFERED": "1"})
        argv = [sys.executable, "-m", "modelhost.workers.shim", str(self.stop_timeout), "--",
                *self.plan.argv]
        log.info("starting worker %s on port %d: %s", self.name, self.port,
                 " ".join(self.plan.argv))
        self.started_at = time.monotonic()
        self._proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a stop reaches every child
        )
        self._pump = asyncio.create_task(self._read_output(), name=f"output:{self.name}")

    async def _read_output(self) -> None:
        """Keep the last lines in memory and append everything to the log file, which
        rotates while the worker runs: past `log_bytes` it becomes `<name>.log.1` (the older
        ones shift up to `.log.<log_backups>`, the oldest is deleted) and a new one starts."""
        assert self._proc is not None and self._proc.stdout is not None
        sink: BinaryIO | None = None
        written = 0
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                if self.log_file.stat().st_size >= self.log_bytes:
                    self._rotate()
            sink, written = self._open_log()
        try:
            async for raw in self._proc.stdout:
                if sink is not None:
                    try:
                        if written and written + len(raw) > self.log_bytes:
                            sink.close()
                            self._rotate()
                            sink, written = self._open_log()
                        sink.write(raw)
                        sink.flush()
                        written += len(raw)
                    except OSError as exc:  # a full disk must not stop the worker
                        log.warning("worker %s: cannot write its log file: %s", self.name, exc)
                        with contextlib.suppress(OSError):
                            sink.close()
                        sink = None
                self.output.append(raw.decode(errors="replace").rstrip())
        finally:
            if sink is not None:
                sink.close()

    def _open_log(self) -> tuple[BinaryIO, int]:
        assert self.log_file is not None
        sink = self.log_file.open("ab")
        return sink, sink.tell()

    def _rotate(self) -> None:
        """<log> -> <log>.1 -> ... -> <log>.<log_backups> (deleted past it)."""
        assert self.log_file is not None
        base = str(self.log_file)
        if self.log_backups <= 0:
            with contextlib.suppress(FileNotFoundError):
                self.log_file.unlink()
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{base}.{self.log_backups}")
        for n in range(self.log_backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{base}.{n}", f"{base}.{n + 1}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(base, f"{base}.1")

    async def wait_ready(self, timeout: float) -> None:
        """Poll the worker's probe until it answers 200, it exits, or `timeout` passes. Each
        probe may take `PROBE_TIMEOUT` seconds; a redirect is not followed (the worker's own
        path must answer)."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        delay = 0.05
        client = UpstreamClient()  # one for the whole wait: a probe reuses its connection
        try:
            while True:
                if self._proc.returncode is not None:
                    await self._drain()
                    code = self._proc.returncode
                    raise WorkerStartError(
                        f"worker exited with status {code} while starting" + self._tail_note(),
                        permanent=code in CANNOT_EXECUTE)
                with contextlib.suppress(OSError):  # not listening yet, or too slow
                    if await client.get_status(self.base_url, self.plan.probe_path,
                                               timeout=PROBE_TIMEOUT) == 200:
                        return
                if time.monotonic() > deadline:
                    raise WorkerStartError(
                        f"worker did not answer {self.plan.probe_path} within {timeout:g} s"
                        + self._tail_note())
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.5)
        finally:
            client.close()

    def _tail_note(self) -> str:
        tail = self.tail(8)
        return f"; last output:\n{tail}" if tail else ""

    async def wait(self) -> int:
        assert self._proc is not None
        code = await self._proc.wait()
        self._sweep_group()
        await self._drain()
        return code

    async def _drain(self) -> None:
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 2)

    def _sweep_group(self) -> None:
        # Whatever the worker left in its group after the shim exited.
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    async def stop(self) -> int | None:
        """SIGTERM (the shim forwards it to the group), then SIGKILL after the timeout."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                # The shim itself escalates after stop_timeout; allow it a little more.
                await asyncio.wait_for(proc.wait(), self.stop_timeout + 2)
            except TimeoutError:
                log.warning("worker %s ignored SIGTERM; killing its process group", self.name)
        self._sweep_group()
        code = await proc.wait()
        await self._drain()
        return code
