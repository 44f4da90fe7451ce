"""What a model's own `config.json` says: context length, attention heads, quantization.

Found without any network: in a local model folder, or in the Hugging Face cache
(`models--org--name/snapshots/<commit>/config.json`, the revision's ref first). When it is
not there, rules that need it stay silent, and the model's name gives what it can (its
size, e.g. "32B", and a quantization spelled in it, e.g. "AWQ").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Spelled in model names: Qwen3-32B-AWQ, Llama-3.1-70B-Instruct-GPTQ-INT4, ...-FP8.
_NAME_QUANT = (("awq", "awq"), ("gptq", "gptq"), ("fp8", "fp8"), ("gguf", "gguf"),
               ("bnb", "bitsandbytes"))
_SIZE = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)[Bb](?![A-Za-z0-9])")


@dataclass(frozen=True)
class ModelFacts:
    path: Path | None  # the config.json read, None when only the name was used
    max_position_embeddings: int | None
    rope_scaling: dict[str, Any] | None
    num_attention_heads: int | None
    quant_method: str | None  # "awq", "gptq", ... (from config.json, else from the name)
    quant_from_name: bool

    def context_length(self, rope_override: dict[str, Any] | None = None,
                       max_pos_override: int | None = None) -> int | None:
        """The longest max-model-len vLLM accepts for this model (its derivation:
        max_position_embeddings, times the rope_scaling factor except for su / longrope /
        llama3; for yarn, original_max_position_embeddings times the factor)."""
        length = max_pos_override or self.max_position_embeddings
        if length is None:
            return None
        rope = rope_override if rope_override is not None else self.rope_scaling
        if isinstance(rope, dict):
            kind = rope.get("rope_type") or rope.get("type")
            if kind not in ("su", "longrope", "llama3", "mrope", "default"):
                factor = rope.get("factor", 1)
                if kind == "yarn" and isinstance(rope.get("original_max_position_embeddings"),
                                                  int):
                    length = rope["original_max_position_embeddings"]
                if isinstance(factor, int | float) and factor > 0:
                    length = int(length * factor)
        return int(length)


def size_in_billions(name: str) -> float | None:
    """A parameter count spelled in a model's name ("Qwen3-32B-AWQ": 32)."""
    match = _SIZE.search(name.rsplit("/", 1)[-1])
    return float(match[1]) if match else None


def quant_from_name(name: str) -> str | None:
    words = re.split(r"[^a-z0-9]+", name.rsplit("/", 1)[-1].lower())
    for word, method in _NAME_QUANT:
        if any(w == word or w.startswith(word) for w in words):
            return method
    return None


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal models keep the language model's numbers under text_config.
    inner = config.get("text_config") or config.get("llm_config")
    return {**inner, **{k: v for k, v in config.items() if k not in inner}} \
        if isinstance(inner, dict) else config


def _int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def find_config(model: str, cache_dirs: list[Path], local: Path | None = None,
                revision: str = "main") -> Path | None:
    """config.json of a local model folder, or of `model` (a repo id) in a hub cache."""
    if local is not None:
        candidate = local / "config.json" if local.is_dir() else local.parent / "config.json"
        return candidate if candidate.is_file() else None
    if "/" not in model or model.startswith(("/", ".")):
        path = Path(model)
        return path / "config.json" if (path / "config.json").is_file() else None
    folder_name = "models--" + model.replace("/", "--")
    for cache in cache_dirs:
        storage = cache / folder_name
        snapshots = storage / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = storage / "refs" / revision
        try:
            commit = ref.read_text().strip() if ref.is_file() else revision
        except OSError:
            commit = revision
        candidate = snapshots / commit / "config.json"
        if candidate.is_file():
            return candidate
        found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


def model_facts(model: str, cache_dirs: list[Path], local: Path | None = None,
                revision: str = "main") -> ModelFacts:
    path = find_config(model, cache_dirs, local, revision)
    config: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            config = _text_config(loaded) if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            path = None
    quant = config.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    from_name = False
    if not isinstance(method, str):
        method = None
        if path is None:  # a config.json without quantization_config is not quantized
            method = quant_from_name(model)
            from_name = method is not None
    rope = config.get("rope_scaling")
    return ModelFacts(
        path=path,
        max_position_embeddings=_int(config, "max_position_embeddings", "n_positions",
                                     "max_seq_len", "seq_length", "max_sequence_length"),
        rope_scaling=rope if isinstance(rope, dict) else None,
        num_attention_heads=_int(config, "num_attention_heads", "n_head", "num_heads"),
        quant_method=method.lower() if method else None,
        quant_from_name=from_name,
    )
