"""llama.cpp worker: llama-cpp-python's OpenAI-compatible server over a GGUF file."""

from __future__ import annotations

import sys
from pathlib import Path

from modelhost.config import HubSource, ModelSpec, Task
from modelhost.workers.flags import snake_flags
from modelhost.workers.process import BackendConfigError, LaunchPlan

# Flags the gateway owns; engine_args may not override them.
RESERVED = {"model", "host", "port", "model_alias"}


def gguf_file(spec: ModelSpec, weights: Path) -> Path:
    if weights.is_file():
        return weights
    patterns = spec.source.files if isinstance(spec.source, HubSource) and spec.source.files \
        else ["*.gguf"]
    found = sorted({p for pat in patterns for p in weights.glob(pat) if p.suffix == ".gguf"})
    # Split GGUF files load from their first part.
    first = [p for p in found if "-00001-of-" in p.name] or found
    if not first:
        raise BackendConfigError(f"model '{spec.id}': no .gguf file in {weights}")
    if len(first) > 1:
        how = "`source.files`" if isinstance(spec.source, HubSource) \
            else "`source.path` pointing at the file"
        raise BackendConfigError(
            f"model '{spec.id}': several .gguf files in {weights}; choose one with "
            f"{how}: {', '.join(p.name for p in first)}")
    return first[0]


def plan(spec: ModelSpec, weights: Path, host: str, port: int,
         gpus: list[int]) -> LaunchPlan:
    # One spelling per key, so that `n-gpu-layers` is seen by the default below.
    args = {k.replace("-", "_"): v for k, v in spec.engine_args.items()}
    clash = RESERVED & set(args)
    if clash:
        raise BackendConfigError(f"model '{spec.id}': engine_args may not set "
                                 f"{', '.join(sorted(clash))} (the gateway sets them)")
    # Offload every layer when the model has GPUs, none when it runs on the CPU.
    args.setdefault("n_gpu_layers", -1 if gpus else 0)
    if spec.task is Task.embedding:
        args.setdefault("embedding", True)
    # llama-cpp-python's server otherwise aborts a running generation when another request
    # arrives; the gateway queues requests instead (max_concurrency).
    args.setdefault("interrupt_requests", False)
    argv = [
        spec.python or sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf_file(spec, weights)),
        "--host", host, "--port", str(port), "--model_alias", spec.id,
        *snake_flags(args),
    ]
    return LaunchPlan(argv=argv, env={"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))})
