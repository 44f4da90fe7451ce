"""What a worker is: from a model spec to the command line that serves it.

Where the worker runs (a local process, a remote server, later another machine) is a
launcher's (`launchers`); this module only says what to run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from modelhost.config import Backend, ModelSpec
from modelhost.workers import llamacpp, vllm
from modelhost.workers.flags import kebab_flags
from modelhost.workers.process import BackendConfigError, LaunchPlan


def launch_plan(spec: ModelSpec, weights: Path | None, host: str, port: int,
                gpus: list[int], hf_token: str | None = None,
                max_audio_seconds: float | None = None) -> LaunchPlan:
    plan = _backend_plan(spec, weights, host, port, gpus, hf_token, max_audio_seconds)
    # GPU indices are NVML's (PCI bus order); CUDA must number them the same way.
    plan.env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return plan


def _backend_plan(spec: ModelSpec, weights: Path | None, host: str, port: int,
                  gpus: list[int], hf_token: str | None,
                  max_audio_seconds: float | None) -> LaunchPlan:
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
    if spec.backend in (Backend.speech, Backend.embeddings, Backend.diarization):
        return _app_plan(spec, weights, host, port, gpus, max_audio_seconds)
    raise BackendConfigError(f"backend '{spec.backend}' does not start processes")


def _app_plan(spec: ModelSpec, weights: Path, host: str, port: int,
              gpus: list[int], max_audio_seconds: float | None = None) -> LaunchPlan:
    """One of modelhost's own worker apps (workers/apps/): speech, embeddings, diarization.
    The audio apps (speech, Canary through it, diarization) get `--max-audio-seconds`
    (settings.max_audio_seconds) unless the model's engine_args set their own."""
    clash = {"model", "host", "port", "served_name"} & \
        {k.replace("-", "_") for k in spec.engine_args}
    if clash:
        raise BackendConfigError(f"model '{spec.id}': engine_args may not set "
                                 f"{', '.join(sorted(clash))} (the gateway sets them)")
    args = dict(spec.engine_args)
    args.setdefault("device", "cuda" if gpus else "cpu")
    if max_audio_seconds is not None and spec.backend in (Backend.speech, Backend.diarization) \
            and not any(k.replace("-", "_") == "max_audio_seconds" for k in args):
        args["max_audio_seconds"] = max_audio_seconds
    argv = [spec.python or sys.executable, "-m", f"modelhost.workers.apps.{spec.backend.value}",
            "--model", str(weights), "--host", host, "--port", str(port),
            "--served-name", spec.id, *kebab_flags(args)]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)), "HF_HUB_OFFLINE": "1"}
    return LaunchPlan(argv=argv, env=env)
