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

from modelhost.checks import rules as R
from modelhost.checks import secrets
from modelhost.checks.report import Finding
from modelhost.checks.vllm import VllmServer, needed_start_seconds, parse_argv
from modelhost.checks.yamlloc import Node, interpolate, load_yaml, read_env_file

_SERVER = re.compile(r"vllm|modelhost|llama|ollama|text-generation-inference|sglang|tgi|"
                     r"triton|openai", re.IGNORECASE)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_KEY_VARS = ("VLLM_API_KEY", "OPENAI_API_KEYS", "MODELHOST_OPENAI_API_KEYS",
             "MODELHOST_ADMIN_KEYS", "API_KEY")


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
            line = self._find(word, line)
            out.append((word, line))
        return out

    def _find(self, word: str, start: int) -> int:
        # The line a word of a multi-line command string is on (for pointing at a flag).
        probe = word.split("=", 1)[0]
        for number in range(start, min(len(self.lines), start + 200) + 1):
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
            local_model=_local_model(compose, node, model[0] if model else None))
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


def _split_ids(text: str) -> list[str]:
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
            service.gpu_ids = [x for v in values for x in _split_ids(v)]
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
        ids = _split_ids(value)
        if var == "NVIDIA_VISIBLE_DEVICES" or service.gpu_ids is None:
            service.gpu_ids = ids
        counts.append((len(ids), f"{var}={value}", line))
    if counts:
        service.gpu_count, service.gpu_what, service.gpu_line = min(counts)


def _local_model(compose: ComposeFile, node: Node, model: str | None) -> Path | None:
    """The host folder of a model given by its path in the container (a bind mount)."""
    if not model or not model.startswith("/"):
        return None
    volumes = node.get("volumes")
    for item in volumes.sequence() if volumes else []:
        text = compose.interp(item) if not isinstance(item.value, dict) else \
            f"{compose.interp(item.get('source'))}:{compose.interp(item.get('target'))}"
        source, _, rest = (text or "").partition(":")
        target = rest.split(":", 1)[0]
        if target and source.startswith((".", "/", "~")) and \
                (model == target or model.startswith(target.rstrip("/") + "/")):
            host = Path(source).expanduser()
            host = host if host.is_absolute() else compose.folder / host
            return host / model[len(target):].lstrip("/")
    return None


# --------------------------------------------------------------------------- per service rules

def image_ref(image: str) -> tuple[str, str | None]:
    """(repository, tag or None); a digest counts as a pin."""
    if "@" in image:
        return image.split("@", 1)[0], "@digest"
    head, _, last = image.rpartition("/")
    name, _, tag = last.partition(":")
    return (f"{head}/{name}" if head else name), tag or None


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
        seconds = duration_seconds(start.scalar() or "") if start is not None else 0.0
        needed = _needed(service)
        if seconds is not None and seconds < needed:
            out.append(Finding(
                R.HEALTHCHECK_START, f"healthcheck start_period is "
                f"{start.scalar() if start is not None else 'not set (0s)'} for "
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
                parts = _split_ids(value) or [str(n) for n in range(tp or 1)]
                out.append(Finding(
                    R.GPU_DEVICE_IDS, f"device_ids entry {raw!r} is one id "
                    f"({value!r}), not {len(parts)} GPU id(s)",
                    fix="List each GPU id as its own item (or reserve by count).",
                    replacement="device_ids: [" + ", ".join(f"'{p}'" for p in parts) + "]",
                    path=path, line=item.line))
    return out

