"""Which torch and vLLM an environment has, and which CUDA they were built for, read from
their files: importing torch takes seconds and may touch the GPU.

Standard library only, and nothing newer than Python 3.8: this module's source also runs in
another interpreter (a model's `python:`, where vLLM is often installed on its own), through
`python -c` (see `engine_versions`), printing what it read as JSON.

What is read, from the first match along the interpreter's `sys.path`:
- `torch`: the distribution's version ("2.5.1+cu124"), and `cuda` from `torch/version.py`,
  the file torch's build writes (`cuda = '12.4'`, or `None` for a CPU build);
- `vllm`: the distribution's version, and the torch release its metadata pins
  (`Requires-Dist: torch==2.5.1`), which is the torch its kernels were compiled against.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
from pathlib import Path

_CUDA_LINE = re.compile(r"^cuda\b[^=\n]*=\s*(?:['\"]([^'\"]+)['\"]|None)", re.MULTILINE)
_PINNED = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*\(?\s*==\s*([A-Za-z0-9_.+!-]+)\s*\)?\s*$")


def _distribution(name: str, path: list[str]) -> importlib.metadata.Distribution | None:
    for dist in importlib.metadata.distributions(name=name, path=path):
        return dist
    return None


def _pinned(dist: importlib.metadata.Distribution, wanted: str) -> str | None:
    """The exact version `dist` requires of `wanted` (`wanted==X`, with no marker), or None."""
    for requirement in dist.requires or []:
        if ";" in requirement:
            continue
        match = _PINNED.match(requirement)
        if match and match.group(1).lower().replace("_", "-") == wanted:
            return match.group(2)
    return None


def _torch_cuda(path: list[str]) -> str | None:
    for folder in path:
        version_file = Path(folder or ".") / "torch" / "version.py"
        try:
            text = version_file.read_text(encoding="utf-8")
        except OSError:
            continue
        match = _CUDA_LINE.search(text)
        return match.group(1) if match else None
    return None


def read_versions(path: list[str]) -> dict[str, str | None]:
    """{"torch", "torch_cuda", "vllm", "vllm_torch"}: versions found along `path` (None when
    not installed, or for a CPU build of torch: `torch_cuda`)."""
    torch = _distribution("torch", path)
    vllm = _distribution("vllm", path)
    return {
        "torch": torch.version if torch is not None else None,
        "torch_cuda": _torch_cuda(path) if torch is not None else None,
        "vllm": vllm.version if vllm is not None else None,
        "vllm_torch": _pinned(vllm, "torch") if vllm is not None else None,
    }


if __name__ == "__main__":
    json.dump(read_versions(sys.path), sys.stdout)
