"""The container the gateway runs in (`doctor.container.runtime`) and its shared memory
(`doctor.shm`).

In a container: `/.dockerenv` (Docker), `/run/.containerenv` (Podman), the `container`
variable (systemd-nspawn, Podman, LXC) or a container manager in `/proc/1/cgroup`
(cgroup v1: `docker`, `kubepods`, `containerd`, `libpod`, `lxc`). The NVIDIA container
runtime, when it started the container, adds `/dev/nvidiactl` and `/dev/nvidia<N>` for the
GPUs it was given (`NVIDIA_VISIBLE_DEVICES`) and mounts the driver's libraries (NVML among
them).
"""

from __future__ import annotations

import os
import re

from modelhost.checks.report import Finding
from modelhost.doctor.context import (
    GIB,
    Context,
    failed,
    gib,
    names,
    not_applicable,
    passed,
)
from modelhost.doctor.rules import CONTAINER, SHM

SHM_WANTED = 1 * GIB
_CGROUP = re.compile(r"docker|kubepods|containerd|libpod|lxc")
_RUNTIME_FIX = (
    "start the container with the NVIDIA runtime (install the NVIDIA Container Toolkit on the "
    "host): `docker run --gpus all ...`, or in compose `deploy: {resources: {reservations: "
    "{devices: [{driver: nvidia, count: all, capabilities: [gpu]}]}}}`")


def container_kind(ctx: Context) -> str | None:
    """What says this is a container, or None outside one."""
    host = ctx.host
    if host.path("/.dockerenv").exists():
        return "docker (/.dockerenv)"
    if host.path("/run/.containerenv").exists():
        return "podman (/run/.containerenv)"
    if host.environ.get("container"):
        return f"{host.environ['container']} ($container)"
    try:
        cgroup = host.path("/proc/1/cgroup").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = _CGROUP.search(cgroup)
    return f"{match.group(0)} (/proc/1/cgroup)" if match else None


def check_container(ctx: Context) -> list[Finding]:
    kind = container_kind(ctx)
    if kind is None:
        return [not_applicable(CONTAINER, "not running in a container")]
    dev = ctx.host.path("/dev")
    devices = sorted(p.name for p in dev.glob("nvidia[0-9]*")) if dev.is_dir() else []
    control = (dev / "nvidiactl").exists()
    visible = ctx.host.environ.get("NVIDIA_VISIBLE_DEVICES")
    seen = (f"{len(devices)} NVIDIA device(s) visible"
            + (f", NVIDIA_VISIBLE_DEVICES={visible}" if visible is not None else ""))
    models = ctx.gpu_models
    if not models:
        return [passed(CONTAINER, f"in a container: {kind}; {seen}; no configured model uses "
                                  "a GPU")]
    who = f"GPUs wanted by {names(models)}"
    if visible is not None and visible.strip().lower() in ("", "void", "none"):
        return [failed(CONTAINER, f"in a container: {kind}; NVIDIA_VISIBLE_DEVICES={visible} "
                                  f"hides every GPU; {who}",
                       "give the container GPUs (NVIDIA_VISIBLE_DEVICES=all or their ids)")]
    if not devices or not control:
        return [failed(CONTAINER, f"in a container: {kind}, but no NVIDIA device is visible "
                                  f"(/dev/nvidiactl and /dev/nvidia<N>); {who}",
                       _RUNTIME_FIX)]
    if not ctx.gpus.available:
        return [failed(CONTAINER, f"in a container: {kind}; {seen}, but NVML does not answer "
                                  f"({ctx.gpus.reason}): the driver's libraries were not "
                                  f"mounted; {who}",
                       _RUNTIME_FIX + "; NVIDIA_DRIVER_CAPABILITIES must include compute and "
                       "utility")]
    return [passed(CONTAINER, f"in a container: {kind}; {seen}; NVML sees "
                              f"{len(ctx.gpus.gpus)} GPU(s)")]


def check_shm(ctx: Context) -> list[Finding]:
    models = ctx.vllm_models
    if not models:
        return [not_applicable(SHM, "no vLLM model configured")]
    path = ctx.host.path("/dev/shm")
    try:
        stat = os.statvfs(path)
    except OSError as exc:
        return [failed(SHM, f"cannot read the size of /dev/shm: {exc.strerror or exc}",
                       "mount a tmpfs on /dev/shm")]
    size = stat.f_blocks * stat.f_frsize
    if size < SHM_WANTED:
        return [failed(SHM, f"/dev/shm is {gib(size)}, less than the {gib(SHM_WANTED)} vLLM "
                            f"wants ({names(models)})",
                       "in Docker: `--ipc=host` or `--shm-size=16g`; in compose: `ipc: host` "
                       "or `shm_size: 16gb`; elsewhere remount /dev/shm larger")]
    return [passed(SHM, f"/dev/shm is {gib(size)} (vLLM wants {gib(SHM_WANTED)} at least)")]
