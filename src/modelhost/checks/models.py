"""modelhost's own configuration: the models file (its vLLM models through the vLLM rules,
start timeouts) and the process settings (a public address without keys)."""

from __future__ import annotations

import re
from pathlib import Path

from modelhost.checks import rules as R
from modelhost.checks.envfile import readable_by_others
from modelhost.checks.report import Finding
from modelhost.checks.secrets import SECRET_NAME
from modelhost.checks.vllm import Arg, VllmServer, needed_start_seconds
from modelhost.checks.vllm import check as check_vllm
from modelhost.checks.yamlloc import Node, YamlError, load_yaml
from modelhost.config import (
    Backend,
    ConfigError,
    HubSource,
    PathSource,
    UrlSource,
    load_models_file,
)
from modelhost.settings import Settings, is_loopback


def looks_like_models_file(root: Node | None) -> bool:
    return root is not None and isinstance(root.value, dict) and (
        "models" in root.value or "include_builtin" in root.value) and "services" not in \
        root.value

def check(path: Path, text: str, display: str, cache_dirs: list[Path]) -> list[Finding]:
    try:
        root = load_yaml(text, display)
    except YamlError as exc:
        return [Finding(R.INPUT_UNREADABLE, str(exc), fix="Fix the syntax at the line named.",
                        path=display, line=exc.line)]
    try:
        models_file = load_models_file(path)
    except ConfigError as exc:
        return [Finding(R.MODELS_INVALID, str(exc).replace(str(path), display),
                        fix=f"Run `modelhost config validate {display}` and fix each field "
                        "named.", path=display, line=_error_line(str(exc), root))]
    entries = root.get("models") if root is not None else None
    nodes = entries.sequence() if entries is not None else []
    out: list[Finding] = []
    has_secret = False
    for index, spec in enumerate(models_file.models):
        node = nodes[index] if index < len(nodes) else Node({}, 1)
        if isinstance(spec.source, UrlSource) and spec.source.api_key:
            has_secret = True
        if any(SECRET_NAME.search(k) and v for k, v in spec.env.items()):
            has_secret = True
        if spec.backend is not Backend.vllm:
            continue
        engine = node.get("engine_args")
        args = {key.replace("-", "_"): Arg(
            None if value is True else str(value).lower() if isinstance(value, bool)
            else str(value), engine.key_line(key) if engine is not None else node.line, key)
            for key, value in spec.engine_args.items() if value is not None
            and value is not False}
        gpus = len(spec.gpus) if spec.gpus is not None else spec.gpu_count
        args.setdefault("tensor_parallel_size", Arg(str(gpus), node.line, "tensor_parallel_size"))
        source = spec.source
        model = source.hf if isinstance(source, HubSource) else \
            str(source.path) if isinstance(source, PathSource) else None
        local = None
        if isinstance(source, PathSource):
            local = source.path if source.path.is_absolute() else path.parent / source.path
        server = VllmServer(
            kind="models", path=display, line=node.line, name=spec.id, model=model,
            model_line=node.key_line("source"), args=args,
            env={k: (v, node.key_line("env")) for k, v in spec.env.items()},
            gpus=gpus or None, gpus_what="gpus", gpus_line=node.key_line("gpus"),
            local_model=local,
            revision=source.revision if isinstance(source, HubSource) else "main")
        # engine_args lines are those of the keys; the vLLM rules then point at them.
        out += check_vllm(server, cache_dirs)
        needed = needed_start_seconds(model or spec.id)
        if spec.start_timeout < needed:
            out.append(Finding(
                R.START_TIMEOUT, f"model {spec.id} has start_timeout {spec.start_timeout:g}s; "
                f"loading it takes about {needed}s",
                fix="Give the worker time to load.", replacement=f"start_timeout: {needed}",
                path=display, line=node.key_line("start_timeout")))
    if has_secret and readable_by_others(path):
        out.append(Finding(
            R.ENV_PERMISSIONS, f"{display} holds api keys or secret env values and is "
            "readable by other users",
            fix=f"chmod 600 {display} (the gateway's user only).", path=display, line=1))
    return out

def _error_line(message: str, root: Node | None) -> int | None:
    """The line of the model a validation message names."""
    match = re.search(r"model '([^']+)'", message)
    if root is None or match is None:
        return None
    entries = root.get("models")
    for node in entries.sequence() if entries is not None else []:
        id_node = node.get("id")
        if id_node is not None and id_node.scalar() == match[1]:
            return id_node.line
    return None


def check_settings(settings: Settings) -> list[Finding]:
    out: list[Finding] = []
    if not (settings.api_keys or settings.admin_api_keys or is_loopback(settings.api_host)):
        out.append(Finding(
            R.EXPOSED, f"API_HOST is {settings.api_host} and no key is configured"
            + (" (MODELHOST_INSECURE_NO_AUTH is set)" if settings.insecure_no_auth else ""),
            fix="Set OPENAI_API_KEYS and MODELHOST_ADMIN_KEYS, or listen on 127.0.0.1 "
            "behind a reverse proxy.", replacement="API_HOST=127.0.0.1",
            path="(environment)"))
    if settings.admin_allow_code and not is_loopback(settings.api_host):
        out.append(Finding(
            R.ALLOW_CODE, f"MODELHOST_ADMIN_ALLOW_CODE is on and API_HOST is "
            f"{settings.api_host}",
            fix="Declare what runs code in the models file (and `modelhost reload`) instead, "
            "or keep the admin API on loopback.", replacement="MODELHOST_ADMIN_ALLOW_CODE=0",
            path="(environment)"))
    if "*" in settings.allowed_host_names:
        out.append(Finding(
            R.ANY_HOST, "MODELHOST_ALLOWED_HOSTS accepts any host name (*)",
            fix="List the names clients use (e.g. llm.example.com, .example.com).",
            path="(environment)"))
    url = settings.database_url
    if url is not None and settings.secret_key is None and _shared(url):
        out.append(Finding(
            R.SHARED_NO_KEY, "MODELHOST_DATABASE_URL is not SQLite (gateways may share it) "
            "and MODELHOST_SECRET_KEY is not set",
            fix="Set the same MODELHOST_SECRET_KEY on every gateway (at least 32 random "
            "characters: openssl rand -base64 32).", path="(environment)"))
    if not is_loopback(settings.worker_host):
        out.append(Finding(
            R.WORKER_EXPOSED, f"MODELHOST_WORKER_HOST is {settings.worker_host}: workers "
            "listen there with no key",
            fix="Keep it on a private network that only the gateways reach (a firewall "
            "letting only the gateways' addresses in), or on 127.0.0.1 when the gateways "
            "share one machine.", replacement="MODELHOST_WORKER_HOST=127.0.0.1",
            path="(environment)"))
    if settings.config_file is not None and not settings.config_file.is_file():
        out.append(Finding(
            R.MODELS_MISSING, f"MODELHOST_CONFIG is {settings.config_file}, which does not "
            "exist", fix="Point MODELHOST_CONFIG at the models file.", path="(environment)"))
    return out


def _shared(url: str) -> bool:
    """Whether a state database URL may be shared by several gateways (not SQLite)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from modelhost.db.engine import is_sqlite

    try:
        return not is_sqlite(make_url(url))
    except ArgumentError:  # not a URL: the gateway refuses it at start, saying why
        return False
