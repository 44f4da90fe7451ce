"""Compose files: each service read into a `Service` (with lines, `${VAR}` interpolated from
the .env beside the file and the environment, as docker compose does), then the rules that
apply to one service. Rules across services and files are in `conflicts`.
"""

from __future__ import annotations

import contextlib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from modelhost.checks.vllm import VllmServer, parse_argv
from modelhost.checks.yamlloc import Node, interpolate, load_yaml, read_env_file

# Model servers, by a word of their image or command (not inside a word: postgis is no tgi).
_SERVER = re.compile(r"(?<![a-z0-9])(vllm|modelhost|llama|ollama|text-generation-inference|"
                     r"text-embeddings-inference|sglang|tgi|tritonserver|openai|localai)"
                     r"(?![a-z0-9])", re.IGNORECASE)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)


def duration_seconds(text: str) -> float | None:
    """A Docker duration ("30s", "5m", "1m30s") in seconds."""
    text = text.strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(a + b for a, b in parts) != text:
        return None
    return sum(float(n) * _SECONDS[unit] for n, unit in parts)


def size_bytes(text: str) -> int | None:
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        return None
    return int(float(match[1]) * 1024 ** " kmgt".index(match[2].lower() or " "))


@dataclass
class Port:
    host_ip: str | None
    published: str | None  # host port or range; None: a random port
    target: str
    protocol: str
    line: int

    @property
    def all_interfaces(self) -> bool:
        return self.host_ip in (None, "", "0.0.0.0", "::", "[::]")

    def localized(self) -> str:
        host = f"{self.published}:" if self.published else ""
        proto = f"/{self.protocol}" if self.protocol != "tcp" else ""
        return f'"127.0.0.1:{host}{self.target}{proto}"'


@dataclass
class Service:
    path: str  # as shown in findings
    folder: Path
    name: str
    node: Node
    env: dict[str, tuple[str, int]] = field(default_factory=dict)  # the container's
    image: str | None = None
    tokens: list[tuple[str, int]] = field(default_factory=list)
    raw_tokens: list[tuple[str, int]] = field(default_factory=list)  # before interpolation
    ports: list[Port] = field(default_factory=list)
    profiles: set[str] = field(default_factory=set)
    gpu_access: bool = False
    gpu_ids: list[str] | None = None  # explicit GPU ids, when known
    gpu_count: int | None = None
    gpu_what: str = ""
    gpu_line: int | None = None
    vllm: VllmServer | None = None
    variables: Mapping[str, str] = field(default_factory=dict)  # for interpolation

    key_line: int = 0  # the line of the service's name

    @property
    def line(self) -> int:
        return self.key_line or self.node.line

    def text(self, key: str) -> str | None:
        node = self.node.get(key)
        return node.scalar() if node is not None else None

    @property
    def is_server(self) -> bool:
        words = " ".join([self.image or "", *(t for t, _ in self.tokens[:3])])
        return self.vllm is not None or bool(_SERVER.search(words))


@dataclass
class ComposeFile:
    path: str
    folder: Path
    root: Node
    variables: Mapping[str, str]
    services: list[Service] = field(default_factory=list)
    undefined: dict[str, int] = field(default_factory=dict)  # variable: first line
    lines: list[str] = field(default_factory=list)

    def interp(self, node: Node | None) -> str | None:
        if node is None:
            return None
        text = node.scalar()
        if text is None:
            return None
        result = interpolate(text, self.variables)
        for name in result.unresolved:
            self.undefined.setdefault(name, node.line)
        return result.text

    def tokens(self, node: Node | None, raw: bool = False) -> list[tuple[str, int]]:
        """A command or entrypoint, as a list or as one string, split like compose does
        (`raw`: before interpolation)."""
        if node is None:
            return []

        def text_of(item: Node) -> str:
            return (item.scalar() if raw else self.interp(item)) or ""

        if isinstance(node.value, list):
            return [(text_of(item), item.line) for item in node.sequence()]
        text = text_of(node)
        try:
            words = shlex.split(text)
        except ValueError:
            words = text.split()
        out, line = [], node.line
        for word in words:
            line = self._find(word, line, max(node.end_line, node.line))
            out.append((word, line))
        return out

    def _find(self, word: str, start: int, end: int) -> int:
        # The line a word of a multi-line command string is on (for pointing at a flag).
        probe = word.split("=", 1)[0]
        for number in range(start, min(len(self.lines), end) + 1):
            if probe in self.lines[number - 1]:
                return number
        return start


def load(path: Path, display: str, environ: Mapping[str, str], text: str) -> ComposeFile:
    """Raises yamlloc.YamlError for a file that is not YAML."""
    root = load_yaml(text, display) or Node({}, 1)
    # Compose takes variables from the shell first, then the .env beside the file.
    variables = {**read_env_file(path.parent / ".env"), **environ}
    compose = ComposeFile(display, path.parent, root, variables, lines=text.splitlines())
    services = root.get("services")
    for name, node in (services.mapping() if services else {}).items():
        if isinstance(node.value, dict):
            service = _service(compose, name, node)
            service.key_line = services.key_line(name) if services else node.line
            if service.vllm is not None:
                service.vllm.line = service.line
            compose.services.append(service)
    return compose


def _service(compose: ComposeFile, name: str, node: Node) -> Service:
    service = Service(compose.path, compose.folder, name, node, variables=compose.variables)
    service.image = compose.interp(node.get("image"))
    service.tokens = compose.tokens(node.get("entrypoint")) + compose.tokens(node.get("command"))
    service.raw_tokens = (compose.tokens(node.get("entrypoint"), raw=True)
                          + compose.tokens(node.get("command"), raw=True))
    profiles = node.get("profiles")
    service.profiles = {p.scalar() or "" for p in profiles.sequence()} if profiles else set()
    _environment(compose, service)
    _ports(compose, service)
    _gpus(compose, service)
    words = " ".join([service.image or "", *(t for t, _ in service.tokens[:4])]).lower()
    if "vllm" in words and "modelhost" not in words:
        args, model = parse_argv(service.tokens)
        service.vllm = VllmServer(
            kind="compose", path=compose.path, line=node.line, name=name,
            model=model[0] if model else service.env.get("VLLM_MODEL", (None, 0))[0],
            model_line=model[1] if model else node.line, args=args, env=service.env,
            gpus=service.gpu_count, gpus_what=service.gpu_what, gpus_line=service.gpu_line,
            local_model=_local_model(compose, node, model[0] if model else None),
            cache_dirs=_mounted_caches(compose, node))
    return service


def _environment(compose: ComposeFile, service: Service) -> None:
    env_files = service.node.get("env_file")
    items = (env_files.sequence() if env_files and isinstance(env_files.value, list)
             else [env_files] if env_files else [])
    for item in items:
        spec = item.get("path") if isinstance(item.value, dict) else item
        name = compose.interp(spec)
        if name:
            for key, value in read_env_file(compose.folder / name).items():
                service.env[key] = (value, item.line)
    environment = service.node.get("environment")
    if environment is None:
        return
    if isinstance(environment.value, dict):
        for key, value_node in environment.mapping().items():
            service.env[key] = (compose.interp(value_node) or "", value_node.line)
    for item in environment.sequence():
        text = compose.interp(item) or ""
        key, eq, value = text.partition("=")
        service.env[key.strip()] = (value if eq else compose.variables.get(key.strip(), ""),
                                    item.line)


def _ports(compose: ComposeFile, service: Service) -> None:
    ports = service.node.get("ports")
    for item in ports.sequence() if ports else []:
        if isinstance(item.value, dict):
            service.ports.append(Port(
                compose.interp(item.get("host_ip")),
                compose.interp(item.get("published")) or None,
                compose.interp(item.get("target")) or "",
                compose.interp(item.get("protocol")) or "tcp", item.line))
            continue
        text = compose.interp(item) or ""
        text, _, protocol = text.partition("/")
        host_ip: str | None
        published: str | None
        if text.startswith("["):  # [::1]:8000:8000
            host_ip, _, rest = text[1:].partition("]:")
            published, _, target = rest.rpartition(":")
        else:
            parts = text.rsplit(":", 2)
            host_ip = parts[0] if len(parts) == 3 else None
            published = parts[-2] if len(parts) >= 2 else None
            target = parts[-1]
        service.ports.append(Port(host_ip, published or None, target, protocol or "tcp",
                                  item.line))


def split_ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _gpus(compose: ComposeFile, service: Service) -> None:
    node = service.node
    counts: list[tuple[int, str, int]] = []
    deploy = node.get("deploy")
    resources = deploy.get("resources") if deploy else None
    reservations = resources.get("reservations") if resources else None
    devices = reservations.get("devices") if reservations else None
    reserved = False
    for device in devices.sequence() if devices else []:
        capabilities = device.get("capabilities")
        caps = {c.scalar() for c in capabilities.sequence()} if capabilities else set()
        if "gpu" not in caps and (compose.interp(device.get("driver")) or "") != "nvidia":
            continue
        service.gpu_access = reserved = True
        id_node = device.get("device_ids")
        count = device.get("count")
        if id_node is not None:
            items = id_node.sequence() if isinstance(id_node.value, list) else [id_node]
            values = [compose.interp(i) or "" for i in items]
            service.gpu_ids = [x for v in values for x in split_ids(v)]
            counts.append((len(items), f"device_ids has {len(items)} entr"
                           + ("y" if len(items) == 1 else "ies"), id_node.line))
        elif count is not None and (compose.interp(count) or "") != "all":
            with contextlib.suppress(ValueError):
                counts.append((int(compose.interp(count) or ""), "count", count.line))
    if node.get("gpus") is not None or (service.text("runtime") or "") == "nvidia":
        service.gpu_access = True
    for var in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        if var not in service.env or (var == "NVIDIA_VISIBLE_DEVICES" and reserved):
            continue
        value, line = service.env[var]
        if value.strip().lower() in ("", "all", "none", "void"):
            continue
        ids = split_ids(value)
        if var == "NVIDIA_VISIBLE_DEVICES" or service.gpu_ids is None:
            service.gpu_ids = ids
        counts.append((len(ids), f"{var}={value}", line))
    if counts:
        service.gpu_count, service.gpu_what, service.gpu_line = min(counts)


def _binds(compose: ComposeFile, node: Node) -> list[tuple[Path, str]]:
    """(host folder, container path) of the service's bind mounts."""
    out = []
    volumes = node.get("volumes")
    for item in volumes.sequence() if volumes else []:
        text = compose.interp(item) if not isinstance(item.value, dict) else \
            f"{compose.interp(item.get('source'))}:{compose.interp(item.get('target'))}"
        source, _, rest = (text or "").partition(":")
        target = rest.split(":", 1)[0]
        if target and source.startswith((".", "/", "~")):
            host = Path(source).expanduser()
            out.append((host if host.is_absolute() else compose.folder / host, target))
    return out


def _mounted_caches(compose: ComposeFile, node: Node) -> list[Path]:
    """Host Hugging Face caches mounted into the container (~/.cache/huggingface:...)."""
    caches = []
    for host, target in _binds(compose, node):
        if "huggingface" in target or target.rstrip("/").endswith("/hub"):
            # Either the hub folder itself or HF_HOME, which holds it.
            caches += [host, host / "hub"]
    return caches


def _local_model(compose: ComposeFile, node: Node, model: str | None) -> Path | None:
    """The host folder of a model given by its path in the container (a bind mount)."""
    if not model or not model.startswith("/"):
        return None
    for host, target in _binds(compose, node):
        if model == target or model.startswith(target.rstrip("/") + "/"):
            return host / model[len(target):].lstrip("/")
    return None


def image_ref(image: str) -> tuple[str, str | None]:
    """(repository, tag or None); a digest counts as a pin."""
    if "@" in image:
        return image.split("@", 1)[0], "@digest"
    head, _, last = image.rpartition("/")
    name, _, tag = last.partition(":")
    return (f"{head}/{name}" if head else name), tag or None
