"""The rules that apply to one compose service (rules across services and files are in
`conflicts`; those of the vLLM server it runs, in `vllm`)."""

from __future__ import annotations

from collections.abc import Mapping

from modelhost.checks import rules as R
from modelhost.checks import secrets
from modelhost.checks.compose import Service, duration_seconds, image_ref, size_bytes, split_ids
from modelhost.checks.report import Finding
from modelhost.checks.vllm import needed_start_seconds
from modelhost.checks.yamlloc import interpolate, walk

_KEY_VARS = ("VLLM_API_KEY", "OPENAI_API_KEYS", "MODELHOST_OPENAI_API_KEYS",
             "MODELHOST_ADMIN_KEYS", "API_KEY")


def check_service(service: Service, pins: Mapping[str, str]) -> list[Finding]:
    out: list[Finding] = []
    node, path = service.node, service.path
    image_node = node.get("image")
    tag = image_ref(service.image)[1] if service.image else ""
    if service.image and image_node is not None and node.get("build") is None and \
            tag in (None, "latest"):
        repo = image_ref(service.image)[0]
        pinned = pins.get(repo)
        out.append(Finding(
            R.IMAGE_UNPINNED, f"service {service.name} uses image {service.image}"
            + (" (no tag: latest)" if tag is None else ""),
            fix="Pin a tested version (or a digest), and change it on purpose.",
            replacement=f"image: {repo}:{pinned}" if pinned else None,
            path=path, line=image_node.line))
    out += secrets.in_environment(service.node, path)
    environment, command = node.get("environment"), node.get("command")
    reported = {id(n) for n in (walk(environment) if environment is not None else [])}
    if service.vllm is not None and command is not None:
        reported |= {id(n) for n in walk(command)}  # secrets.key-in-command's
    out += secrets.tokens_in(node, path, reported)
    if service.vllm is not None:
        out += _vllm_service(service)
    if service.is_server:
        out += _server(service)
    user = (service.text("user") or "").split(":")[0]
    if user in ("root", "0") or service.text("privileged") == "true":
        out.append(Finding(
            R.EXPLICIT_ROOT, f"service {service.name} runs with "
            + ("privileged: true" if service.text("privileged") == "true" else f"user: {user}"),
            fix="Run as an unprivileged user; give only the devices it needs.",
            path=path, line=node.key_line("user" if user else "privileged")))
    elif node.get("user") is None and node.get("build") is None:
        out.append(Finding(
            R.RUNS_AS_ROOT, f"service {service.name} sets no user: the image's user "
            "(root for most images) runs it",
            fix="Set `user:` to an unprivileged uid that can read the model cache.",
            replacement='user: "1000:1000"', path=path, line=service.line))
    return out


def _server(service: Service) -> list[Finding]:
    out: list[Finding] = []
    node, path = service.node, service.path
    health = node.get("healthcheck")
    disabled = False
    if health is not None:
        disable, test = health.get("disable"), health.get("test")
        disabled = (disable is not None and disable.value is True) or (
            test is not None and "NONE" in str(test.plain()))
    if health is None or disabled:
        out.append(Finding(
            R.HEALTHCHECK_MISSING, f"service {service.name} has no health check",
            fix="Probe the server's health endpoint, with a start_period long enough to load "
            "the model.",
            replacement='healthcheck:\n  test: ["CMD", "curl", "-f", '
            '"http://localhost:8000/health"]\n  interval: 30s\n  timeout: 15s\n'
            f"  retries: 5\n  start_period: {_needed(service)}s",
            path=path, line=service.line))
    elif service.vllm is not None:
        start = health.get("start_period")
        written = interpolate(start.scalar() or "", service.variables).text \
            if start is not None else "0s"
        seconds = duration_seconds(written)
        needed = _needed(service)
        if seconds is not None and seconds < needed:
            out.append(Finding(
                R.HEALTHCHECK_START, f"healthcheck start_period is "
                f"{written if start is not None else 'not set (0s)'} for "
                f"{service.vllm.model or 'a vLLM model'}, which needs about {needed}s to load",
                fix=f"Give the model time to load: start_period of at least {needed}s.",
                replacement=f"start_period: {needed}s", path=path,
                line=start.line if start is not None else health.line))
    if (service.vllm is not None or service.gpu_access) and \
            node.get("container_name") is None:
        out.append(Finding(
            R.CONTAINER_NAME, f"service {service.name} has no container_name",
            fix="Name the container so that monitoring and runbooks find it.",
            replacement=f"container_name: {service.name}", path=path, line=service.line))
    if service.ports and not _has_key(service):
        for port in service.ports:
            if port.all_interfaces:
                out.append(Finding(
                    R.PORT_EXPOSED, f"service {service.name} publishes port "
                    f"{port.published or '(random)'}:{port.target} on all interfaces and "
                    "requires no API key",
                    fix="Bind to loopback (a reverse proxy in front), or require a key "
                    "(--api-key from an env variable; OPENAI_API_KEYS for modelhost).",
                    replacement=f"- {port.localized()}", path=path, line=port.line))
    return out


def _needed(service: Service) -> int:
    return needed_start_seconds(service.vllm.model if service.vllm else None)


def _has_key(service: Service) -> bool:
    """An API key is configured: vLLM's --api-key, a key variable (or its _FILE form, read
    by modelhost's image), or a compose secret named like a key."""
    if service.vllm is not None and "api_key" in service.vllm.args:
        return True
    if any(name in service.env or f"{name}_FILE" in service.env for name in _KEY_VARS):
        return True
    declared = service.node.get("secrets")
    names = [(item.get("source") if isinstance(item.value, dict) else item)
             for item in (declared.sequence() if declared else [])]
    return any("key" in (n.scalar() or "").lower() for n in names if n is not None)


def _vllm_service(service: Service) -> list[Finding]:
    out: list[Finding] = []
    node, path = service.node, service.path
    if not service.gpu_access:
        out.append(Finding(
            R.NO_GPU, f"vLLM service {service.name} is given no GPU",
            fix="Reserve the GPUs (deploy.resources.reservations.devices with "
            "capabilities: [gpu]) or use runtime: nvidia.",
            replacement="deploy:\n  resources:\n    reservations:\n      devices:\n"
            "        - driver: nvidia\n          device_ids: ['0', '1']\n"
            "          capabilities: [gpu]", path=path, line=service.line))
    ipc = service.text("ipc")
    shm = size_bytes(service.text("shm_size") or "") if node.get("shm_size") else None
    if ipc != "host" and (shm is None or shm < 2**30):
        out.append(Finding(
            R.SHARED_MEMORY, f"vLLM service {service.name} has "
            + (f"shm_size {service.text('shm_size')}" if node.get("shm_size")
               else "no ipc: host and no shm_size (Docker's default is 64 MB)"),
            fix="Share the host's IPC namespace, or give /dev/shm a few GB.",
            replacement="ipc: host", path=path, line=node.key_line("shm_size")
            if node.get("shm_size") else service.line))
    out += secrets.in_command(service.raw_tokens, path)
    deploy = node.get("deploy")
    resources = deploy.get("resources") if deploy else None
    reservations = resources.get("reservations") if resources else None
    devices = reservations.get("devices") if reservations else None
    for device in devices.sequence() if devices else []:
        ids = device.get("device_ids")
        items = (ids.sequence() if ids is not None and isinstance(ids.value, list)
                 else [ids] if ids is not None else [])
        for item in items:
            raw = item.scalar() or ""
            value = interpolate(raw, service.variables).text
            if "$" in raw or "," in value or not value.strip():
                tp = service.vllm.int_value("tensor_parallel_size", 1) if service.vllm else 1
                parts = split_ids(value) or [str(n) for n in range(tp or 1)]
                out.append(Finding(
                    R.GPU_DEVICE_IDS, f"device_ids entry {raw!r} is one id "
                    f"({value!r}), not {len(parts)} GPU id(s)",
                    fix="List each GPU id as its own item (or reserve by count).",
                    replacement="device_ids: [" + ", ".join(f"'{p}'" for p in parts) + "]",
                    path=path, line=item.line))
    return out

