"""A worker's supervisor on a Ray node: the actor that spawns and watches one worker process.

`RayLauncher` (gateway side, `workers.ray_launcher`) creates one `WorkerSupervisor` actor per
worker, where Ray placed it. The actor does on its node what the gateway does on its own for a
local worker, with the same code (`process.WorkerProcess`, hence the shim):

* `reserve`: where the worker will listen (the node's address and a free port on it), the
  GPUs Ray gave the actor, and whether the worker's weights are there (the model cache must
  be at the gateway's path on every node; the worker's program too, checked by `spawn`).
* `spawn`, `wait_ready`: start the launch plan the gateway built for that address, and probe
  it on the node.
* `wait`: returns once the process has exited, with its status and last lines.
* `tail`, `ping`, `stop`.

The actor is the worker's parent: the shim's parent-death signal ties the worker to the
actor, and Ray ties an owned actor to the gateway (its owner), so no worker outlives either.

Methods answer plain data (`Reservation`, `Outcome`, tuples), never raise for a worker's own
failure: a Ray task error would wrap it, and the gateway would have to unwrap it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import ray

from modelhost.workers.process import (
    LaunchPlan,
    WorkerProcess,
    WorkerStartError,
    free_port,
)


@dataclass(frozen=True)
class Reservation:
    """Where the worker will run: the node, a free port on it, the GPUs Ray assigned."""

    node_id: str
    node_ip: str
    hostname: str
    port: int
    gpus: list[int]
    missing: list[str]  # paths the worker needs that this node does not have


@dataclass(frozen=True)
class Outcome:
    """How a step went: `error` is None on success; `permanent` when retrying cannot help."""

    error: str | None = None
    permanent: bool = False


class WorkerSupervisor:
    """One worker process on this node (wrapped by `ray.remote` in `workers.ray_launcher`)."""

    def __init__(self, name: str, stop_timeout: float, log_bytes: int,
                 log_backups: int) -> None:
        self.name = name
        self.stop_timeout = stop_timeout
        self.log_bytes = log_bytes
        self.log_backups = log_backups
        self.process: WorkerProcess | None = None
        self.port = 0
        self.host: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]

    async def reserve(self, needs: list[str]) -> Reservation:
        """The node's address, a free port on it and the actor's GPUs; `needs` are paths the
        worker reads (its weights, its interpreter) that must exist here."""
        context = ray.get_runtime_context()
        self.port = free_port(self.host)
        gpus = [int(g) for g in context.get_accelerator_ids().get("GPU", [])]
        missing = await asyncio.to_thread(lambda: [p for p in needs if not os.path.exists(p)])
        return Reservation(node_id=context.get_node_id(), node_ip=self.host,
                           hostname=socket.gethostname(), port=self.port, gpus=gpus,
                           missing=missing)

    async def spawn(self, plan: LaunchPlan, log_file: str | None) -> Outcome:
        """Start the worker (`plan`, built by the gateway for `reserve`'s address)."""
        command = plan.argv[0] if plan.argv else ""
        if os.path.isabs(command) and not await asyncio.to_thread(os.path.exists, command):
            return Outcome(f"node {self.host} lacks {command}: every node needs the workers' "
                           f"programs at the gateway's paths", permanent=True)
        sink = Path(log_file) if log_file else None
        if sink is not None:
            try:
                sink.parent.mkdir(parents=True, exist_ok=True)
            except OSError:  # a log directory the node cannot write: the tail is kept anyway
                sink = None
        self.process = WorkerProcess(self.name, plan, self.host, self.port, sink,
                                     self.stop_timeout, log_bytes=self.log_bytes,
                                     log_backups=self.log_backups)
        try:
            await self.process.start()
        except OSError as exc:
            return Outcome(f"cannot start the worker on {self.host}: {exc}", permanent=True)
        return Outcome()

    async def wait_ready(self, timeout: float) -> Outcome:
        assert self.process is not None
        try:
            await self.process.wait_ready(timeout)
        except WorkerStartError as exc:
            return Outcome(str(exc), exc.permanent)
        return Outcome()

    async def wait(self) -> tuple[int, str]:
        """Once the worker has exited: its exit status and its last lines."""
        assert self.process is not None
        code = await self.process.wait()
        return code, self.process.tail(20)

    async def tail(self, lines: int) -> str:
        return self.process.tail(lines) if self.process is not None else ""

    async def ping(self) -> int | None:
        """The worker's pid on its node while it runs (None once it has exited)."""
        process = self.process
        if process is None or process.returncode is not None:
            return None
        return process.pid

    async def stop(self) -> int | None:
        """Stop the worker (SIGTERM to its group, SIGKILL after the stop timeout)."""
        if self.process is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            return await self.process.stop()
        return None
