"""What the admin API may set in a model spec (docs/admin-api.md, "What the API may set").

Two rules, applied to specs given through `PUT /api/admin/models/{id}` only (the models file
is the operator's and is not restricted):

* **Code on the host is the operator's.** `backend: command`, `python`, `env`, a local
  `source.path`, a `source.package` outside a plain package folder, and the engine arguments
  that run or import code, or load or write files on the host (`CODE_ARGS`, `FILE_ARGS`,
  any value that is a local path or looks like a flag) are refused with 400, unless
  `MODELHOST_ADMIN_ALLOW_CODE=true`.
* **No server-side request forgery.** A `remote` URL's host is resolved and every address it
  resolves to must be a public one: no loopback, link-local, private, shared (CGNAT),
  unspecified, multicast or reserved address, IPv4 inside IPv6 forms (mapped, 6to4, Teredo,
  NAT64) included, unless `MODELHOST_REMOTE_ALLOW` lists its network (`10.0.0.0/8`) or its
  host name (`gpu-box.lan`, `.corp.example` for a domain). The check is made again at every
  load; the load's readiness probe and then the relay connect only to the addresses that
  passed it (`workers.launchers.RemoteLauncher`); redirects are never followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from modelhost.config import Backend, ModelSpec, PackageSource, PathSource, UrlSource
from modelhost.errors import InvalidRequest

ALLOW_CODE = "MODELHOST_ADMIN_ALLOW_CODE=true"
ALLOW_REMOTE = "MODELHOST_REMOTE_ALLOW"
RESOLVE_TIMEOUT = 5.0

# Engine arguments (vLLM, llama-cpp-python, modelhost's worker apps; `-` and `_` alike) that
# run or import code chosen by the caller.
CODE_ARGS = frozenset({
    "trust_remote_code", "code_revision",
    # vLLM: classes or modules imported by name, plugins loaded from a file.
    "worker_cls", "worker_extension_cls", "scheduler_cls", "logits_processors",
    "logits_processor_pattern", "tool_parser_plugin", "reasoning_parser_plugin",
    "middleware", "io_processor_plugin", "kv_transfer_config", "kv_events_config",
    "model_loader_extra_config", "compilation_config", "enable_prompt_embeds",
})
# Engine arguments that read or write files on the host, or reach other hosts.
FILE_ARGS = frozenset({
    # vLLM
    "config", "tokenizer", "download_dir", "chat_template", "allowed_local_media_path",
    "ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "lora_modules", "prompt_adapters",
    "speculative_config", "qlora_adapter_name_or_path", "generation_config",
    "otlp_traces_endpoint", "uds", "log_config_file", "collect_detailed_traces",
    # llama-cpp-python
    "config_file", "lora_base", "lora_path", "clip_model_path", "hf_tokenizer_config_path",
    "hf_pretrained_model_name_or_path", "hf_model_repo_id", "draft_model", "rpc_servers",
    "cache_type", "cache_dir",
})
# vLLM's `distributed_executor_backend` also takes a class to import; these are its names.
EXECUTOR_BACKENDS = frozenset({"mp", "ray", "uni", "external_launcher"})
# vLLM load formats that read weights from where they are (not from the model's folder).
LOAD_FORMATS = frozenset({"auto", "pt", "safetensors", "npcache", "dummy", "gguf",
                          "bitsandbytes", "mistral", "fastsafetensors"})
ARG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
PACKAGE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _refuse(field: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"`{field}` {why}: only the models file may set it, unless the "
                          f"operator sets {ALLOW_CODE}", param=field)


def _local_path(value: str) -> bool:
    return value.startswith(("/", "~", "./", "file:")) or value == "." or value == ".." \
        or value.startswith("../") or "/../" in value or value.endswith("/..") \
        or "\\" in value


def _arg_values(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for item in value for v in _arg_values(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _arg_values(item)]
    return []


def check_code(spec: ModelSpec) -> None:
    """Refuse (400) what would run code or reach files on the host, in a spec from the API."""
    if spec.backend is Backend.command:
        raise _refuse("backend", "'command' runs a command on the host")
    if spec.python is not None:
        raise _refuse("python", "chooses the interpreter that runs on the host")
    if spec.env:
        raise _refuse("env", "sets the environment of a process on the host")
    if isinstance(spec.source, PathSource):
        raise _refuse("source.path", "reads a file or folder of the host")
    if isinstance(spec.source, PackageSource):
        file = spec.source.file
        if not PACKAGE.fullmatch(spec.source.package):
            # find_spec imports the parents of a dotted name: their code runs.
            raise _refuse("source.package", "must be a top-level package name")
        if file.startswith(("/", "~")) or "\\" in file or "\0" in file or \
                ".." in file.split("/"):
            raise _refuse("source.file", "leaves the package folder")
    for key, value in spec.engine_args.items():
        name = key.replace("-", "_").lower()
        field = f"engine_args.{key}"
        if not ARG_NAME.fullmatch(key):
            raise InvalidRequest(f"`{field}`: an engine argument's name is letters, digits, "
                                 "'_' and '-'", param="engine_args")
        if name in CODE_ARGS and value not in (None, False, "", "false", "False", 0):
            raise _refuse(field, "runs or imports code on the host")
        if name in FILE_ARGS and value not in (None, False, ""):
            raise _refuse(field, "reads or writes files on the host, or reaches other hosts")
        if name == "distributed_executor_backend" and value not in EXECUTOR_BACKENDS:
            raise _refuse(field, "other than " + ", ".join(sorted(EXECUTOR_BACKENDS)) +
                          " imports a class")
        if name == "load_format" and value not in LOAD_FORMATS:
            raise _refuse(field, "other than " + ", ".join(sorted(LOAD_FORMATS)) +
                          " loads weights from elsewhere")
        for item in _arg_values(value):
            if item.startswith("-"):
                raise InvalidRequest(f"`{field}`: a value may not start with '-' (it would "
                                     "be read as another flag)", param=field)
            if _local_path(item):
                raise _refuse(field, "names a path on the host")


# --------------------------------------------------------------------------- remote URLs


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")
LOOPBACK4 = ipaddress.IPv4Address("127.0.0.1")
LOOPBACK6 = ipaddress.IPv6Address("::1")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def public_address(ip: Address) -> bool:
    """An address on the internet: not loopback, link-local, private, shared, unspecified,
    multicast or reserved (nor such an IPv4 address inside an IPv6 one)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None and not public_address(inner):
            return False
    return ip.is_global and not (ip.is_loopback or ip.is_link_local or ip.is_private or
                                 ip.is_unspecified or ip.is_multicast or ip.is_reserved)


class RemoteRefused(InvalidRequest):
    """A remote URL that the API may not point at."""


@dataclass(frozen=True)
class RemotePolicy:
    """Where `remote` URLs from the admin API may point (settings.remote_allow_list)."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hosts: tuple[str, ...] = ()

    @classmethod
    def parse(cls, entries: list[str]) -> RemotePolicy:
        networks = []
        hosts = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                hosts.append(entry.lower().rstrip("."))
        return cls(tuple(networks), tuple(hosts))

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == h or (h.startswith(".") and (host.endswith(h) or host == h[1:]))
                   for h in self.hosts)

    def address_allowed(self, ip: Address) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and \
                any(ip.ipv4_mapped in n for n in self.networks):
            return True
        if ip.is_loopback and any(LOOPBACK4 in n or LOOPBACK6 in n for n in self.networks):
            # Loopback is one place: allowing 127.0.0.1 (or ::1) allows the other, so that
            # `localhost` works whether it resolves to one or both.
            return True
        return public_address(ip) or any(ip in n for n in self.networks)

    async def check(self, url: str, field: str = "source.url") -> list[str]:
        """Refuse (400) a URL whose host is, or resolves to, an address not allowed; return
        the addresses it resolves to (empty for an allowed host name)."""
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError:
            raise RemoteRefused("the remote URL cannot be parsed", param=field) from None
        if not host:
            raise RemoteRefused("the remote URL has no host", param=field)
        if parts.scheme not in ("http", "https"):
            raise RemoteRefused("the remote URL must be http:// or https://", param=field)
        if self.host_allowed(host):
            return []
        port = port or (443 if parts.scheme == "https" else 80)
        addresses = await self.resolve(host, port, field)
        return [str(a) for a in addresses]

    async def resolve(self, host: str, port: int, field: str = "source.url") -> list[Address]:
        """Every address `host` resolves to, all allowed (or RemoteRefused)."""
        try:
            literal: Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            found = [literal]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
            except (OSError, TimeoutError, UnicodeError):
                raise RemoteRefused(f"the remote host '{host}' cannot be resolved (a remote "
                                    "URL given through the admin API must resolve to public "
                                    "addresses)", param=field) from None
            found = []
            for info in infos:
                text = str(info[4][0]).split("%", 1)[0]
                found.append(ipaddress.ip_address(text))
        bad = [ip for ip in found if not self.address_allowed(ip)]
        if bad or not found:
            what = f"'{host}'" if literal is not None else f"'{host}' (resolves to {bad[0]})"
            raise RemoteRefused(
                f"the remote host {what} is a loopback, link-local, private or reserved "
                f"address: a remote URL given through the admin API must point at a public "
                f"address, unless the operator allows it in {ALLOW_REMOTE}", param=field)
        return found


def remote_url(spec: ModelSpec) -> str | None:
    return spec.source.url if isinstance(spec.source, UrlSource) else None
