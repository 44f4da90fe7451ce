"""A real two-node Ray cluster on loopback, for tests/test_ray.py.

Each node is `ray start --block` in its own process group and temporary folder: the head on
127.0.0.2, others joining it on 127.0.0.3, ... (not 127.0.0.1: Ray rewrites that into the
machine's own address, and both nodes would claim the same one). A node declares its own
custom resource (`node_a`, `node_b`), one CPU, a small object store, no dashboard; every
port it would otherwise take at a fixed number (Ray Client's 10001, the dashboard's 8265,
the agent's 52365) is a free one, so that the cluster does not meet another on the machine.

`RayNode.kill()` kills a node the hard way (SIGKILL to every process it started: its
process group, and the worker processes its raylet started, which Ray puts in groups of
their own), as a machine that dies would; `LoopbackCluster.close()` kills them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from modelhost.workers.process import free_port

RAY = str(Path(sys.executable).with_name("ray"))
STARTED = "This command will now block forever"
START_TIMEOUT = 60.0


@dataclass
class RayNode:
    name: str
    ip: str
    process: subprocess.Popen[bytes]
    folder: Path
    output: Path
    resources: dict[str, float] = field(default_factory=dict)
    gpus: int = 0

    def descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return [psutil.Process(self.process.pid),
                    *psutil.Process(self.process.pid).children(recursive=True)]
        return []

    def kill(self) -> None:
        """SIGKILL every process of the node (as if its machine died)."""
        found = self.descendants()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for process in found:
            with contextlib.suppress(psutil.Error):
                process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        psutil.wait_procs(found, timeout=10)


@dataclass
class LoopbackCluster:
    head_port: int
    client_port: int  # Ray Client's server on the head (ray://127.0.0.2:PORT)
    nodes: list[RayNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.2:{self.head_port}"

    def start_node(self, name: str, ip: str, resources: dict[str, float], gpus: int = 0
                   ) -> RayNode:
        """A node declaring `resources` and `gpus` GPUs (declared, not detected: Ray
        assigns them to actors and sets their CUDA_VISIBLE_DEVICES all the same)."""
        folder = Path(tempfile.mkdtemp(prefix=f"mhray-{name}-"))  # short: socket paths
        argv = [RAY, "start", "--block", "--node-ip-address", ip,
                "--resources", json.dumps(resources), "--num-cpus", "1",
                "--num-gpus", str(gpus),
                "--object-store-memory", "100000000", "--disable-usage-stats",
                "--temp-dir", str(folder),
                "--dashboard-agent-listen-port", str(free_port(ip))]
        if not self.nodes:
            argv += ["--head", "--port", str(self.head_port), "--include-dashboard=false",
                     "--dashboard-port", str(free_port()),
                     "--ray-client-server-port", str(self.client_port)]
        else:
            argv += ["--address", self.address]
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
               "RAY_USAGE_STATS_ENABLED": "0"}
        output = folder / "ray-start.log"
        with output.open("wb") as sink:
            process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env,
                                       start_new_session=True)
        node = RayNode(name, ip, process, folder, output, resources, gpus)
        self.nodes.append(node)
        deadline = time.monotonic() + START_TIMEOUT
        while STARTED not in output.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                text = output.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"ray start for {name} on {ip} failed:\n{text}")
            time.sleep(0.2)
        return node

    def restart(self, node: RayNode) -> RayNode:
        """`node` started again (after it was killed), same name, address and resources,
        in a new folder; its old folder goes."""
        node.kill()
        shutil.rmtree(node.folder, ignore_errors=True)
        self.nodes.remove(node)
        return self.start_node(node.name, node.ip, node.resources, node.gpus)

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
            shutil.rmtree(node.folder, ignore_errors=True)
        self.nodes.clear()


def start_cluster() -> LoopbackCluster:
    """node_a (the head) on 127.0.0.2, node_b on 127.0.0.3 with two (declared) GPUs."""
    cluster = LoopbackCluster(head_port=free_port("127.0.0.2"),
                              client_port=free_port("127.0.0.2"))
    try:
        cluster.start_node("node_a", "127.0.0.2", {"node_a": 1})
        cluster.start_node("node_b", "127.0.0.3", {"node_b": 1}, gpus=2)
    except BaseException:
        cluster.close()
        raise
    return cluster


def drive_through_ray_client(address: str, log_dir: str) -> None:
    """A gateway off the cluster, through Ray Client (`ray://`): start a fake worker on
    node_b, send it a chat request, stop everything, and print what was seen as one JSON
    line. Run in a process of its own (`python -c`): a process drives one cluster only."""
    import asyncio

    import httpx

    from modelhost.config import ModelSpec
    from modelhost.workers.process import WorkerStartError
    from modelhost.workers.ray_launcher import RayCluster, RayLauncher, RayOptions
    from tests.conftest import FAKE_WORKER

    spec = ModelSpec.model_validate({
        "id": "through-client", "backend": "command",
        "command": [sys.executable, FAKE_WORKER, "--host", "{host}", "--port", "{port}"]})

    async def unreachable() -> dict[str, object]:
        """A cluster address where nothing listens: the start fails at once, and says so."""
        nowhere = RayCluster(RayOptions(address="ray://127.0.0.2:1"))
        started = time.monotonic()
        try:
            await RayLauncher(nowhere, Path(log_dir), 3.0).start(spec, None, [])
        except WorkerStartError as exc:
            return {"error": str(exc), "seconds": time.monotonic() - started}
        return {"error": None}

    async def drive() -> dict[str, object]:
        seen = {"unreachable": await unreachable()}
        cluster = RayCluster(RayOptions(address=address, placement_timeout=10))
        await cluster.connect()
        try:
            worker = await RayLauncher(cluster, Path(log_dir), 3.0,
                                       resources={"node_b": 1}).start(spec, None, [])
            await worker.wait_ready(30)
            async with httpx.AsyncClient() as client:
                answer = await client.post(f"{worker.base_url}/chat/completions", json={
                    "model": "m", "messages": [{"role": "user", "content": "hi"}]})
            nodes = await cluster.gpus.sample()
            return {**seen, "base_url": worker.base_url, "status": answer.status_code,
                    "tail": await worker.fetch_tail(5), "nodes": [n.node_ip for n in nodes]}
        finally:
            await cluster.close()

    print(json.dumps(asyncio.run(drive())))
