"""Rules for a vLLM server, wherever it is declared: a compose service's command line or a
models-file entry's engine_args. Both are first turned into a `VllmServer`.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelhost.checks import rules as R
from modelhost.checks.hfconfig import ModelFacts, model_facts, size_in_billions
from modelhost.checks.report import Finding


@dataclass(frozen=True)
class Arg:
    value: str | None  # None for a bare flag
    line: int
    spelled: str  # as written: "--max-model-len"


# Flags that take no value (a following word is not theirs).
_BARE = {"enforce_eager", "trust_remote_code", "enable_prefix_caching",
         "enable_chunked_prefill", "disable_log_requests", "disable_log_stats",
         "enable_auto_tool_choice", "enable_reasoning", "disable_custom_all_reduce",
         "enable_lora", "enable_expert_parallel", "disable_frontend_multiprocessing",
         "enable_sleep_mode", "disable_fastapi_docs", "headless", "use_v2_block_manager"}
_SHORT = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size",
          "dp": "data_parallel_size", "q": "quantization"}
# Where the launcher ends and the arguments start: `vllm serve`, `python -m
# vllm.entrypoints.openai.api_server` (the vllm/vllm-openai image's entry point).
_LAUNCHER_END = re.compile(r"serve|vllm\.entrypoints\.[\w.]+")


def normal(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").lower()


def parse_argv(tokens: list[tuple[str, int]]) -> tuple[dict[str, Arg], tuple[str, int] | None]:
    """vLLM's arguments (by snake_case name) and the positional model, if any."""
    args: dict[str, Arg] = {}
    model: tuple[str, int] | None = None
    # `sh -c "vllm serve ..."`: the arguments are inside one word.
    for index, (text, line) in enumerate(tokens):
        if " " in text.strip() and "vllm" in text:
            try:
                words = shlex.split(text)
            except ValueError:
                words = text.split()
            tokens = [(word, line) for word in words] + tokens[index + 1:]
            break
    i = next((n + 1 for n, (text, _) in enumerate(tokens[:6])
              if _LAUNCHER_END.fullmatch(text)), 0)
    if i == 0 and tokens and tokens[0][0].rsplit("/", 1)[-1] == "vllm":
        i = 1
    while i < len(tokens):
        text, line = tokens[i]
        i += 1
        if text.startswith("-") and len(text) > 1 and not _number(text):
            name, eq, value = text.partition("=")
            key = normal(name)
            key = _SHORT.get(key, key) if not name.startswith("--") else key
            if eq:
                args[key] = Arg(value, line, name)
            elif (key in _BARE or key.startswith(("no_", "disable_"))
                  or i >= len(tokens) or (tokens[i][0].startswith("-")
                                          and not _number(tokens[i][0]))):
                args[key] = Arg(None, line, name)
            else:
                args[key] = Arg(tokens[i][0], line, name)
                i += 1
        elif model is None:
            model = (text, line)
    if "model" in args and args["model"].value:
        model = (args["model"].value or "", args["model"].line)
    return args, model


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@dataclass
class VllmServer:
    """One vLLM server as declared: enough to apply the rules."""

    kind: str  # "compose" or "models"
    path: str
    line: int  # where the server is declared (service key, models entry)
    name: str  # service name or model id
    model: str | None
    model_line: int
    args: dict[str, Arg]
    env: dict[str, tuple[str, int]] = field(default_factory=dict)
    gpus: int | None = None  # GPUs given to it, None when unknown
    gpus_what: str = ""
    gpus_line: int | None = None
    local_model: Path | None = None
    revision: str = "main"
    cache_dirs: list[Path] = field(default_factory=list)  # hub caches mounted into it

    def value(self, name: str) -> str | None:
        arg = self.args.get(name)
        return arg.value if arg is not None else None

    def line_of(self, name: str) -> int:
        arg = self.args.get(name)
        return arg.line if arg is not None else self.line

    def number(self, name: str) -> float | None:
        value = self.value(name)
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    def int_value(self, name: str, default: int) -> int | None:
        value = self.value(name)
        if value is None:
            return None if name in self.args else default
        try:
            return int(value)
        except ValueError:
            return None

    def flag(self, name: str) -> str:
        """The flag as this declaration spells it."""
        if self.kind == "models":
            return name
        return "--" + name.replace("_", "-")

    def set_text(self, name: str, value: str) -> str:
        return f"{name}: {value}" if self.kind == "models" else f"{self.flag(name)} {value}"


def _json_arg(server: VllmServer, name: str) -> dict[str, Any] | None:
    value = server.value(name)
    if not value:
        return None
    try:
        loaded = json.loads(value)
    except ValueError:
        return None
    return loaded if isinstance(loaded, dict) else None


# Accepted --quantization values per checkpoint format.
_KERNELS = {
    "awq": {"awq", "awq_marlin"},
    "gptq": {"gptq", "gptq_marlin", "gptq_marlin_24", "marlin", "gptq_bitblas"},
    "fp8": {"fp8"},
    "compressed-tensors": {"compressed-tensors", "compressed_tensors"},
    "bitsandbytes": {"bitsandbytes"},
    "gguf": {"gguf"},
}
_BEST = {"awq": "awq_marlin", "gptq": "gptq_marlin", "fp8": "fp8",
         "compressed-tensors": "compressed-tensors", "bitsandbytes": "bitsandbytes",
         "gguf": "gguf"}
# Kernels that need weights quantized in their format beforehand.
_PREQUANTIZED = {"awq", "awq_marlin", "gptq", "gptq_marlin", "gptq_marlin_24", "marlin",
                 "gptq_bitblas", "compressed-tensors", "gguf"}


def needed_start_seconds(model: str | None) -> int:
    """How long vLLM may take to load a model of this size (weights, CUDA graphs)."""
    size = size_in_billions(model or "")
    if size is not None and size >= 30:
        return 300
    if size is not None and size >= 7:
        return 180
    return 120


def check(server: VllmServer, cache_dirs: list[Path]) -> list[Finding]:
    out: list[Finding] = []
    path = server.path
    tp = server.int_value("tensor_parallel_size", 1)
    pp = server.int_value("pipeline_parallel_size", 1)

    # gpu-memory-utilization, from the flag or a VLLM_GPU_MEMORY_UTILIZATION variable.
    util_line = server.line_of("gpu_memory_utilization")
    util = server.number("gpu_memory_utilization")
    if util is None and "VLLM_GPU_MEMORY_UTILIZATION" in server.env:
        text, util_line = server.env["VLLM_GPU_MEMORY_UTILIZATION"]
        try:
            util = float(text)
        except ValueError:
            util = None
    if util is not None and not 0.1 <= util <= 0.95:
        out.append(Finding(
            R.GPU_MEMORY, f"gpu-memory-utilization is {util:g} in {server.name}",
            fix="Keep it between 0.1 and 0.95 (0.90 leaves room for CUDA graphs and NCCL).",
            replacement=server.set_text("gpu_memory_utilization", "0.90"),
            path=path, line=util_line))

    # Tensor parallelism on one host: the multiprocessing executor.
    backend = server.value("distributed_executor_backend")
    if tp is not None and pp is not None and tp * pp > 1 and (
            backend == "ray" or (backend is None and server.kind == "compose")):
        seen = "is ray" if backend == "ray" else "is not set (it may be ray)"
        out.append(Finding(
            R.EXECUTOR, f"tensor-parallel-size {tp} with a distributed executor backend "
            f"that {seen} in {server.name}",
            fix="Use the multiprocessing executor on one host.",
            replacement=server.set_text("distributed_executor_backend", "mp"),
            path=path, line=server.line_of("distributed_executor_backend")
            if backend else server.line_of("tensor_parallel_size")))

    if "swap_space" not in server.args:
        out.append(Finding(
            R.SWAP_SPACE, f"{server.name} sets no swap space",
            fix="Reserve CPU swap space for preempted sequences (GiB per GPU).",
            replacement=server.set_text("swap_space", "16"), path=path, line=server.line))

    facts: ModelFacts | None = None
    if server.model:
        facts = model_facts(server.model, [*server.cache_dirs, *cache_dirs],
                            server.local_model, server.revision)
    quant = server.value("quantization")
    if facts is not None and facts.quant_method:
        method = facts.quant_method
        seen_from = "its name" if facts.quant_from_name else f"{facts.path}"
        best = _BEST.get(method)
        if quant is None and best:
            out.append(Finding(
                R.QUANT_IMPLICIT, f"{server.model} is quantized with {method.upper()} (from "
                f"{seen_from}) but {server.name} gives no quantization",
                fix=f"Name the kernel explicitly ({best} for {method.upper()} weights).",
                replacement=server.set_text("quantization", best), path=path,
                line=server.model_line))
        elif quant is not None and method in _KERNELS and quant.lower() not in _KERNELS[method]:
            out.append(Finding(
                R.QUANT_MISMATCH, f"{server.model} is quantized with {method.upper()} (from "
                f"{seen_from}) but quantization is {quant}",
                fix=f"Use a kernel for {method.upper()} weights: "
                f"{', '.join(sorted(_KERNELS[method]))}.",
                replacement=server.set_text("quantization", best or method), path=path,
                line=server.line_of("quantization")))
    elif (facts is not None and facts.path is not None and quant is not None
          and quant.lower() in _PREQUANTIZED):
        out.append(Finding(
            R.QUANT_MISMATCH, f"quantization is {quant} but {facts.path} has no "
            "quantization_config: the weights are not quantized",
            fix="Drop the quantization (or point at a checkpoint quantized in that format).",
            path=path, line=server.line_of("quantization")))

    if facts is not None and facts.path is not None:
        overrides = _json_arg(server, "hf_overrides") or {}
        rope = _json_arg(server, "rope_scaling") or overrides.get("rope_scaling")
        max_pos = overrides.get("max_position_embeddings")
        context = facts.context_length(rope if isinstance(rope, dict) else None,
                                       max_pos if isinstance(max_pos, int) else None)
        wanted = server.int_value("max_model_len", 0)
        allow_long = server.env.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", ("", 0))[0]
        if context and wanted and wanted > context and allow_long not in ("1", "true"):
            out.append(Finding(
                R.MAX_LEN, f"max-model-len {wanted} is above {server.model}'s context length "
                f"{context} ({facts.path})",
                fix="Lower it to the model's context length, or extend the context with "
                "rope scaling the model supports (--rope-scaling / hf_overrides).",
                replacement=server.set_text("max_model_len", str(context)), path=path,
                line=server.line_of("max_model_len")))
        heads = facts.num_attention_heads
        if heads and tp and tp > 0 and heads % tp:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0 and d <= 8]
            out.append(Finding(
                R.TP_HEADS, f"tensor-parallel-size {tp} does not divide {server.model}'s "
                f"{heads} attention heads ({facts.path})",
                fix=f"Use a tensor-parallel size that divides {heads}: "
                f"{', '.join(map(str, divisors))}.",
                path=path, line=server.line_of("tensor_parallel_size")))

    if server.gpus is not None and tp is not None and pp is not None:
        needed = tp * pp
        if needed != server.gpus:
            more = needed > server.gpus
            out.append(Finding(
                R.TP_GPUS, f"tensor-parallel-size {tp}"
                + (f" x pipeline-parallel-size {pp}" if pp != 1 else "")
                + f" needs {needed} GPU(s) but {server.name} is given {server.gpus} "
                f"({server.gpus_what})"
                + (": vLLM fails at start" if more else ": the other GPUs stay idle"),
                fix="Make the GPUs given and the tensor-parallel size agree.",
                replacement=server.set_text("tensor_parallel_size", str(server.gpus))
                if pp == 1 and server.gpus > 0 else None,
                path=path, line=server.gpus_line if more and server.gpus_line
                else server.line_of("tensor_parallel_size")))
    return out
