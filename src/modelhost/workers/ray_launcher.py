"""Workers on a Ray cluster (issue 18): a launcher whose workers run as Ray actors on the
nodes that have what they need, supervised there, reached by the relay at their node's address.

A worker here is a `ray.supervisor.WorkerSupervisor` actor and the process it spawns on its
node (the same `WorkerProcess` and shim as a local worker). `RayLauncher.start`:

1. reserves what the worker needs as one placement-group bundle, STRICT_PACK: its CPUs, its
   `gpu_count` GPUs and any custom resources (`node_b: 1`, `a100: 1`), so all the GPUs of a
   tensor-parallel worker are on one node (the worker is one process group that uses them
   all, as vLLM's multiprocessing executor does). A reservation Ray cannot make within
   `placement_timeout` is a start error that says what was asked; the model's owner retries
   it with backoff, so the worker starts wherever room appears;
2. creates the supervisor in that bundle (an *owned* actor: if the gateway dies, Ray kills
   it, and the shim kills the worker with it);
3. asks it for the node's address, a free port there and the GPUs Ray assigned, builds the
   launch plan for them here (`plans.launch_plan`, as for a local worker), and has it spawn
   the worker; `RayWorker.wait_ready` waits for the node's probe, then probes once more from
   the gateway, so that an address the gateway cannot reach fails the start, not a request.

`RayWorker.wait` returns when the worker exits, when Ray says the actor died (its node died,
it was killed) or when the actor has not answered a ping for `lost_after` seconds (a node cut
off the network, which Ray itself takes longer to declare dead); the model's owner then
restarts it, where Ray finds room. The worker's last lines come back with its exit, and
`fetch_tail` reads them from the node at any time.

The gateway connects to the cluster once (`RayCluster.connect`, `ray.init`); every worker it
started is stopped by `RayCluster.close`. Setting up the nodes is docs/scale-out.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from modelhost.config import ModelSpec
from modelhost.upstream import UpstreamClient
from modelhost.workers.launchers import worker_log
from modelhost.workers.plans import launch_plan
from modelhost.workers.process import (
    LOG_FILE_BYTES,
    PROBE_TIMEOUT,
    LaunchPlan,
    WorkerStartError,
)
from modelhost.workers.ray.inventory import ClusterGpus
from modelhost.workers.ray.supervisor import Outcome, Reservation, WorkerSupervisor

log = logging.getLogger(__name__)

T = TypeVar("T")

RemoteSupervisor = ray.remote(WorkerSupervisor)

# The status `RayWorker.wait` returns for a worker whose node or actor was lost: its real
# exit status is unknown (`RayWorker.exit_reason` says what happened).
LOST = -1
# How long a call to a supervisor that should answer at once may take (tail, stop's ack),
# and a blocking call to the cluster's control (creating or removing an actor's reservation,
# listing the nodes), run in a thread: with the head gone, such calls hang.
CALL_TIMEOUT = 10.0
# How long connecting to a cluster that answers may take (ray.init retries for minutes on
# its own; an address nobody answers at fails at once, `_reachable`). Ray Client's server
# starts a Python process of its own for each gateway: 30 s was passed on a loaded machine.
CONNECT_TIMEOUT = 60.0
# Ray Client's server answered but could not start that process (it exited while starting:
# seen once in 4 runs of the suite on a loaded machine): tried again this many times in all,
# within CONNECT_TIMEOUT, this long apart.
CONNECT_ATTEMPTS = 3
CONNECT_RETRY_S = 1.0
# What a failed call to the cluster raises: Ray's errors, Ray Client's plain ones once its
# channel is closed (ValueError "Cannot invoke RPC on closed channel!", ConnectionError),
# and our own deadlines.
CALL_FAILED = (ray.exceptions.RayError, ValueError, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class RayOptions:
    """How the gateway uses the cluster (the MODELHOST_RAY_* settings, docs/scale-out.md)."""

    # ray.init's address: "auto" or "HOST:PORT" when the gateway runs on a node of the
    # cluster (the head, usually), "ray://HOST:10001" through Ray Client otherwise.
    address: str
    namespace: str = "modelhost"
    # This machine's address in the cluster, when Ray would guess another one (ray.init's
    # _node_ip_address; the tests' loopback nodes need it).
    node_ip: str | None = None
    num_cpus: float = 1.0  # CPUs each worker reserves
    resources: Mapping[str, float] = field(default_factory=dict)  # custom, for every worker
    placement_timeout: float = 30.0  # a reservation not made by then is a start error
    heartbeat: float = 1.0  # seconds between pings of a running worker's supervisor
    lost_after: float = 5.0  # a supervisor silent this long is lost (its node, usually)


class RayCluster:
    """The gateway's connection to a Ray cluster: connects once, tracks the workers it
    started (all stopped by `close`), and reads every node's GPUs (`gpus`)."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self.workers: set[RayWorker] = set()
        self.gpus = ClusterGpus()
        self._owns_connection = False

    async def connect(self) -> None:
        """ray.init (blocking for a second or two: in a thread); a no-op once connected.
        ConnectionError when the cluster cannot be reached."""
        if ray.is_initialized():
            return
        options = self.options
        # ray.init itself waits minutes for an address that does not answer: a plain TCP
        # connection says at once whether anything listens there.
        await _reachable(options.address)
        # In a thread, and not only because it blocks: on the main thread ray.init replaces
        # the SIGTERM handler with sys.exit, and the gateway's drain on SIGTERM would be lost.
        # Off it, Ray says it did not, at warning level: that line is dropped.
        worker_log = logging.getLogger("ray._private.worker")
        worker_log.addFilter(_not_sigterm_notice)
        try:
            await asyncio.wait_for(self._init(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise ConnectionError(f"the Ray cluster at {options.address} did not accept "
                                  f"the gateway within {CONNECT_TIMEOUT:g} s") from None
        finally:
            worker_log.removeFilter(_not_sigterm_notice)
        self._owns_connection = True
        log.info("connected to the Ray cluster at %s (namespace %s)", options.address,
                 options.namespace)

    async def _init(self) -> None:
        """ray.init, tried again when Ray Client's server fails to start the process that
        would serve this gateway (`ConnectionAbortedError`, "Initialization failure from
        server"); any other error, or the last attempt's, is raised as it is."""
        options = self.options
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                await asyncio.to_thread(
                    ray.init, address=options.address, namespace=options.namespace,
                    _node_ip_address=options.node_ip,
                    # The workers' output is theirs (`RayWorker.fetch_tail`, the node's log
                    # files), not the gateway's; Ray's own logging stays as the gateway's.
                    log_to_driver=False, configure_logging=False)
                return
            except ConnectionAbortedError as exc:
                if attempt == CONNECT_ATTEMPTS:
                    raise
                log.warning("the Ray cluster at %s failed to take the gateway (attempt %d "
                            "of %d), trying again: %s", options.address, attempt,
                            CONNECT_ATTEMPTS, str(exc).strip().splitlines()[0])
                await asyncio.sleep(CONNECT_RETRY_S)

    async def close(self) -> None:
        """Stop every worker started through this cluster, then disconnect."""
        await asyncio.gather(*(w.stop() for w in list(self.workers)),
                             return_exceptions=True)
        await self.gpus.close()
        if self._owns_connection and ray.is_initialized():
            await asyncio.to_thread(ray.shutdown)
        self._owns_connection = False


@dataclass(frozen=True)
class RayLauncher:
    """Workers as `WorkerSupervisor` actors on the cluster's nodes (see the module's notes).

    `resources` are the custom resources this model's worker needs besides the cluster-wide
    `RayOptions.resources`, and `num_cpus` its CPUs if not `RayOptions.num_cpus` (the
    models-file `ray:` field, once wired); `gpus` given to `start` are ignored: Ray chooses
    them on the node it places the worker on."""

    cluster: RayCluster
    log_dir: Path
    stop_timeout: float
    hf_token: Callable[[], str | None] = lambda: None
    max_audio_seconds: float | None = None
    log_bytes: int = LOG_FILE_BYTES
    log_backups: int = 3
    resources: Mapping[str, float] = field(default_factory=dict)
    num_cpus: float | None = None
    replica: int = 0  # which replica of the model it starts (its log file)

    def bundle(self, spec: ModelSpec) -> dict[str, float]:
        """What one worker of `spec` reserves on its node."""
        options = self.cluster.options
        gpus = len(spec.gpus) if spec.gpus is not None else spec.gpu_count
        cpus = options.num_cpus if self.num_cpus is None else self.num_cpus
        wanted = {"CPU": cpus, "GPU": float(gpus),
                  **options.resources, **self.resources}
        return {k: float(v) for k, v in wanted.items() if v}

    async def start(self, spec: ModelSpec, weights: Path | None, gpus: list[int]
                    ) -> RayWorker:
        try:
            await self.cluster.connect()
        except ConnectionError as exc:  # transient: the owner retries with backoff
            raise WorkerStartError(str(exc)) from None
        bundle = self.bundle(spec)
        group = await self._reserve(spec, bundle)
        options = RemoteSupervisor.options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
            resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
            max_restarts=0,  # a lost worker is restarted by its model's owner, elsewhere
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0) if group is not None else None)
        try:
            actor = await _blocking(options.remote, spec.id, self.stop_timeout,
                                    self.log_bytes, self.log_backups)
        except BaseException as exc:
            if group is not None:
                await _forget(remove_placement_group, group)
            if isinstance(exc, CALL_FAILED):
                raise WorkerStartError(f"cannot create the worker's Ray actor: "
                                       f"{_death(exc)}") from None
            raise
        worker = RayWorker(self.cluster, actor, group, spec.id, self.stop_timeout)
        try:
            await worker.begin(self._plan_for(spec, weights), self._needs(spec, weights),
                               self._log_file(spec))
        except BaseException:
            await worker.stop()
            raise
        return worker

    async def _reserve(self, spec: ModelSpec, bundle: dict[str, float]
                       ) -> PlacementGroup | None:
        if not bundle:  # nothing to reserve: Ray places the actor anywhere
            return None
        try:
            # Named for `ray status`; unique, since two versions of a model may run at once.
            group: PlacementGroup = await _blocking(
                placement_group, [bundle], strategy="STRICT_PACK",
                name=f"modelhost:{spec.id}:{uuid.uuid4().hex[:8]}")
        except CALL_FAILED as exc:
            raise WorkerStartError(f"cannot reserve {_show(bundle)} on the Ray cluster: "
                                   f"{_death(exc)}") from None
        timeout = self.cluster.options.placement_timeout
        try:
            await asyncio.wait_for(_result(group.ready()), timeout)
        except BaseException as exc:  # cancelled too (an unload): the reservation goes
            await _forget(remove_placement_group, group)
            if not isinstance(exc, CALL_FAILED):
                raise
            why = "none free" if isinstance(exc, TimeoutError) else _death(exc)
            raise WorkerStartError(
                f"no node of the Ray cluster could reserve {_show(bundle)} within "
                f"{timeout:g} s ({why}; nodes: {await _nodes_summary()})") from None
        return group

    def _plan_for(self, spec: ModelSpec, weights: Path | None
                  ) -> Callable[[Reservation], LaunchPlan]:
        def plan(where: Reservation) -> LaunchPlan:
            built = launch_plan(spec, weights, where.node_ip, where.port, where.gpus,
                                self.hf_token(), max_audio_seconds=self.max_audio_seconds)
            built.env.update(spec.env)
            return built
        return plan

    @staticmethod
    def _needs(spec: ModelSpec, weights: Path | None) -> list[str]:
        """Paths the worker reads that must exist on its node (the same paths as here); its
        command is checked there when it is spawned."""
        return [str(weights)] if weights is not None else []

    def _log_file(self, spec: ModelSpec) -> str:
        return str(worker_log(self.log_dir, spec.id, self.replica))


class RayWorker:
    """A worker started by `RayLauncher`: its supervisor actor and what it reported."""

    watched = True
    connect_to = None
    pid = None  # not a process of this machine (the scheduler measures local ones only)

    def __init__(self, cluster: RayCluster, actor: Any, group: PlacementGroup | None,
                 name: str, stop_timeout: float) -> None:
        self.cluster = cluster
        self.stop_timeout = stop_timeout
        self.actor = actor
        self.group = group
        self.name = name
        self.started_at = time.monotonic()
        self.node_id = self.node_ip = self.hostname = ""
        self.port: int | None = None
        self.gpus: list[int] = []  # on its node, as Ray assigned them
        self.base_url = ""
        self.probe_path = "/v1/models"
        self.exit_reason: str | None = None  # once `wait` returned: why the worker ended
        self._lines: list[str] = []  # its last lines, as last read from its node
        self._supervision: asyncio.Future[int] | None = None
        self._stopped = False
        cluster.workers.add(self)

    # -- start ---------------------------------------------------------------------------

    async def begin(self, plan_for: Callable[[Reservation], LaunchPlan], needs: list[str],
                    log_file: str) -> None:
        """Reserve a port on the node, spawn the plan built for it there."""
        options = self.cluster.options
        where: Reservation = await self._call(self.actor.reserve.remote(needs),
                                              options.placement_timeout, "start")
        self.node_id, self.node_ip, self.hostname = where.node_id, where.node_ip, \
            where.hostname
        self.port, self.gpus = where.port, where.gpus
        self.base_url = f"http://{where.node_ip}:{where.port}/v1"
        if where.missing:
            raise WorkerStartError(
                f"node {self._node()} lacks {', '.join(where.missing)}: every node needs the "
                f"model cache at the gateway's path", permanent=True)
        plan = plan_for(where)
        self.probe_path = plan.probe_path
        log.info("starting worker %s on Ray node %s, port %d, GPUs %s: %s", self.name,
                 self._node(), where.port, where.gpus or "none", " ".join(plan.argv))
        outcome: Outcome = await self._call(self.actor.spawn.remote(plan, log_file),
                                            CALL_TIMEOUT, "start")
        if outcome.error:
            raise WorkerStartError(outcome.error, outcome.permanent)

    async def wait_ready(self, timeout: float) -> None:
        outcome: Outcome = await self._call(self.actor.wait_ready.remote(timeout),
                                            timeout + CALL_TIMEOUT, "start")
        if outcome.error:
            await self.fetch_tail(20)
            raise WorkerStartError(f"{outcome.error} (on Ray node {self._node()})",
                                   outcome.permanent)
        # Ready on its node; the relay connects from here.
        client = UpstreamClient()
        try:
            status = await client.get_status(self.base_url.removesuffix("/v1"),
                                             self.probe_path, timeout=PROBE_TIMEOUT)
        except OSError as exc:
            raise WorkerStartError(f"worker ready on Ray node {self._node()} but the gateway "
                                   f"cannot reach {self.base_url}: {exc}") from None
        finally:
            client.close()
        if status != 200:
            raise WorkerStartError(f"worker on Ray node {self._node()} answered {status} to "
                                   f"the gateway's probe of {self.probe_path}")

    # -- while it runs -------------------------------------------------------------------

    async def wait(self) -> int:
        """Its exit status once it has exited, or `LOST` once its actor or node is lost
        (`exit_reason` says which). Cancelling this call does not stop the supervision."""
        if self._supervision is None:
            if self._stopped:
                return 0
            self._supervision = asyncio.ensure_future(self._supervise())
        return await asyncio.shield(self._supervision)

    async def _supervise(self) -> int:
        options = self.cluster.options
        heard = time.monotonic()
        exited: asyncio.Future[tuple[int, str]] | None = None
        try:
            while True:
                if exited is None:
                    exited = asyncio.ensure_future(_result(self.actor.wait.remote()))
                done, _ = await asyncio.wait({exited}, timeout=options.heartbeat)
                if done:
                    try:
                        code, tail = exited.result()
                    except ray.exceptions.ActorDiedError as exc:
                        return await self._lost(_death(exc))
                    except CALL_FAILED:
                        pass  # unavailable for now: the pings decide
                    else:
                        self._lines = tail.splitlines()
                        self.exit_reason = f"worker exited with status {code}"
                        await self._release()
                        return int(code)
                beat = time.monotonic()
                try:
                    await asyncio.wait_for(_result(self.actor.ping.remote()),
                                           options.heartbeat)
                except ray.exceptions.ActorDiedError as exc:
                    return await self._lost(_death(exc))
                except CALL_FAILED:
                    silent = time.monotonic() - heard
                    if silent >= options.lost_after:
                        return await self._lost(
                            f"no answer from its supervisor for {silent:.0f} s")
                    # A call to a node that is gone may fail at once: keep the pace.
                    await asyncio.sleep(max(0.0, options.heartbeat - (time.monotonic() - beat)))
                else:
                    heard = time.monotonic()
                    if exited.done():  # it answers again: ask for its exit again
                        exited = None
        finally:
            if exited is not None and not exited.done():
                exited.cancel()

    async def _lost(self, why: str) -> int:
        self.exit_reason = f"Ray node {self._node()} lost: {why}"
        self._lines.append(f"[modelhost] {self.exit_reason}")
        log.warning("worker %s: %s", self.name, self.exit_reason)
        await self._release()
        return LOST

    def tail(self, lines: int) -> str:
        """Its last lines as last read from its node (`fetch_tail` reads them now)."""
        return "\n".join(self._lines[-lines:])

    async def fetch_tail(self, lines: int) -> str:
        """Its last `lines` lines, read from its node now (the last known ones if the node
        does not answer)."""
        if self.exit_reason is None and not self._stopped:
            with contextlib.suppress(*CALL_FAILED):
                text: str = await asyncio.wait_for(
                    _result(self.actor.tail.remote(max(lines, 20))), CALL_TIMEOUT)
                self._lines = text.splitlines()
        return self.tail(lines)

    # -- stop ----------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop the worker (gracefully, through its supervisor), then the actor and its
        reservation. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.exit_reason is None:
            with contextlib.suppress(*CALL_FAILED):
                # The supervisor escalates to SIGKILL after the stop timeout itself.
                await asyncio.wait_for(_result(self.actor.stop.remote()),
                                       self.stop_timeout + CALL_TIMEOUT)
        if self._supervision is not None and not self._supervision.done():
            self._supervision.cancel()
        if self.exit_reason is None:
            self.exit_reason = "stopped"
        await self._release()

    async def _release(self) -> None:
        """Kill the actor (its worker dies with it) and free its reservation."""
        self.cluster.workers.discard(self)
        await _forget(ray.kill, self.actor, no_restart=True)
        group, self.group = self.group, None
        if group is not None:
            await _forget(remove_placement_group, group)

    # -- helpers -------------------------------------------------------------------------

    def _node(self) -> str:
        if not self.node_ip:
            return "(not placed yet)"
        return f"{self.node_ip} ({self.hostname})" if self.hostname else self.node_ip

    async def _call(self, ref: Any, timeout: float, step: str) -> Any:
        """A supervisor call that must answer within `timeout`; its failure is a start
        error (the actor could not be created or died, or the node did not answer)."""
        try:
            return await asyncio.wait_for(_result(ref), timeout)
        except TimeoutError:
            raise WorkerStartError(f"the worker's Ray actor did not answer within "
                                   f"{timeout:g} s during {step} (node "
                                   f"{self._node()})") from None
        except CALL_FAILED as exc:
            raise WorkerStartError(f"the worker's Ray actor failed during {step}: "
                                   f"{_death(exc)}") from None


def _not_sigterm_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("SIGTERM handler is not set")


async def _result(ref: Awaitable[T]) -> T:
    return await ref


async def _blocking(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A blocking call to the cluster's control, in a thread, within CALL_TIMEOUT."""
    return await asyncio.wait_for(asyncio.to_thread(call, *args, **kwargs), CALL_TIMEOUT)


async def _forget(call: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """A clean-up call (kill an actor, free a reservation) whose failure changes nothing:
    what it would free goes with its node, or with the gateway's connection."""
    with contextlib.suppress(*CALL_FAILED):
        await _blocking(call, *args, **kwargs)


async def _reachable(address: str) -> None:
    """ConnectionError unless something accepts TCP connections at `address` ("auto",
    which Ray resolves itself, passes)."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), 5.0)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(f"the Ray cluster at {address} is unreachable: "
                              f"{exc or type(exc).__name__}") from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _death(exc: BaseException) -> str:
    """The first line of a Ray error, which says what happened (node died, actor killed)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _show(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"


async def _nodes_summary() -> str:
    try:
        nodes = [n for n in await _blocking(ray.nodes) if n.get("Alive")]
    except CALL_FAILED:
        return "unknown: the cluster does not answer"
    if not nodes:
        return "none alive"
    return "; ".join(
        f"{n['NodeManagerAddress']} " + _show({
            k: v for k, v in n.get("Resources", {}).items()
            if not k.startswith("node:") and k not in ("memory", "object_store_memory")})
        for n in nodes)
