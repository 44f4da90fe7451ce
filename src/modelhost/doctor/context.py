"""What every doctor check reads: the host (its file system root, environment and NVML),
the settings, the configured models' needs and the GPUs, read once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelhost.checks.report import Finding, Outcome, Rule
from modelhost.doctor.engines import Environment
from modelhost.doctor.needs import ModelNeed
from modelhost.doctor.nvml import GpuReading
from modelhost.settings import Settings

GIB = 1024**3


@dataclass(frozen=True)
class Host:
    """Where the checks look. The defaults are this machine; tests give a folder standing
    for `/` (with its own `.dockerenv`, `dev/shm`, ...), an environment, and a stand-in for
    the NVIDIA driver."""

    root: Path = Path("/")
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    nvml: Any = None  # a pynvml-like module; None: pynvml
    sys_path: tuple[str, ...] | None = None  # the gateway's packages; None: sys.path

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")


@dataclass(frozen=True)
class Context:
    settings: Settings
    host: Host
    needs: list[ModelNeed]
    gpus: GpuReading
    # Where workers run from, by interpreter: None is the gateway's own, else a model's
    # `python:` (only GPU models' are read).
    environments: Mapping[str | None, Environment]

    @property
    def gpu_models(self) -> list[ModelNeed]:
        return [n for n in self.needs if n.gpu_count > 0]

    @property
    def vllm_models(self) -> list[ModelNeed]:
        return [n for n in self.needs if n.is_vllm]

    def environment(self, need: ModelNeed) -> Environment:
        return self.environments[need.spec.python]


def passed(rule: Rule, message: str) -> Finding:
    return Finding(rule, message, outcome=Outcome.PASSED)


def failed(rule: Rule, message: str, fix: str = "") -> Finding:
    return Finding(rule, message, fix=fix, outcome=Outcome.FAILED)


def not_applicable(rule: Rule, message: str) -> Finding:
    return Finding(rule, message, outcome=Outcome.NOT_APPLICABLE)


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def names(needs: list[ModelNeed]) -> str:
    """"model 'a'" or "models 'a', 'b'"."""
    listed = ", ".join(f"'{n.spec.id}'" for n in needs)
    return f"model {listed}" if len(needs) == 1 else f"models {listed}"
