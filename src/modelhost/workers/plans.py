"""What a worker is: from a model spec to the command line that serves it."""

from __future__ import annotations

from pathlib import Path

from modelhost.config import Backend, ModelSpec
from modelhost.workers import llamacpp, vllm
from modelhost.workers.process import BackendConfigError, LaunchPlan


def launch_plan(spec: ModelSpec, weights: Path | None, host: str, port: int,
                gpus: list[int], hf_token: str | None = None) -> LaunchPlan:
    plan = _backend_plan(spec, weights, host, port, gpus, hf_token)
    # GPU indices are NVML's (PCI bus order); CUDA must number them the same way.
    plan.env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return plan


def _backend_plan(spec: ModelSpec, weights: Path | None, host: str, port: int,
                  gpus: list[int], hf_token: str | None) -> LaunchPlan:
    if spec.backend is Backend.command:
        assert spec.command is not None
        if weights is None and any("{model_path}" in part for part in spec.command):
            raise BackendConfigError(f"model '{spec.id}': `{{model_path}}` needs a `source`")
        model_path = str(weights) if weights is not None else ""
        argv = [part.replace("{port}", str(port)).replace("{host}", host)
                .replace("{model_path}", model_path) for part in spec.command]
        return LaunchPlan(argv=argv, env={"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))})
    if weights is None:
        raise BackendConfigError(f"model '{spec.id}' has no local weights")
    if spec.backend is Backend.llamacpp:
        return llamacpp.plan(spec, weights, host, port, gpus)
    if spec.backend is Backend.vllm:
        return vllm.plan(spec, weights, host, port, gpus, hf_token)
    raise BackendConfigError(f"backend '{spec.backend}' does not start processes")
