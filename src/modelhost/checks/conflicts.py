"""Rules across services and files: the same service described by several files that
disagree (the audit's two compose files), and different services claiming the same host
port, container name or GPU.

Services are "the same" when, in different files, they share a service name, the model they
serve, or an image and a container name or host port: such files are alternatives for one
deployment, so that their shared port and GPUs are expected, and what matters is where they
disagree. Services whose profiles do not
overlap are alternatives too (`--profile cpu` or `--profile gpu`).
"""

from __future__ import annotations

from collections.abc import Callable

from modelhost.checks import rules as R
from modelhost.checks.compose import Service, duration_seconds, image_ref
from modelhost.checks.report import Finding


def _keys(service: Service) -> set[tuple[str, ...]]:
    """What makes two services in different files one service described twice: the service
    name, the model served, or the same image with the same container name or host port."""
    keys: set[tuple[str, ...]] = {("name", service.name)}
    if service.vllm is not None and service.vllm.model:
        keys.add(("model", service.vllm.model.rstrip("/").rsplit("/", 1)[-1].lower()))
    if service.image:
        repo = image_ref(service.image)[0]
        keys |= {("port", repo, p.published) for p in service.ports if p.published}
        name = service.text("container_name")
        if name:
            keys.add(("container", repo, name))
    return keys


def _groups(services: list[Service]) -> list[int]:
    """A group number per service: services of different files that share a key."""
    parent = list(range(len(services)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    keys = [_keys(s) for s in services]
    for i, a in enumerate(services):
        for j in range(i):
            if a.path != services[j].path and keys[i] & keys[j]:
                parent[find(i)] = find(j)
    return [find(i) for i in range(len(services))]


def _together(a: Service, b: Service) -> bool:
    return not a.profiles or not b.profiles or bool(a.profiles & b.profiles)


def _where(service: Service, line: int | None = None) -> str:
    return f"{service.path}:{line or service.line}"


def check(services: list[Service]) -> list[Finding]:
    out: list[Finding] = []
    group = _groups(services)
    out += _disagreements(services, group)
    names: dict[str, tuple[int, int]] = {}
    gpus: dict[str, tuple[int, int]] = {}
    claims: list[tuple[int, str, str, str, int]] = []  # service, ip, port, protocol, line
    for i, service in enumerate(services):
        for port in service.ports:
            ip = "*" if port.all_interfaces else port.host_ip or "*"
            for published in _port_range(port.published) if port.published else []:
                clash = next((c for c in claims if c[2] == published and c[3] == port.protocol
                              and (ip == c[1] or "*" in (ip, c[1]))
                              and group[c[0]] != group[i] and _together(services[c[0]],
                                                                         service)), None)
                if clash is not None:
                    first = services[clash[0]]
                    out.append(Finding(
                        R.PORT_CONFLICT, f"host port {published} of service {service.name} "
                        f"is also published by service {first.name} "
                        f"({_where(first, clash[4])})",
                        fix="Give each service its own host port.",
                        path=service.path, line=port.line))
                claims.append((i, ip, published, port.protocol, port.line))
        name_node = service.node.get("container_name")
        name = name_node.scalar() if name_node is not None else None
        if name and name_node is not None:
            other = names.get(name)
            if other is not None and group[other[0]] != group[i] and \
                    _together(services[other[0]], service):
                out.append(Finding(
                    R.NAME_CONFLICT, f"container_name {name} of service {service.name} is "
                    f"also used by service {services[other[0]].name} "
                    f"({_where(services[other[0]], other[1])})",
                    fix="Give each service its own container_name.",
                    replacement=f"container_name: {service.name}",
                    path=service.path, line=name_node.line))
            names.setdefault(name, (i, name_node.line))
        for gpu in service.gpu_ids or []:
            other = gpus.get(gpu)
            if other is not None and group[other[0]] != group[i] and \
                    _together(services[other[0]], service):
                out.append(Finding(
                    R.GPU_CONFLICT, f"GPU {gpu} of service {service.name} is also given to "
                    f"service {services[other[0]].name} ({_where(services[other[0]])})",
                    fix="Give each model server its own GPUs, or size gpu-memory-utilization "
                    "so that both fit.",
                    path=service.path, line=service.gpu_line or service.line))
            gpus.setdefault(gpu, (i, service.gpu_line or service.line))
    return out


def _port_range(text: str) -> list[str]:
    start, _, end = text.partition("-")
    if end and start.isdigit() and end.isdigit() and int(end) - int(start) < 1000:
        return [str(p) for p in range(int(start), int(end) + 1)]
    return [text]


# What two descriptions of one service must agree on, and how to read it.
_ATTRIBUTES: list[tuple[str, Callable[[Service], tuple[str | None, int | None]]]] = []


def _arg(name: str, default: str | None = None) -> Callable[[Service], tuple[str | None,
                                                                          int | None]]:
    def read(service: Service) -> tuple[str | None, int | None]:
        if service.vllm is None:
            return None, None
        arg = service.vllm.args.get(name)
        if arg is None:
            return default, None
        return arg.value or "(set)", arg.line
    return read


def _node(key: str, *path: str) -> Callable[[Service], tuple[str | None, int | None]]:
    def read(service: Service) -> tuple[str | None, int | None]:
        node = service.node.get(key)
        for part in path:
            node = node.get(part) if node is not None else None
        if node is None:
            return None, None
        text = node.scalar()
        seconds = duration_seconds(text or "") if path else None
        return (f"{seconds:g}s" if seconds is not None else text), node.line
    return read


def _image(service: Service) -> tuple[str | None, int | None]:
    node = service.node.get("image")
    return service.image, node.line if node is not None else None


def _model(service: Service) -> tuple[str | None, int | None]:
    if service.vllm is None:
        return None, None
    return service.vllm.model, service.vllm.model_line


_ATTRIBUTES += [
    ("image", _image),
    ("model", _model),
    ("max-model-len", _arg("max_model_len")),
    ("quantization", _arg("quantization")),
    ("tensor-parallel-size", _arg("tensor_parallel_size", "1")),
    ("distributed-executor-backend", _arg("distributed_executor_backend")),
    ("swap-space", _arg("swap_space")),
    ("healthcheck start_period", _node("healthcheck", "start_period")),
    ("container_name", _node("container_name")),
]


def _disagreements(services: list[Service], group: list[int]) -> list[Finding]:
    out: list[Finding] = []
    members: dict[int, list[Service]] = {}
    for i, service in enumerate(services):
        members.setdefault(group[i], []).append(service)
    for same in members.values():
        if len({s.path for s in same}) < 2:
            continue
        first, *others = same
        listing = ", ".join(f"{s.name} in {_where(s)}" for s in same)
        out.append(Finding(
            R.DUPLICATE_SERVICE, f"one service is described {len(same)} times: {listing}",
            fix="Keep one file per service (or a base file and explicit overrides).",
            path=others[0].path, line=others[0].line))
        for label, read in _ATTRIBUTES:
            values = [read(s) for s in same]
            texts = {v for v, _ in values}
            if len(texts) < 2:
                continue
            described = "; ".join(
                f"{v if v is not None else '(not set)'} in {_where(s, line)}"
                for s, (v, line) in zip(same, values, strict=True))
            later = next((s, line) for s, (v, line) in zip(same, values, strict=True)
                         if v != values[0][0])
            out.append(Finding(
                R.CONFLICTING, f"{label} differs between the files describing service "
                f"{first.name}: {described}",
                fix="Decide which is right and make every file say the same (or keep one).",
                path=later[0].path, line=later[1] or later[0].line))
    return out
