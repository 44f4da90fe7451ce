"""Each GPU model against the GPUs: memory (`doctor.gpu.memory`, `doctor.gpu.free-memory`)
and compute capability (`doctor.gpu.capability`, `doctor.gpu.kernels`).

Memory is what the scheduler would ask (`gpu/placement.py:estimate_bytes_per_gpu`, from the
weights on disk or their listed size): a model must fit on GPUs of that size (an error when
it never can) and, to start now, in their free memory (a warning: other programs may free
it). A model pinned to `gpus:` is checked on those; one with `gpu_count: n` needs n GPUs
that qualify.

Compute capability: the least that vLLM's kernels for a model need (`required_capability`);
models of other backends are not checked. The scheduler places by memory only, so with
`gpu_count` every GPU of the machine large enough for the model must qualify, or the model
be pinned to those that do.
"""

from __future__ import annotations

from modelhost.checks.report import Finding
from modelhost.doctor.context import Context, failed, gib, not_applicable, passed
from modelhost.doctor.needs import ModelNeed
from modelhost.doctor.nvml import Gpu
from modelhost.doctor.rules import GPU_CAPABILITY, GPU_FREE, GPU_KERNELS, GPU_MEMORY
from modelhost.gpu.placement import PlacementError, estimate_bytes_per_gpu

# vLLM's kernels: the least compute capability for each quantization method (each
# method's get_min_capability() in vLLM; Marlin kernels need Ampere).
VLLM_DEFAULT = (7, 0)
QUANTIZATION = {
    "awq": (7, 5), "awq_marlin": (8, 0), "gptq": (6, 0), "gptq_marlin": (8, 0),
    "gptq_marlin_24": (8, 0), "marlin": (8, 0), "fp8": (8, 0), "compressed-tensors": (7, 0),
    "bitsandbytes": (7, 0), "gguf": (6, 0),
}
BF16 = (8, 0)  # bfloat16 arithmetic
MARLIN = (8, 0)


def required_capability(need: ModelNeed) -> tuple[tuple[int, int], str]:
    """The least compute capability a vLLM model needs, and why."""
    least, why = VLLM_DEFAULT, "vLLM needs compute capability 7.0"
    quantization = need.quantization
    if quantization is not None and QUANTIZATION.get(quantization, (0, 0)) > least:
        least = QUANTIZATION[quantization]
        why = f"quantization {quantization} needs compute capability {_cc(least)}"
    dtype = str(need.engine_arg("dtype") or "").lower()
    if dtype in ("bfloat16", "bf16") and least < BF16:
        least, why = BF16, f"dtype {dtype} needs compute capability {_cc(BF16)}"
    return least, why


def _cc(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def _candidates(ctx: Context, need: ModelNeed) -> tuple[list[Gpu], list[int]]:
    """The GPUs the model may be placed on, and the pinned indices that do not exist."""
    by_index = {g.index: g for g in ctx.gpus.gpus}
    if need.spec.gpus is None:
        return list(ctx.gpus.gpus), []
    return ([by_index[i] for i in need.spec.gpus if i in by_index],
            [i for i in need.spec.gpus if i not in by_index])


def _pin_fix(qualified: list[Gpu], n: int, what: str) -> str:
    if len(qualified) >= n:
        return (f"pin the model to GPUs that have {what}: "
                f"`gpus: [{', '.join(str(g.index) for g in qualified[:n])}]`")
    return f"run the model on GPUs that have {what}, or give it fewer, larger GPUs"


def per_gpu_need(ctx: Context, need: ModelNeed, gpus: list[Gpu]) -> int:
    """Bytes the scheduler would ask on each GPU (from the largest of `gpus`, as it does).
    Raises PlacementError when the model cannot fit at all."""
    spec = need.spec
    largest = max(g.sample.memory_total for g in gpus)
    return estimate_bytes_per_gpu(spec.backend.value, need.weights_bytes or 0,
                                  spec.engine_args, largest, need.gpu_count)


def _memory(ctx: Context, need: ModelNeed) -> list[Finding]:
    spec, n = need.spec, need.gpu_count
    gpus, absent = _candidates(ctx, need)
    if absent:
        return [failed(GPU_MEMORY, f"model '{spec.id}' is pinned to GPU(s) {absent}, which "
                       f"this machine does not have (it has {len(ctx.gpus.gpus)})",
                       "pin `gpus:` to GPUs this machine has (`modelhost doctor` lists them)")]
    try:
        per_gpu = per_gpu_need(ctx, need, gpus)
    except PlacementError as exc:
        return [failed(GPU_MEMORY, f"model '{spec.id}': {exc}")]
    notes = [] if need.weights_bytes is not None else ["weights of unknown size"]
    if need.is_vllm:
        notes.append("vLLM takes gpu_memory_utilization of the largest GPU")
    size = f" ({'; '.join(notes)})" if notes else ""
    large = [g for g in gpus if g.sample.memory_total >= per_gpu]
    free = [g for g in large if g.sample.memory_free >= per_gpu]
    wants = f"model '{spec.id}' needs {gib(per_gpu)} on each of {n} GPU(s){size}"
    if len(large) < n:
        return [failed(GPU_MEMORY, f"{wants}; {_sizes(gpus)}",
                       "give the model more GPUs (tensor_parallel_size), a smaller or "
                       "quantized checkpoint, or a lower gpu_memory_utilization / context")]
    findings = [passed(GPU_MEMORY, f"{wants}; {len(large)} GPU(s) are large enough")]
    if len(free) < n:
        findings.append(failed(GPU_FREE, f"{wants}, free now on {len(free)}: {_sizes(gpus)}",
                               "free GPU memory (`nvidia-smi` lists the processes holding "
                               "it), or pin the model to GPUs with room"))
    else:
        findings.append(passed(GPU_FREE, f"{wants}; {len(free)} GPU(s) have it free"))
    return findings


def _sizes(gpus: list[Gpu]) -> str:
    return "; ".join(f"{g.label}: {gib(g.sample.memory_free)} free of "
                     f"{gib(g.sample.memory_total)}" for g in gpus)


def check_memory(ctx: Context) -> list[Finding]:
    models = ctx.gpu_models
    if not models:
        why = "no configured model uses a GPU"
        return [not_applicable(GPU_MEMORY, why), not_applicable(GPU_FREE, why)]
    if not ctx.gpus.available:
        need = ", ".join(f"'{n.spec.id}' ({n.gpu_count})" for n in models)
        return [failed(GPU_MEMORY, f"models {need} need GPUs, and this machine has none: "
                       f"{ctx.gpus.reason}",
                       "run the gateway where the NVIDIA GPUs are (in a container: with the "
                       "NVIDIA runtime), or run these models on the CPU (`gpu_count: 0`, a "
                       "llama.cpp GGUF checkpoint)"),
                not_applicable(GPU_FREE, f"no NVIDIA GPU on this machine: {ctx.gpus.reason}")]
    return [f for need in models for f in _memory(ctx, need)]


def _capability(ctx: Context, need: ModelNeed) -> list[Finding]:
    spec, n = need.spec, need.gpu_count
    gpus, _ = _candidates(ctx, need)
    if spec.gpus is None and gpus:
        # Only the GPUs large enough for it: the scheduler places nothing on the others.
        try:
            per_gpu = per_gpu_need(ctx, need, gpus)
        except PlacementError:
            per_gpu = 0
        gpus = [g for g in gpus if g.sample.memory_total >= per_gpu] or gpus
    known = [g for g in gpus if g.capability is not None]
    if not known:
        return [not_applicable(GPU_CAPABILITY, f"model '{spec.id}': NVML does not tell the "
                                               "GPUs' compute capability")]
    least, why = required_capability(need)
    short = [g for g in known if g.capability is not None and g.capability < least]
    qualified = [g for g in gpus if g.capability is not None and g.capability >= least]
    findings = []
    if short:
        listed = ", ".join(f"{g.label}: {g.capability_text}" for g in short)
        where = "it is pinned to" if spec.gpus is not None else \
            "the scheduler may place it on (it places by free memory only)"
        findings.append(failed(GPU_CAPABILITY, f"model '{spec.id}': {why}; GPUs {where} "
                               f"fall short: {listed}",
                               _pin_fix(qualified, n, f"compute capability {_cc(least)}+")))
    else:
        findings.append(passed(GPU_CAPABILITY, f"model '{spec.id}': {why}; its GPUs have it"))
    slow = [g for g in known if g.capability is not None and g.capability < MARLIN]
    if need.awq_checkpoint and need.quantization is None and slow and not short:
        findings.append(failed(GPU_KERNELS, f"model '{spec.id}' is an AWQ checkpoint: on "
                               f"{', '.join(g.label for g in slow)} (compute capability "
                               f"below 8.0) vLLM runs it with its older AWQ kernels, not "
                               "Marlin", _pin_fix([g for g in qualified if g not in slow], n,
                                                  "compute capability 8.0+")))
    elif need.awq_checkpoint or need.quantization is not None:
        findings.append(passed(GPU_KERNELS, f"model '{spec.id}': quantized kernels as "
                                            "configured"))
    return findings


def check_capability(ctx: Context) -> list[Finding]:
    models = ctx.vllm_models
    if not ctx.gpus.available:
        why = f"no NVIDIA GPU on this machine: {ctx.gpus.reason}"
        return [not_applicable(GPU_CAPABILITY, why), not_applicable(GPU_KERNELS, why)]
    if not models:
        why = "no vLLM model configured (the other backends are not checked)"
        return [not_applicable(GPU_CAPABILITY, why), not_applicable(GPU_KERNELS, why)]
    findings = [f for need in models for f in _capability(ctx, need)]
    if not any(f.rule is GPU_KERNELS for f in findings):
        findings.append(not_applicable(GPU_KERNELS, "no quantized vLLM model configured"))
    return findings
