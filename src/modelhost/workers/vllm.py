"""vLLM worker: `vllm serve` with the model's engine arguments.

The seed deployment's parameters map one to one onto engine_args, e.g.::

    engine_args:
      max_model_len: 131072
      quantization: awq_marlin
      gpu_memory_utilization: 0.9
      distributed_executor_backend: mp
      swap_space: 16
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from modelhost.config import ModelSpec
from modelhost.workers.flags import kebab_flags
from modelhost.workers.process import BackendConfigError, LaunchPlan

RESERVED = {"host", "port", "served_model_name", "model"}


def vllm_executable(python: str | None) -> str:
    """The `vllm` script beside the interpreter that has vLLM installed."""
    interpreter = Path(python or sys.executable)
    return str(interpreter.parent / "vllm")


def plan(spec: ModelSpec, weights: Path, host: str, port: int,
         gpus: list[int], hf_token: str | None = None) -> LaunchPlan:
    args = {k.replace("-", "_"): v for k, v in spec.engine_args.items()}
    clash = RESERVED & set(args)
    if clash:
        raise BackendConfigError(f"model '{spec.id}': engine_args may not set "
                                 f"{', '.join(sorted(clash))} (the gateway sets them)")
    if not gpus:
        raise BackendConfigError(f"model '{spec.id}': the vllm backend needs an NVIDIA GPU "
                                 "(pin `gpus:` or set `gpu_count:`)")
    tp = int(args.pop("tensor_parallel_size", len(gpus)))
    if tp != len(gpus):
        raise BackendConfigError(f"model '{spec.id}': tensor_parallel_size={tp} but "
                                 f"{len(gpus)} GPU(s) were given; they must agree")
    if tp > 1:
        # Multiprocessing, not Ray, within one machine (the seed audit's recommendation).
        args.setdefault("distributed_executor_backend", "mp")
    argv = [
        vllm_executable(spec.python), "serve", str(weights),
        "--host", host, "--port", str(port),
        "--served-model-name", *spec.names,
        "--tensor-parallel-size", str(tp),
        *kebab_flags(args),
    ]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)),
           # Weights are already local; vLLM must not reach for the hub.
           "HF_HUB_OFFLINE": "1"}
    if hf_token:
        env["HF_TOKEN"] = hf_token
    if "VLLM_WORKER_MULTIPROC_METHOD" not in os.environ:
        env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    return LaunchPlan(argv=argv, env=env, probe_path="/health")
