"""The GPUs of every node of a Ray cluster, measured on the node (NVML, `gpu.inventory`).

One `GpuProbe` actor per live node, pinned to it (node affinity, no CPU reserved), keeps NVML
open there and answers `read()`; `ClusterGpus` (gateway side) keeps one probe per node,
makes one for a node that joined, drops those of nodes that left, and asks them all at once.
A node without NVIDIA GPU (or driver) answers no GPU and the reason, as the gateway's own
monitor does; a node that does not answer within the timeout is reported unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from modelhost.gpu.inventory import GpuMonitor, GpuSample


@dataclass(frozen=True)
class NodeGpus:
    """One node's GPUs as measured there (`gpus` empty: `reason` says why)."""

    node_id: str
    node_ip: str
    hostname: str = ""
    gpus: list[GpuSample] = field(default_factory=list)
    reason: str | None = None  # no GPU ("no NVIDIA driver ..."), or the node did not answer
    resources: dict[str, float] = field(default_factory=dict)  # what the node declares


class GpuProbe:
    """NVML on one node (wrapped by `ray.remote` below)."""

    def __init__(self) -> None:
        self.monitor = GpuMonitor()
        self.monitor.start()

    async def read(self) -> tuple[str, list[GpuSample], str | None]:
        """This node's hostname, its GPUs now, and why there are none."""
        if not self.monitor.available:
            self.monitor.start()  # a driver loaded since: try again
        samples = await self.monitor.sample_now()
        return socket.gethostname(), samples, self.monitor.unavailable_reason


RemoteProbe = ray.remote(GpuProbe)


class ClusterGpus:
    """The gateway's view of every node's GPUs (one probe actor per live node)."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._probes: dict[str, Any] = {}  # node id -> the actor handle of its probe

    async def sample(self) -> list[NodeGpus]:
        """Every live node's GPUs, measured there now."""
        nodes = [n for n in await asyncio.wait_for(asyncio.to_thread(ray.nodes), self.timeout)
                 if n.get("Alive")]
        alive = {str(n["NodeID"]) for n in nodes}
        for gone in set(self._probes) - alive:
            await self._drop(gone)
        readings = await asyncio.gather(*(self._read(n) for n in nodes))
        return sorted(readings, key=lambda r: r.node_ip)

    async def _read(self, node: dict[str, Any]) -> NodeGpus:
        node_id, ip = str(node["NodeID"]), str(node["NodeManagerAddress"])
        resources = {str(k): float(v) for k, v in dict(node.get("Resources", {})).items()}
        probe: Any = self._probes.get(node_id)
        if probe is None:
            probe = self._probes[node_id] = RemoteProbe.options(
                num_cpus=0, max_restarts=0, name=None,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote()
        try:
            hostname, gpus, reason = await asyncio.wait_for(_result(probe.read.remote()),
                                                            self.timeout)
        except (TimeoutError, ValueError, ConnectionError, ray.exceptions.RayError) as exc:
            await self._drop(node_id)  # made again at the next reading
            return NodeGpus(node_id, ip, reason=f"the node did not answer: "
                                                 f"{type(exc).__name__}", resources=resources)
        return NodeGpus(node_id, ip, str(hostname), list(gpus), reason, resources)

    async def _drop(self, node_id: str) -> None:
        probe = self._probes.pop(node_id, None)
        if probe is not None:
            # In a thread, bounded: with the head gone, the call hangs.
            with contextlib.suppress(TimeoutError, ValueError, ConnectionError,
                                     ray.exceptions.RayError):
                await asyncio.wait_for(asyncio.to_thread(ray.kill, probe, no_restart=True),
                                       self.timeout)

    async def close(self) -> None:
        for node_id in list(self._probes):
            await self._drop(node_id)


async def _result(ref: Any) -> Any:
    return await ref
