"""Run every doctor check and gather the findings into one report."""

from __future__ import annotations

import socket
from collections.abc import Callable

from modelhost.catalog import Catalog
from modelhost.checks.report import Finding, Report
from modelhost.config import ConfigError, ModelsFile
from modelhost.doctor.context import Context, Host, failed, passed
from modelhost.doctor.engines import Environment, other_environment, own_environment
from modelhost.doctor.files import check_dirs, check_disk
from modelhost.doctor.fit import check_capability, check_memory
from modelhost.doctor.gpu import check_cuda, check_driver, check_vllm
from modelhost.doctor.needs import model_needs
from modelhost.doctor.network import check_ports
from modelhost.doctor.nvml import read_host
from modelhost.doctor.rules import CONFIG
from modelhost.doctor.system import check_container, check_shm
from modelhost.doctor.token import check_token
from modelhost.settings import Settings

CHECKS: tuple[Callable[[Context], list[Finding]], ...] = (
    check_driver, check_cuda, check_vllm, check_memory, check_capability, check_container,
    check_shm, check_disk, check_dirs, check_ports, check_token,
)


def _catalog(settings: Settings) -> tuple[Catalog, Finding]:
    path = settings.config_file
    if path is None:
        catalog = Catalog.build(ModelsFile())
        return catalog, passed(CONFIG, f"no models file: the {len(catalog.models)} built-in "
                                       "model(s)")
    try:
        catalog = Catalog.from_file(path)
    except ConfigError as exc:
        # The other checks still run, against the built-in models.
        return Catalog.build(ModelsFile()), failed(
            CONFIG, f"{exc} (the checks below used the built-in models only)",
            f"fix the file (`modelhost config validate {path}` says the same)")
    return catalog, passed(CONFIG, f"{path}: {len(catalog.models)} model(s), built-in "
                                   "included")


def diagnose(settings: Settings, host: Host | None = None) -> Report:
    """Check this host (or `host`) for the gateway `settings` describe."""
    host = host or Host()
    catalog, loaded = _catalog(settings)
    needs = model_needs(catalog.models, settings.model_cache_dir)
    environments: dict[str | None, Environment] = {
        None: own_environment(list(host.sys_path) if host.sys_path is not None else None)}
    for need in needs:
        python = need.spec.python
        if python is not None and python not in environments and \
                (need.gpu_count > 0 or need.is_vllm):
            environments[python] = other_environment(python)
    ctx = Context(settings, host, needs, read_host(host.nvml), environments)
    findings = [loaded]
    for check in CHECKS:
        findings.extend(check(ctx))
    inputs = [f"host {socket.gethostname()}"]
    if settings.config_file is not None:
        inputs.append(str(settings.config_file))
    return Report("doctor", findings, inputs)
