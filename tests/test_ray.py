"""Workers on a real Ray cluster (workers/ray_launcher.py): two nodes on loopback
(tests/ray_cluster.py), node_a (the head, 127.0.0.2) and node_b (127.0.0.3), each declaring
its own resource. The test process is the gateway: it connects to the head as a driver.

A worker asked on node_b by resource runs there (its process is one of node_b's, it listens
on 127.0.0.3 only, and a chat request to its address is answered), its log tail is read from
its node, and stopping it ends its process; a worker that crashes reports its status and last
lines; a reservation no node can make fails with what was asked; every node's GPUs are read
on the node; and when node_b is killed, a model (its real owner) whose worker ran there sees it lost
within seconds and is started again on node_a. The last test kills node_b: it runs last.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from modelhost.catalog import BUILTIN_MODELS, local_weights
from modelhost.config import ModelSpec
from modelhost.gpu.inventory import GpuMonitor
from modelhost.gpu.scheduler import Scheduler
from modelhost.registry.lifecycle import State
from modelhost.registry.model import Model, ModelContext
from tests.conftest import (
    FAKE_WORKER,
    GatewayFactory,
    constant_load,
    fake_model,
    pid_alive,
    started_pids,
    wait_for,
    wait_gone,
)
from tests.test_llamacpp import QUESTION

ray = pytest.importorskip("ray", reason="ray is not installed (pip install '.[ray]')")

from modelhost.workers.launchers import Launcher, Worker  # noqa: E402
from modelhost.workers.process import WorkerStartError  # noqa: E402
from modelhost.workers.ray_launcher import (  # noqa: E402
    RayCluster,
    RayLauncher,
    RayOptions,
    RayWorker,
)
from tests.ray_cluster import LoopbackCluster, start_cluster  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    started = start_cluster()
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module: the driver's Ray connection outlives each test."""
    running = asyncio.new_event_loop()
    yield running
    running.close()


@pytest.fixture(scope="module")
def ray_cluster(cluster: LoopbackCluster, loop: asyncio.AbstractEventLoop
                ) -> Iterator[RayCluster]:
    options = RayOptions(address=cluster.address, node_ip="127.0.0.2",
                         placement_timeout=3.0, heartbeat=0.5, lost_after=3.0)
    connected = RayCluster(options)
    loop.run_until_complete(connected.connect())
    try:
        yield connected
    finally:
        loop.run_until_complete(connected.close())


def launcher(ray_cluster: RayCluster, tmp_path: Path, **resources: float) -> RayLauncher:
    made = RayLauncher(ray_cluster, tmp_path / "logs", stop_timeout=3.0, resources=resources)
    _: Launcher = made  # what a model's owner drives (mypy checks the interface)
    return made


def fake_spec(model_id: str, events: Path) -> ModelSpec:
    return ModelSpec.model_validate({
        "id": model_id, "backend": "command",
        "command": [sys.executable, FAKE_WORKER, "--host", "{host}", "--port", "{port}",
                    "--events", str(events)]})


def chat(base_url: str, **fake: Any) -> httpx.Response:
    return httpx.post(f"{base_url}/chat/completions", timeout=10, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "fake": fake})


def worker_pid(events: Path) -> int:
    return int(events.read_text().split("started ")[1].split()[0])


def node_pids(cluster: LoopbackCluster, name: str) -> set[int]:
    node = next(n for n in cluster.nodes if n.name == name)
    return {p.pid for p in node.descendants()}


def fake_workers(cluster: LoopbackCluster, name: str) -> list[int]:
    """The fake workers running on node `name`."""
    node = next(n for n in cluster.nodes if n.name == name)
    found = []
    for process in node.descendants():
        with contextlib.suppress(psutil.Error):
            if FAKE_WORKER in process.cmdline() and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
    return found


def test_worker_runs_on_the_node_with_its_resource(
        cluster: LoopbackCluster, ray_cluster: RayCluster, loop: asyncio.AbstractEventLoop,
        tmp_path: Path) -> None:
    events = tmp_path / "events"
    start = launcher(ray_cluster, tmp_path, node_b=1).start(fake_spec("b", events), None, [])
    worker = loop.run_until_complete(start)
    _: Worker = worker  # the interface of every running worker (mypy checks it)
    loop.run_until_complete(worker.wait_ready(30))

    # Its address is node_b's, and it listens there only.
    assert worker.node_ip == "127.0.0.3"
    assert worker.base_url == f"http://127.0.0.3:{worker.port}/v1"
    answer = chat(worker.base_url)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "word0 word1 word2"
    with pytest.raises(httpx.ConnectError):
        chat(f"http://127.0.0.2:{worker.port}/v1")
    # Its process is one of node_b's (below its raylet), not the gateway's.
    pid = worker_pid(events)
    assert pid in node_pids(cluster, "node_b")
    assert pid not in node_pids(cluster, "node_a")
    assert psutil.Process(pid).ppid() != psutil.Process().pid

    # Its log, read from its node.
    tail = loop.run_until_complete(worker.fetch_tail(20))
    assert f"fake worker starting on 127.0.0.3:{worker.port}" in tail
    assert worker.tail(20) == tail
    assert worker in ray_cluster.workers

    loop.run_until_complete(worker.stop())
    assert wait_gone(pid, 10), "the worker outlived its stop"
    assert worker not in ray_cluster.workers
    loop.run_until_complete(worker.stop())  # idempotent


def test_builtin_chat_model_on_node_b(
        ray_cluster: RayCluster, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    """The built-in SmolLM2 in a real llama.cpp worker: its launch plan (plans.launch_plan)
    built for node_b's address, its weights found there at the gateway's path."""
    if importlib.util.find_spec("llama_cpp") is None:  # not imported: it opens /dev/null
        pytest.skip("llama-cpp-python is not installed")
    spec = next(m for m in BUILTIN_MODELS if m.id == "smollm2-135m")
    weights = local_weights(spec, tmp_path)
    worker = loop.run_until_complete(
        launcher(ray_cluster, tmp_path, node_b=1).start(spec, weights, []))
    try:
        loop.run_until_complete(worker.wait_ready(60))
        assert worker.node_ip == "127.0.0.3"
        with openai.OpenAI(base_url=worker.base_url, api_key="none", max_retries=0,
                           timeout=60) as client:
            completion = client.chat.completions.create(
                model="smollm2-135m", messages=QUESTION, temperature=0, max_tokens=8)
        assert "Paris" in (completion.choices[0].message.content or "")
        assert "llama" in loop.run_until_complete(worker.fetch_tail(50)).lower()
    finally:
        loop.run_until_complete(worker.stop())


def test_closing_the_cluster_stops_every_worker(
        cluster: LoopbackCluster, ray_cluster: RayCluster, loop: asyncio.AbstractEventLoop,
        tmp_path: Path) -> None:
    """The gateway stops: every worker it started, on every node, stops with it."""
    other = RayCluster(ray_cluster.options)  # the same connection (ray.init is per process)
    loop.run_until_complete(other.connect())
    pids = []
    for node in ("node_a", "node_b"):
        events = tmp_path / f"events-{node}"
        worker = loop.run_until_complete(RayLauncher(
            other, tmp_path, stop_timeout=3.0, resources={node: 1},
        ).start(fake_spec(f"all-{node}", events), None, []))
        loop.run_until_complete(worker.wait_ready(30))
        pids.append(worker_pid(events))
        assert pids[-1] in node_pids(cluster, node)
    assert len(other.workers) == 2
    loop.run_until_complete(other.close())
    assert not other.workers
    for pid in pids:
        assert wait_gone(pid, 10)
    assert ray.is_initialized()  # the connection was not this one's to close


def test_a_gateway_off_the_cluster_through_ray_client(
        cluster: LoopbackCluster, tmp_path: Path) -> None:
    """MODELHOST_RAY_ADDRESS=ray://HEAD:PORT: a gateway on no node of the cluster drives it
    through Ray Client, the same way (in a process of its own: one cluster per process)."""
    code = (f"from tests.ray_cluster import drive_through_ray_client; "
            f"drive_through_ray_client('ray://127.0.0.2:{cluster.client_port}', "
            f"{str(tmp_path)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=100, cwd=Path(__file__).parent.parent)
    # Ray Client's server logs why it could not serve the gateway on the head node only.
    server_logs = "".join(f"\n--- {p.name}:\n{p.read_text(errors='replace')[-2000:]}"
                          for p in cluster.nodes[0].folder.glob("session_*/logs/ray_client*"))
    assert done.returncode == 0, done.stderr[-3000:] + server_logs
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["base_url"].startswith("http://127.0.0.3:")
    assert seen["status"] == 200
    assert "fake worker starting on 127.0.0.3" in seen["tail"]
    assert seen["nodes"] == ["127.0.0.2", "127.0.0.3"]
    unreachable = seen["unreachable"]
    assert unreachable["error"].startswith(
        "the Ray cluster at ray://127.0.0.2:1 is unreachable: "), unreachable
    assert unreachable["seconds"] < 5
    assert not fake_workers(cluster, "node_b")  # stopped by that gateway's close


def test_a_failed_initialization_by_ray_clients_server_is_tried_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Client's server answered but could not start the process that serves this gateway
    (ConnectionAbortedError, "Initialization failure from server"): tried again, up to
    CONNECT_ATTEMPTS in all; another error is not retried. (ray.init stands in here: that
    failure cannot be caused on purpose on a real cluster.)"""
    from modelhost.workers import ray_launcher

    calls: list[str] = []
    outcomes: list[BaseException | None] = []

    def init(**kwargs: Any) -> None:
        calls.append(kwargs["address"])
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    async def reachable(address: str) -> None:
        return None

    monkeypatch.setattr(ray, "init", init)  # the module ray_launcher calls
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_launcher, "_reachable", reachable)
    monkeypatch.setattr(ray_launcher, "CONNECT_RETRY_S", 0.0)
    aborted = ConnectionAbortedError("Initialization failure from server:\nTraceback ...")

    def connect() -> None:
        asyncio.run(RayCluster(RayOptions(address="ray://10.0.0.1:10001")).connect())

    outcomes[:] = [aborted, aborted, None]
    connect()
    assert calls == ["ray://10.0.0.1:10001"] * 3
    calls.clear()
    outcomes[:] = [aborted, aborted, aborted]
    with pytest.raises(ConnectionAbortedError):
        connect()
    assert len(calls) == ray_launcher.CONNECT_ATTEMPTS == 3
    calls.clear()
    outcomes[:] = [ValueError("a wrong namespace")]
    with pytest.raises(ValueError, match="a wrong namespace"):
        connect()
    assert len(calls) == 1


def test_tensor_parallel_worker_gets_the_gpus_of_one_node(
        ray_cluster: RayCluster, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    """A worker's GPUs are one bundle, on one node: a tensor-parallel worker on 2 GPUs goes
    to node_b (which declares two) and sees both in CUDA_VISIBLE_DEVICES; 3 GPUs, which no
    node has, fail with what was asked."""
    def spec(gpus: int) -> ModelSpec:
        return ModelSpec.model_validate({
            "id": f"tp{gpus}", "backend": "command", "gpu_count": gpus,
            "command": ["sh", "-c", "echo visible=$CUDA_VISIBLE_DEVICES; exec "
                        f"{sys.executable} {FAKE_WORKER} --host {{host}} --port {{port}}"]})

    ray_launcher = launcher(ray_cluster, tmp_path)
    assert ray_launcher.bundle(spec(2)) == {"CPU": 1.0, "GPU": 2.0}
    assert launcher(ray_cluster, tmp_path, a100=1).bundle(spec(2)) == \
        {"CPU": 1.0, "GPU": 2.0, "a100": 1.0}
    assert RayLauncher(ray_cluster, tmp_path, 3.0, num_cpus=4).bundle(spec(1)) == \
        {"CPU": 4.0, "GPU": 1.0}
    assert RayLauncher(ray_cluster, tmp_path, 3.0, num_cpus=0).bundle(spec(0)) == {}
    # Nothing to reserve: no placement group, Ray places the actor where it likes.
    light = loop.run_until_complete(
        RayLauncher(ray_cluster, tmp_path, 3.0, num_cpus=0).start(spec(0), None, []))
    try:
        loop.run_until_complete(light.wait_ready(30))
        assert light.group is None and light.gpus == []
        assert chat(light.base_url).status_code == 200
    finally:
        loop.run_until_complete(light.stop())
    worker = loop.run_until_complete(ray_launcher.start(spec(2), None, []))
    try:
        loop.run_until_complete(worker.wait_ready(30))
        assert (worker.node_ip, sorted(worker.gpus)) == ("127.0.0.3", [0, 1])
        tail = loop.run_until_complete(worker.fetch_tail(20))
        assert "visible=0,1" in tail or "visible=1,0" in tail, tail
        assert chat(worker.base_url).status_code == 200
    finally:
        loop.run_until_complete(worker.stop())
    with pytest.raises(WorkerStartError, match=r"reserve \{CPU: 1, GPU: 3\} within 3 s"):
        loop.run_until_complete(ray_launcher.start(spec(3), None, []))


def test_crash_reports_status_and_last_lines(
        ray_cluster: RayCluster, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    events = tmp_path / "events"
    worker = loop.run_until_complete(
        launcher(ray_cluster, tmp_path, node_b=1).start(fake_spec("c", events), None, []))
    loop.run_until_complete(worker.wait_ready(30))

    async def crash() -> int:
        exited = asyncio.ensure_future(worker.wait())
        with pytest.raises(httpx.HTTPError):
            await asyncio.to_thread(httpx.post, f"{worker.base_url}/chat/completions",
                                    json={"model": "m", "stream": True, "messages": [],
                                          "fake": {"crash_after": 1}}, timeout=10)
        return await asyncio.wait_for(exited, 15)

    assert loop.run_until_complete(crash()) == 17
    assert worker.exit_reason == "worker exited with status 17"
    assert "fake worker starting" in worker.tail(20)
    assert worker not in ray_cluster.workers  # its actor and reservation are released
    loop.run_until_complete(worker.stop())


def test_no_node_with_the_resources(
        ray_cluster: RayCluster, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(WorkerStartError) as info:
        loop.run_until_complete(launcher(ray_cluster, tmp_path, node_c=1).start(
            fake_spec("nowhere", tmp_path / "events"), None, []))
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "could reserve {CPU: 1, node_c: 1} within 3 s" in message
    assert "127.0.0.2 {CPU: 1, node_a: 1}" in message
    assert "127.0.0.3 {CPU: 1, GPU: 2, node_b: 1}" in message
    assert not info.value.permanent  # room may appear: the owner retries with backoff
    assert not (tmp_path / "events").exists()

    async def cancelled() -> None:  # an unload while waiting for room
        start = asyncio.ensure_future(launcher(ray_cluster, tmp_path, node_c=1).start(
            fake_spec("nowhere", tmp_path / "events"), None, []))
        await asyncio.sleep(1)
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start

    loop.run_until_complete(cancelled())
    groups = ray.util.placement_group_table().values()
    assert all(g["state"] == "REMOVED" for g in groups), groups  # none left reserved


def test_a_node_without_the_workers_files(
        ray_cluster: RayCluster, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    """Weights or a program missing at the gateway's path on the node: a permanent error that
    names the node and the path (nodes share the model cache, at the same path)."""
    ray_launcher = launcher(ray_cluster, tmp_path, node_b=1)
    with pytest.raises(WorkerStartError) as info:
        loop.run_until_complete(ray_launcher.start(
            fake_spec("w", tmp_path / "ev"), tmp_path / "no-weights.gguf", []))
    assert info.value.permanent
    assert str(info.value) == (
        f"node 127.0.0.3 ({socket.gethostname()}) lacks {tmp_path}/no-weights.gguf: every "
        "node needs the model cache at the gateway's path")
    missing = ModelSpec.model_validate({"id": "p", "backend": "command",
                                        "command": ["/nonexistent/engine", "{port}"]})
    with pytest.raises(WorkerStartError) as info:
        loop.run_until_complete(ray_launcher.start(missing, None, []))
    assert str(info.value).startswith("node 127.0.0.3 lacks /nonexistent/engine")
    assert info.value.permanent
    assert not ray_cluster.workers


def test_every_node_reports_its_gpus(
        ray_cluster: RayCluster, loop: asyncio.AbstractEventLoop) -> None:
    nodes = loop.run_until_complete(ray_cluster.gpus.sample())
    assert [n.node_ip for n in nodes] == ["127.0.0.2", "127.0.0.3"]
    for node, resource in zip(nodes, ["node_a", "node_b"], strict=True):
        assert node.resources[resource] == 1
        assert node.gpus == []  # this machine has none: each node says why
        assert node.reason, json.dumps(node.__dict__, default=str)
    again = loop.run_until_complete(ray_cluster.gpus.sample())  # probes are kept
    assert [n.reason for n in again] == [n.reason for n in nodes]


@dataclass(frozen=True)
class RayModelContext(ModelContext):
    """A model's context whose workers go to the Ray cluster. Until the registry chooses a
    launcher from the settings (issue 18's wiring), the test overrides the local one."""

    cluster: RayCluster | None = None

    def local_launcher(self, spec: ModelSpec | None = None, replica: int = 0) -> RayLauncher:
        assert self.cluster is not None
        return RayLauncher(self.cluster, self.log_dir, self.stop_timeout)


def alive_node_b(cluster: LoopbackCluster) -> None:
    """node_b, started again (same address and resources) if an earlier test killed it."""
    node_b = next(n for n in cluster.nodes if n.name == "node_b")
    if node_b.process.poll() is not None:
        cluster.restart(node_b)


async def _no_download(*args: Any) -> Path:
    raise AssertionError("nothing to download")


def test_node_death_restarts_the_model_elsewhere(
        cluster: LoopbackCluster, ray_cluster: RayCluster, loop: asyncio.AbstractEventLoop,
        tmp_path: Path) -> None:
    """A model (its real owner, `registry.model.Model`) whose worker runs on node_b, the only
    node with room; node_b dies: its worker is reported lost within seconds, the model goes
    to `starting`, and is ready again on node_a, where room was made meanwhile."""
    events = tmp_path / "events"
    ctx = RayModelContext(cache_dir=tmp_path / "cache", log_dir=tmp_path / "logs",
                          stop_timeout=3.0, download=_no_download, cluster=ray_cluster)
    model = Model(fake_spec("d", events), ctx, Scheduler(GpuMonitor(), {}))

    async def scenario() -> None:
        # node_a's one CPU is taken: the model's worker can only go to node_b.
        blocker = await launcher(ray_cluster, tmp_path, node_a=1).start(
            fake_spec("blocker", tmp_path / "blocker"), None, [])
        await blocker.wait_ready(30)
        await model.start()
        try:
            url = await model.ensure_ready(30)
            assert url.startswith("http://127.0.0.3:")
            assert (await asyncio.to_thread(chat, url)).status_code == 200
            worker = model.worker
            assert isinstance(worker, RayWorker)
            pid = worker_pid(events)
            await blocker.stop()  # room on node_a now

            node_b = next(n for n in cluster.nodes if n.name == "node_b")
            killed = time.monotonic()
            await asyncio.to_thread(node_b.kill)
            while model.state is State.ready:
                await asyncio.sleep(0.05)
            lost_after = time.monotonic() - killed
            assert lost_after < 8, f"node_b's death took {lost_after:.1f} s to be seen"
            assert worker.exit_reason is not None
            assert worker.exit_reason.startswith("Ray node 127.0.0.3")
            assert "[modelhost] Ray node 127.0.0.3" in worker.tail(5)
            assert not pid_alive(pid)
            assert model.state is State.starting
            assert model.last_error == worker.exit_reason  # the loss, said as such

            url = await model.ensure_ready(30)  # restarted by its owner, on node_a
            assert url.startswith("http://127.0.0.2:")
            assert model.restarts == 1
            assert (await asyncio.to_thread(chat, url)).status_code == 200
            assert len(started_pids(events)) == 2
            # A worker asked on node_b now waits for room there, and says so.
            with pytest.raises(WorkerStartError, match="node_b: 1"):
                await launcher(ray_cluster, tmp_path, node_b=1).start(
                    fake_spec("b2", tmp_path / "ev2"), None, [])
        finally:
            await model.close()
            await blocker.stop()
        assert not ray_cluster.workers
        assert wait_gone(started_pids(events)[-1], 10)

    loop.run_until_complete(scenario())


def test_a_gateway_runs_its_models_on_the_cluster(cluster: LoopbackCluster,
                                                  gateway_factory: GatewayFactory) -> None:
    """`modelhost serve` with MODELHOST_RAY_ADDRESS (here through Ray Client): a model whose
    `ray:` asks for node_b's resource has its worker on node_b, relayed to on 127.0.0.3; a
    model with `ray: false` stays a local process; unloading one stops its worker on the
    node, and the gateway's stop stops the rest."""
    alive_node_b(cluster)
    gw = gateway_factory(
        [fake_model("on-b", None, "--host", "{host}", ray={"resources": {"node_b": 1}}),
         fake_model("here", None, ray=False)],
        env={"MODELHOST_RAY_ADDRESS": f"ray://127.0.0.2:{cluster.client_port}",
             "MODELHOST_RAY_PLACEMENT_TIMEOUT": "10", "MODELHOST_RAY_LOST_AFTER": "3"})
    for model in ("on-b", "here"):
        resp = httpx.post(gw.url + "/v1/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 200, resp.text
    on_b = fake_workers(cluster, "node_b")  # on-b's (its shim and itself), not here's
    assert on_b and all("--host" in psutil.Process(pid).cmdline() for pid in on_b)
    local = [p for p in psutil.process_iter(["cmdline"])
             if FAKE_WORKER in (p.info["cmdline"] or []) and "--host" not in p.info["cmdline"]]
    assert local and not {p.pid for p in local} & node_pids(cluster, "node_b")
    unloaded = httpx.post(gw.url + "/api/admin/models/on-b/unload", timeout=30)
    assert unloaded.status_code == 200, unloaded.text
    assert wait_for(lambda: not fake_workers(cluster, "node_b"), timeout=10)
    resp = httpx.post(gw.url + "/v1/chat/completions", timeout=60, json={
        "model": "on-b", "messages": [{"role": "user", "content": "again"}]})
    assert resp.status_code == 200, resp.text
    assert fake_workers(cluster, "node_b")
    gw.stop()
    assert wait_for(lambda: not fake_workers(cluster, "node_b"), timeout=15)


@pytest.mark.timeout(300)
def test_two_replicas_across_the_nodes_survive_the_loss_of_one(
        cluster: LoopbackCluster, gateway_factory: GatewayFactory) -> None:
    """The built-in chat model (SmolLM2 in llama.cpp) with `replicas: 2`, each replica
    reserving one CPU (each node has one): one replica per node. Under a constant load
    node_b is killed: no request fails (one that node_b's replica had not answered is
    retried on node_a's), and when node_b is started again the model is back to two
    replicas, one on each node. Kills node_b: it runs last."""
    alive_node_b(cluster)
    node_b = next(n for n in cluster.nodes if n.name == "node_b")
    builtin = next(m for m in BUILTIN_MODELS if m.id == "smollm2-135m")
    gw = gateway_factory(
        [{**builtin.model_dump(mode="json", exclude_defaults=True), "aliases": ["two"],
          "replicas": 2, "max_restarts": 30, "ray": {"num_cpus": 1}}],
        env={"MODELHOST_RAY_ADDRESS": f"ray://127.0.0.2:{cluster.client_port}",
             "MODELHOST_RAY_PLACEMENT_TIMEOUT": "5", "MODELHOST_RAY_LOST_AFTER": "3"})

    def replicas() -> list[dict[str, Any]]:
        cards: list[dict[str, Any]] = gw.admin_card("smollm2-135m")["replicas"]
        return cards

    def hosts() -> set[str]:
        return {httpx.URL(c["base_url"]).host for c in replicas()
                if c["state"] == "ready" and c["base_url"]}

    assert httpx.post(gw.url + "/api/admin/models/smollm2-135m/load",
                      timeout=120).status_code == 200
    assert wait_for(lambda: hosts() == {"127.0.0.2", "127.0.0.3"}, 60), replicas()
    body = {"model": "two", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hi."}]}
    with constant_load(gw.url + "/v1/chat/completions", body) as (failures, done):
        assert wait_for(lambda: len(done) >= 8, 30), failures
        node_b.kill()
        assert wait_for(lambda: hosts() == {"127.0.0.2"}, 15), replicas()
        served = len(done)
        time.sleep(2)
        assert len(done) > served  # node_a's replica goes on serving
        cluster.restart(node_b)
        assert wait_for(lambda: hosts() == {"127.0.0.2", "127.0.0.3"}, 90), replicas()
        served = len(done)
        time.sleep(1)
        assert len(done) > served
    assert failures == [], failures[:5]
    assert gw.model("smollm2-135m")["state"] == "ready"
