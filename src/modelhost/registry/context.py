"""What a model's owner is given and asked: its target, a pin, the context it runs in.

Kept apart from `model` (the owner itself), which re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from modelhost.admin_policy import RemotePolicy
from modelhost.config import HubSource, ModelSpec, RaySpec
from modelhost.upstream import UpstreamClient
from modelhost.workers.launchers import LOOPBACK, Launcher, LocalProcessLauncher, Worker
from modelhost.workers.process import BackendConfigError


class Target(StrEnum):
    """What the owner drives the model towards."""

    stopped = "stopped"  # no worker (weights left where they are)
    cached = "cached"    # weights on disk, no worker (a download was asked for)
    ready = "ready"      # a worker answering requests


@dataclass(frozen=True)
class Pin:
    """The GPUs a load request asks for (`gpu_device_ids`); None: the spec's own again."""

    gpus: tuple[int, ...] | None


@dataclass(frozen=True)
class Fallback:
    """Where a model goes back to if the load asked with a new pin fails."""

    pin: tuple[int, ...] | None
    reload: bool  # it was loaded: load it again there


class DownloadCancelled(Exception):
    """The download was cancelled; the model goes back to `absent`."""


Progress = Callable[[dict[str, object]], None]
# The GPUs for a worker about to start here (the model's `gpu.scheduler` placement).
Place = Callable[[], Awaitable[list[int]]]
# Fetches a model's weights into the cache, reporting progress (HubService.download).
DownloadFn = Callable[[str, HubSource, Progress], Awaitable[Path]]


@dataclass(frozen=True)
class ModelContext:
    cache_dir: Path
    log_dir: Path
    stop_timeout: float
    download: DownloadFn
    hf_token: Callable[[], str | None] = lambda: None
    # Longest audio a speech or diarization worker accepts (settings.max_audio_seconds).
    max_audio_seconds: float = 4 * 3600.0
    # Worker log rotation (settings.worker_log_bytes, settings.worker_log_backups).
    worker_log_bytes: int = 10 * 1024 * 1024
    worker_log_backups: int = 3
    # Where a remote model may connect (None: anywhere, as the models file says); the
    # gateway gives the policy of `admin_policy` for the models added through the API.
    remote_policy: Callable[[ModelSpec], RemotePolicy | None] | None = None
    # Why a model cannot start here (None: it can): its secrets are unknown to this gateway
    # (`secretkeeper`; the gateway gives `Persistence.locked`).
    locked: Callable[[ModelSpec], str | None] | None = None
    # The gateway's HTTP client (the relay's): remote servers' readiness probes.
    client: UpstreamClient = field(default_factory=UpstreamClient)
    # A Ray cluster for the workers (settings.ray_address; `workers.ray_launcher.RayCluster`,
    # typed loosely so that Ray is imported only where one is configured).
    ray: Any = None
    # Where local workers listen, and where other gateways reach them (settings.worker_host,
    # settings.worker_advertise_host; docs/scale-out.md).
    worker_host: str = LOOPBACK
    worker_advertised_host: str | None = None

    def check_servable(self, spec: ModelSpec) -> None:
        """Raises BackendConfigError (a start that fails for good) saying why `spec` cannot
        start on this gateway, if `locked` says so."""
        reason = self.locked(spec) if self.locked is not None else None
        if reason is not None:
            raise BackendConfigError(f"model {spec.id} cannot be served by this gateway: "
                                     f"{reason}")

    def on_cluster(self, spec: ModelSpec) -> bool:
        """Whether `spec`'s worker runs on the Ray cluster (which places it itself)."""
        return self.ray is not None and spec.ray is not False

    def local_launcher(self, spec: ModelSpec | None = None, replica: int = 0) -> Launcher:
        """The launcher of a model that is not `remote` (of its replica `replica`: its own
        log file): a Ray actor on the cluster when there is one (`on_cluster`), else a
        process on this machine."""
        if spec is not None and self.on_cluster(spec):
            from modelhost.workers.ray_launcher import RayLauncher
            own = spec.ray if isinstance(spec.ray, RaySpec) else RaySpec()
            return RayLauncher(self.ray, self.log_dir, self.stop_timeout, self.hf_token,
                               self.max_audio_seconds, self.worker_log_bytes,
                               self.worker_log_backups, resources=own.resources,
                               num_cpus=own.num_cpus, replica=replica)
        return LocalProcessLauncher(self.log_dir, self.stop_timeout, self.hf_token,
                                    self.max_audio_seconds, self.worker_log_bytes,
                                    self.worker_log_backups, self.worker_host,
                                    self.worker_advertised_host, replica)

    async def launch(self, spec: ModelSpec, weights: Path | None, place: Place,
                     replica: int = 0) -> Worker:
        """Start the worker of a model that is not `remote` (of its replica `replica`: the
        same here; gateways sharing a database own each replica apart) through its launcher,
        on the GPUs `place` gives, asked just before it starts (a Ray cluster's worker: none,
        the cluster places it). `cluster.launcher.ClusterContext` asks only once this gateway
        owns the replica: a gateway that relays to another's worker books no GPU."""
        gpus = [] if self.on_cluster(spec) else await place()
        return await self.local_launcher(spec, replica).start(spec, weights, gpus)
