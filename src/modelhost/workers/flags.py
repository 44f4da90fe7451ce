"""Turning a model's `engine_args` mapping into command-line flags."""

from __future__ import annotations

import json
from typing import Any


def _value(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def kebab_flags(args: dict[str, Any]) -> list[str]:
    """vLLM style: `max_model_len: 8192` → `--max-model-len 8192`; `true` → a bare flag."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, list) and not any(isinstance(v, dict | list) for v in value):
            out += [flag, *(str(v) for v in value)]
        else:
            out += [flag, _value(value)]
    return out


def snake_flags(args: dict[str, Any]) -> list[str]:
    """llama-cpp-python style: `n_ctx: 2048` → `--n_ctx 2048`; booleans are spelled out."""
    out: list[str] = []
    for key, value in args.items():
        if value is None:
            continue
        flag = "--" + key.replace("-", "_")
        if isinstance(value, bool):
            out += [flag, str(value).lower()]
        elif isinstance(value, list) and not any(isinstance(v, dict | list) for v in value):
            # llama_cpp.server declares list settings (tensor_split) with nargs="*".
            out += [flag, *(str(v) for v in value)]
        else:
            out += [flag, _value(value)]
    return out
