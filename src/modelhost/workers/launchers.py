"""Where a worker runs: a launcher starts one and hands back a `Worker`, the running worker.

What a worker *is* (the command line that serves a spec) is `plans`; where it runs is a
launcher's, so that the model's owner (`registry.model.Model`) drives every worker the same
way, wherever it is (DESIGN §8):

* `LocalProcessLauncher`: a child process on a free port of this machine, supervised by
  `process.WorkerProcess` (today's workers: vLLM, llama.cpp, modelhost's own apps, commands).
  It listens on loopback unless `MODELHOST_WORKER_HOST` says otherwise (gateways on other
  machines relaying to it: its `advertised_url` is where they reach it).
* `RemoteLauncher`: an OpenAI-compatible server that already runs at a URL (`remote`
  backend). Nothing is started or stopped; "ready" means `GET <url>/models` answered 200,
  asked with the gateway's own HTTP client (`modelhost.upstream`, the relay's). A remote
  added through the admin API is held to `admin_policy` at every launch, and the relay then
  connects only to the addresses checked (`Worker.connect_to`, against DNS rebinding).
* A launcher for workers on other machines (a Ray cluster, issue 18) plugs in the same way:
  it places and starts the worker there and returns a `Worker` whose `base_url` reaches it
  and whose `wait()` returns when it dies (`watched`).

A launch has two steps, so that the owner holds the worker (and can stop it, and the GPU
scheduler can measure its memory) while it comes up: `start()` returns the `Worker` once
spawned, `Worker.wait_ready()` returns once it answers.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from modelhost.admin_policy import RemotePolicy, RemoteRefused
from modelhost.config import ModelSpec, UrlSource
from modelhost.redaction import redact_url
from modelhost.upstream import UpstreamClient
from modelhost.workers.plans import launch_plan
from modelhost.workers.process import (
    WorkerProcess,
    WorkerStartError,
    free_port,
    url_host,
)

LOOPBACK = "127.0.0.1"
PROBE_TIMEOUT = 10.0  # a remote server's readiness probe, in all



def worker_log(log_dir: Path, model_id: str, replica: int = 0) -> Path:
    """The file a worker of `model_id` writes its output to (rotated by size); each replica
    past the first (`replicas: N`) has its own, `<id>.r<N>.log`."""
    safe = model_id.replace("/", "__").replace(":", "_")
    return log_dir / "workers" / (f"{safe}.log" if replica == 0 else f"{safe}.r{replica}.log")

class Worker(Protocol):
    """A running worker, wherever it runs."""

    @property
    def base_url(self) -> str:
        """Where the relay sends requests: the OpenAI API's base URL (ending in /v1)."""

    @property
    def connect_to(self) -> tuple[str, ...] | None:
        """The addresses to connect to instead of resolving the URL's host (None: resolve)."""

    @property
    def pid(self) -> int | None:
        """Its process group leader on this machine (None: not a local process)."""

    @property
    def port(self) -> int | None: ...

    @property
    def started_at(self) -> float:
        """When it was started (monotonic clock)."""

    @property
    def watched(self) -> bool:
        """Whether `wait()` returns when the worker dies, so that a lost connection to it
        may mean a crash the owner restarts (False for a remote server)."""

    async def wait_ready(self, timeout: float) -> None:
        """Return once it answers; WorkerStartError if it does not within `timeout`."""

    async def wait(self) -> int:
        """Return its exit status once it has exited (never, for one not `watched`)."""

    async def stop(self) -> None: ...

    def tail(self, lines: int) -> str:
        """Its last lines of output ('' when there is none)."""


class Launcher(Protocol):
    async def start(self, spec: ModelSpec, weights: Path | None, gpus: list[int]) -> Worker:
        """Start a worker for `spec` (its weights at `weights`, on `gpus`); return it once
        started, before it is ready. WorkerStartError (or BackendConfigError, OSError)."""


# --------------------------------------------------------------------------- local process


class LocalWorker:
    """A worker process on this machine: `base_url` is where this gateway reaches it,
    `advertised_url` where other gateways do (the same unless the worker host is set)."""

    watched = True
    connect_to = None

    def __init__(self, process: WorkerProcess, advertised_host: str | None = None) -> None:
        self.process = process
        self.base_url = process.base_url + "/v1"
        self.advertised_url = self.base_url if advertised_host is None else \
            f"http://{url_host(advertised_host)}:{process.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def port(self) -> int | None:
        return self.process.port

    @property
    def started_at(self) -> float:
        return self.process.started_at

    async def wait_ready(self, timeout: float) -> None:
        await self.process.wait_ready(timeout)

    async def wait(self) -> int:
        return await self.process.wait()

    async def stop(self) -> None:
        await self.process.stop()

    def tail(self, lines: int) -> str:
        return self.process.tail(lines)


@dataclass(frozen=True)
class LocalProcessLauncher:
    """Workers as child processes on a free port (`process.WorkerProcess`) of `host`
    (loopback by default); `advertised_host` is where other gateways reach them (None: the
    same as this gateway)."""

    log_dir: Path
    stop_timeout: float
    hf_token: Callable[[], str | None]
    max_audio_seconds: float
    log_bytes: int
    log_backups: int
    host: str = LOOPBACK
    advertised_host: str | None = None
    replica: int = 0  # which replica of the model it starts (its log file)

    async def start(self, spec: ModelSpec, weights: Path | None, gpus: list[int]
                    ) -> LocalWorker:
        port = free_port(self.host)
        plan = launch_plan(spec, weights, self.host, port, gpus, self.hf_token(),
                           max_audio_seconds=self.max_audio_seconds)
        plan.env.update(spec.env)
        process = WorkerProcess(spec.id, plan, reach(self.host), port,
                                worker_log(self.log_dir, spec.id, self.replica),
                                self.stop_timeout,
                                log_bytes=self.log_bytes, log_backups=self.log_backups)
        await process.start()
        return LocalWorker(process, self.advertised_host)


def reach(host: str) -> str:
    """Where this machine reaches a server listening on `host`: loopback for every
    interface (0.0.0.0, ::), else `host` itself."""
    bare = host.strip("[]")
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:  # a name
        return bare
    if address.is_unspecified:
        return LOOPBACK if address.version == 4 else "::1"
    return bare


# --------------------------------------------------------------------------- remote server


class RemoteWorker:
    """An OpenAI-compatible server that runs elsewhere: routed to, never started."""

    watched = False
    pid = None
    port = None

    def __init__(self, source: UrlSource, connect_to: tuple[str, ...] | None,
                 client: UpstreamClient) -> None:
        self.source = source
        self.base_url = source.url
        self.connect_to = connect_to
        self.client = client
        self.started_at = time.monotonic()
        self._stopped = asyncio.Event()

    async def wait_ready(self, timeout: float) -> None:
        """GET <url>/models must answer 200 (a redirect is not followed: its status is the
        answer), at the addresses checked by the launch when there are some."""
        source = self.source
        shown = redact_url(source.url)
        base, credentials = _without_credentials(source.url)
        headers = {}
        if source.api_key:
            headers["Authorization"] = f"Bearer {source.api_key}"
        elif credentials is not None:  # credentials in the URL: basic auth
            headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        try:
            status = await self.client.get_status(base, "/models", headers,
                                                  timeout=min(timeout, PROBE_TIMEOUT),
                                                  connect_to=self.connect_to)
        except (OSError, ValueError) as exc:
            reason = type(exc).__name__ if not str(exc) or source.url in str(exc) \
                else str(exc)
            raise WorkerStartError(f"remote server {shown} unreachable: "
                                   f"{redact_url(reason)}") from exc
        if status != 200:
            raise WorkerStartError(f"remote server {shown} answered {status}")

    async def wait(self) -> int:
        await self._stopped.wait()
        return 0

    async def stop(self) -> None:
        self._stopped.set()  # only forgotten: the server is not ours

    def tail(self, lines: int) -> str:
        return ""


@dataclass(frozen=True)
class RemoteLauncher:
    """A `remote` model's server, checked against `policy` (None: a models-file remote,
    reached wherever its name resolves) at every launch: the name may resolve elsewhere
    by now."""

    client: UpstreamClient
    policy: RemotePolicy | None

    async def start(self, spec: ModelSpec, weights: Path | None, gpus: list[int]
                    ) -> RemoteWorker:
        source = spec.source
        assert isinstance(source, UrlSource)
        connect_to = None
        if self.policy is not None:
            try:
                checked = await self.policy.check(source.url)
            except RemoteRefused as exc:
                raise WorkerStartError(exc.message, permanent=True) from None
            # The relay connects to the addresses checked here, not to whatever the name
            # resolves to later (DNS rebinding); none when the name itself is allowed.
            connect_to = tuple(checked) if checked else None
        return RemoteWorker(source, connect_to, self.client)


def _without_credentials(url: str) -> tuple[str, bytes | None]:
    """The URL without its `user:password@`, and `user:password` (None when absent)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    credentials = f"{unquote(user)}:{unquote(password)}".encode()
    return urlunsplit(parts._replace(netloc=hostport)), credentials
