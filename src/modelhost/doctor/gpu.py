"""The driver, and the CUDA and vLLM builds the workers will load: `doctor.gpu.driver`,
`doctor.gpu.cuda`, `doctor.gpu.cuda-minor`, `doctor.vllm.install`.

The CUDA a build needs: torch's from its `torch/version.py`; vLLM's from its version's local
tag when it has one (`0.6.3+cu118`), else torch's, since vLLM's default wheels are compiled
with the CUDA of the torch release they pin.
"""

from __future__ import annotations

import re
from pathlib import Path

from modelhost.checks.report import Finding
from modelhost.config import Backend
from modelhost.doctor.context import Context, failed, gib, names, not_applicable, passed
from modelhost.doctor.engines import Environment
from modelhost.doctor.rules import GPU_CUDA, GPU_CUDA_MINOR, GPU_DRIVER, VLLM_INSTALL
from modelhost.workers.vllm import vllm_executable

# Backends whose workers load torch (speech runs CTranslate2, llama.cpp its own CUDA build).
TORCH_BACKENDS = frozenset({Backend.vllm, Backend.embeddings, Backend.diarization})
_CU_TAG = re.compile(r"\+cu(\d+?)(\d)$")  # +cu118 → 11.8, +cu124 → 12.4, +cu128 → 12.8


def check_driver(ctx: Context) -> list[Finding]:
    reading = ctx.gpus
    if reading.available:
        gpus = "; ".join(f"{g.label}: {gib(g.sample.memory_total)}, compute capability "
                         f"{g.capability_text}" for g in reading.gpus)
        return [passed(GPU_DRIVER, f"NVIDIA driver {reading.driver or '(version unknown)'}, "
                                   f"CUDA up to {reading.cuda_text}; {gpus}")]
    if reading.absent:
        message = f"no NVIDIA GPU on this machine: {reading.reason}"
        if ctx.gpu_models:
            message += f" (GPU {names(ctx.gpu_models)}: see doctor.gpu.memory)"
        return [not_applicable(GPU_DRIVER, message)]
    return [failed(GPU_DRIVER, f"the NVIDIA driver does not answer: {reading.reason}",
                   "check `nvidia-smi`; after a driver upgrade, reboot (or reload the nvidia "
                   "kernel modules); run as a user allowed to open /dev/nvidia*")]


def _version(text: str | None) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def _built_for(env: Environment) -> list[tuple[str, tuple[int, int]]]:
    """(what, CUDA version) for each CUDA build in `env`."""
    found = []
    torch_cuda = _version(env.get("torch_cuda"))
    if torch_cuda is not None:
        found.append((f"torch {env.get('torch')} ({env.name})", torch_cuda))
    vllm = env.get("vllm")
    if vllm is not None:
        tag = _CU_TAG.search(vllm)
        cuda = (int(tag.group(1)), int(tag.group(2))) if tag else torch_cuda
        if cuda is not None:
            found.append((f"vLLM {vllm} ({env.name})", cuda))
    return found


def check_cuda(ctx: Context) -> list[Finding]:
    reading = ctx.gpus
    if not reading.available:
        why = f"no NVIDIA GPU on this machine: {reading.reason}"
        return [not_applicable(GPU_CUDA, why), not_applicable(GPU_CUDA_MINOR, why)]
    errors = [f"cannot read {env.name}: {env.error}" for env in ctx.environments.values()
              if env.error is not None]
    cpu_only = [need for need in ctx.gpu_models
                if need.spec.backend in TORCH_BACKENDS
                and ctx.environment(need).get("torch") is not None
                and ctx.environment(need).get("torch_cuda") is None]
    for need in cpu_only:
        env = ctx.environment(need)
        errors.append(f"torch {env.get('torch')} ({env.name}) is a CPU-only build, but "
                      f"model '{need.spec.id}' runs on GPUs with it")
    # Without the driver's CUDA version only the CPU-only builds can be judged.
    builds = [b for env in ctx.environments.values() for b in _built_for(env)] \
        if reading.cuda is not None else []
    limit = reading.cuda or (0, 0)
    driver = f"the driver (CUDA up to {reading.cuda_text})"
    major = [f"{what} needs CUDA {c[0]}.{c[1]}" for what, c in builds if c[0] > limit[0]]
    minor = [f"{what} needs CUDA {c[0]}.{c[1]}" for what, c in builds
             if c[0] == limit[0] and c[1] > limit[1]]
    fix = ("upgrade the NVIDIA driver, or install the builds made for the driver's CUDA "
           "(e.g. pip install torch --index-url https://download.pytorch.org/whl/cuXYZ)")
    seen = "; ".join(f"{what}: CUDA {c[0]}.{c[1]}" for what, c in builds)
    findings = []
    if errors or major:
        findings.append(failed(GPU_CUDA, "; ".join(
            errors + ([f"{', '.join(major)}, newer than {driver}"] if major else [])), fix))
    elif builds:
        findings.append(passed(GPU_CUDA, f"{driver} runs {seen}"))
    else:
        findings.append(not_applicable(GPU_CUDA, _no_builds(ctx)))
    if minor:
        findings.append(failed(GPU_CUDA_MINOR, f"{', '.join(minor)}, newer than {driver}: "
                                               "it runs through CUDA minor-version "
                                               "compatibility, without PTX JIT", fix))
    elif builds:
        findings.append(passed(GPU_CUDA_MINOR, f"no build needs a newer CUDA than {driver}"))
    else:
        findings.append(not_applicable(GPU_CUDA_MINOR, _no_builds(ctx)))
    return findings


def _no_builds(ctx: Context) -> str:
    if ctx.gpus.cuda is None:
        return "the driver does not say which CUDA it supports"
    cpu = [f"torch {env.get('torch')} ({env.name})" for env in ctx.environments.values()
           if env.get("torch") is not None]
    if cpu:
        return f"no CUDA build of torch or vLLM is installed ({', '.join(cpu)}: CPU only)"
    return "neither torch nor vLLM is installed"


def _public(version: str | None) -> str | None:
    return version.split("+", 1)[0] if version else None


def check_vllm(ctx: Context) -> list[Finding]:
    models = ctx.vllm_models
    if not models:
        return [not_applicable(VLLM_INSTALL, "no vLLM model configured")]
    findings = []
    for python in sorted({n.spec.python for n in models}, key=lambda p: p or ""):
        users = [n for n in models if n.spec.python == python]
        env = ctx.environments[python]
        who = names(users)
        if env.error is not None:
            findings.append(failed(VLLM_INSTALL, f"{who}: cannot read {env.name}: {env.error}",
                                   "point `python:` at an interpreter that runs"))
            continue
        vllm, torch, pinned = env.get("vllm"), env.get("torch"), env.get("vllm_torch")
        script = Path(vllm_executable(python))
        if vllm is None:
            findings.append(failed(
                VLLM_INSTALL, f"vLLM is not installed in {env.name} ({who})",
                "pip install vllm in that environment (`pip install modelhost[vllm]`), or "
                "point the models' `python:` at the interpreter of the environment that has "
                "it"))
        elif torch is None or (pinned is not None and _public(torch) != _public(pinned)):
            findings.append(failed(
                VLLM_INSTALL, f"vLLM {vllm} in {env.name} was built against torch "
                f"{pinned or '(unknown)'}, but {'torch ' + torch if torch else 'no torch'} "
                f"is installed ({who})",
                f"pip install torch=={pinned}" if pinned else "pip install vllm again"))
        elif not script.exists():
            findings.append(failed(
                VLLM_INSTALL, f"vLLM {vllm} is installed in {env.name}, but its `vllm` "
                f"command is not beside the interpreter ({script}), where the worker of "
                f"{who} is started from",
                "point the models' `python:` at the interpreter inside the environment "
                "(its bin/python), not at a link to another one"))
        else:
            findings.append(passed(VLLM_INSTALL, f"vLLM {vllm} with torch {torch} in "
                                                 f"{env.name} ({who})"))
    return findings
