"""The arms of a benchmark: the fake upstream hit directly, modelhost in front of it (a second
one whose /metrics is scraped meanwhile: `bench.scrape`), and the LiteLLM proxy in front of it
(installed in its own virtual environment)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .loadgen import Target
from .procs import Proc, Procs, free_port, wait_http

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LITELLM_VENV = BENCH / ".venv-litellm"
MODELHOST_KEY = "sk-bench-modelhost"
ADMIN_KEY = "sk-bench-admin"  # what a Prometheus scraping /metrics sends
LITELLM_KEY = "sk-bench-litellm"
UPSTREAM_KEY = "sk-bench-upstream"
SCRAPED = "modelhost (scraped)"  # the arm: a second modelhost, its /metrics scraped


@dataclass
class Arm:
    name: str
    target: Target
    proc: Proc  # whose CPU and memory are measured (the gateway; the upstream for direct)
    # Entered around each of the arm's measured steps: the scraped arm is scraped inside.
    during: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a child: no settings of the developer's own gateway or proxies."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MODELHOST_", "OPENAI_", "LITELLM_", "API_"))
           and k not in ("LAZY_LOAD_MODELS", "LOG_LEVEL", "LOG_DIR", "HTTP_PROXY",
                         "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                "PYTHONUNBUFFERED": "1", **extra})
    return env


def start_upstream(procs: Procs, cpus: set[int] | None) -> Arm:
    port = free_port()
    proc = procs.start("upstream", [sys.executable, "-m", "bench.upstream", "--port", str(port)],
                       env=clean_env(), cpus=cpus, cwd=ROOT)
    wait_http(proc, port, "/health", 30)
    return Arm("direct", Target("direct", port, UPSTREAM_KEY), proc)


def start_modelhost(procs: Procs, workdir: Path, models: list[dict[str, Any]], *,
                    cpus: set[int] | None = None, include_builtin: bool = False,
                    name: str = "modelhost", log_level: str | None = None,
                    env: dict[str, str] | None = None) -> Arm:
    """`python -m modelhost serve --config FILE --port P`, with an API key, as users run it
    (`env`: more settings, e.g. MODELHOST_RAY_ADDRESS)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"include_builtin": include_builtin, "models": models},
                                     sort_keys=False))
    port = free_port()
    extra = {"OPENAI_API_KEYS": MODELHOST_KEY, "MODELHOST_ADMIN_KEYS": ADMIN_KEY,
             "MODELHOST_DATA_DIR": str(workdir / "data"),
             "HF_HUB_OFFLINE": "1", "MODELHOST_STOP_TIMEOUT": "5"}
    if log_level is not None:
        extra["LOG_LEVEL"] = log_level
    extra.update(env or {})
    proc = procs.start(name, [sys.executable, "-m", "modelhost", "serve", "--config",
                              str(config), "--port", str(port)],
                       env=clean_env(**extra), cpus=cpus, cwd=workdir)
    wait_http(proc, port, "/health", 60)
    return Arm("modelhost", Target("modelhost", port, MODELHOST_KEY), proc)


def remote_models(upstream_port: int, names: list[str]) -> list[dict[str, Any]]:
    """modelhost entries routing `names` to the one upstream (backend remote)."""
    return [{"id": name, "backend": "remote",
             "source": {"url": f"http://127.0.0.1:{upstream_port}/v1", "api_key": UPSTREAM_KEY},
             # A remote server takes what it takes: the gateway's per-model queue must not be
             # what the benchmark measures.
             "max_concurrency": 100000, "max_queue": 100000, "idle_ttl": 0}
            for name in names]


class LiteLLMUnavailable(Exception):
    """The LiteLLM arm cannot run here; the message says why."""


def litellm_bin() -> Path:
    return LITELLM_VENV / "bin" / "litellm"


def ensure_litellm(log: Path) -> str:
    """Create bench/.venv-litellm with `litellm[proxy]` when missing; its version."""
    python = LITELLM_VENV / "bin" / "python"
    if not litellm_bin().exists():
        print("installing litellm[proxy] into bench/.venv-litellm (once; a minute or two)",
              flush=True)
        with log.open("ab") as out:
            steps = [[sys.executable, "-m", "venv", "--clear", str(LITELLM_VENV)],
                     # httptools: the HTTP parser uvicorn[standard] brings (modelhost has it),
                     # so that LiteLLM's uvicorn does not fall back to the slower h11.
                     [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                      "litellm[proxy]", "httptools"]]
            for step in steps:
                try:
                    done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT,
                                          timeout=1200, check=False)
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise LiteLLMUnavailable(f"installing litellm failed: {exc}") from exc
                if done.returncode != 0:
                    tail = log.read_text(errors="replace")[-1500:]
                    raise LiteLLMUnavailable(
                        f"`{' '.join(step[2:4])} ...` failed (status {done.returncode}): "
                        f"{tail.strip().splitlines()[-1] if tail.strip() else ''}")
    try:
        version = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise LiteLLMUnavailable(f"litellm is installed but does not import: {exc}") from exc
    return version


def start_litellm(procs: Procs, workdir: Path, upstream_port: int, names: list[str], *,
                  cpus: set[int] | None = None) -> Arm:
    """The LiteLLM proxy: one worker, no callbacks, no telemetry, a master key, no database."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "litellm.yaml"
    config.write_text(yaml.safe_dump({
        "model_list": [{"model_name": name, "litellm_params": {
            "model": f"openai/{name}", "api_base": f"http://127.0.0.1:{upstream_port}/v1",
            "api_key": UPSTREAM_KEY}} for name in names],
        "litellm_settings": {"callbacks": [], "success_callback": [], "failure_callback": [],
                             "telemetry": False, "num_retries": 0, "request_timeout": 60,
                             "set_verbose": False, "json_logs": False},
        "general_settings": {"master_key": LITELLM_KEY, "disable_spend_logs": True,
                             "disable_error_logs": True},
    }, sort_keys=False))
    port = free_port()
    env = clean_env(LITELLM_LOG="ERROR", LITELLM_LOCAL_MODEL_COST_MAP="True",
                    LITELLM_TELEMETRY="False", DISABLE_ADMIN_UI="True",
                    HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = procs.start("litellm", [str(litellm_bin()), "--config", str(config), "--host",
                                   "127.0.0.1", "--port", str(port), "--num_workers", "1"],
                       env=env, cpus=cpus, cwd=workdir)
    try:
        wait_http(proc, port, "/health/liveliness", 180)
    except RuntimeError as exc:
        procs.stop(proc)
        raise LiteLLMUnavailable(f"the LiteLLM proxy did not start: {exc}") from exc
    return Arm("litellm", Target("litellm", port, LITELLM_KEY), proc)


def start_floor(procs: Procs, upstream_port: int, cpus: set[int] | None) -> Arm:
    """A byte-for-byte TCP relay in front of the upstream: the cost of one more process hop."""
    port = free_port()
    proc = procs.start("floor", [sys.executable, "-m", "bench.floor", "--port", str(port),
                                 "--upstream", str(upstream_port)],
                       env=clean_env(), cpus=cpus, cwd=ROOT)
    wait_http(proc, port, "/health", 30)
    return Arm("floor", Target("floor", port, UPSTREAM_KEY), proc)
