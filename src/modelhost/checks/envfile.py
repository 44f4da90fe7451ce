"""`.env` files: secrets committed to git or readable by others, a malformed Hugging Face
token, and vLLM settings spelled as variables (VLLM_GPU_MEMORY_UTILIZATION)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from modelhost.checks import rules as R
from modelhost.checks import secrets
from modelhost.checks.report import Finding
from modelhost.checks.yamlloc import parse_env_file

HF_TOKEN_NAMES = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN",
                  "HUGGINGFACEHUB_API_TOKEN", "MODELHOST_HUGGINGFACE_TOKEN"}


def tracked_by_git(path: Path) -> bool:
    """Whether git tracks the file (False when git or a repository is not there)."""
    try:
        done = subprocess.run(
            ["git", "ls-files", "--error-unmatch", path.name], cwd=path.parent,
            capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def readable_by_others(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH)) and os.name == "posix"


def check(path: Path, text: str, display: str) -> list[Finding]:
    out: list[Finding] = []
    entries = parse_env_file(text)
    held = [e for e in entries if secrets.is_secret(e.name, e.value)]
    if held and tracked_by_git(path):
        out.append(Finding(
            R.ENV_COMMITTED, f"{display} holds {', '.join(e.name for e in held)} and is "
            "tracked by git",
            fix=f"git rm --cached {path.name}; add it to .gitignore; commit a "
            f"{path.name}.example without values; rotate the tokens.",
            path=display, line=held[0].line))
    if held and readable_by_others(path):
        out.append(Finding(
            R.ENV_PERMISSIONS, f"{display} holds {', '.join(e.name for e in held)} and is "
            f"readable by other users (mode {stat.S_IMODE(path.stat().st_mode):o})",
            fix=f"chmod 600 {display}", replacement="chmod 600", path=display,
            line=held[0].line))
    for entry in entries:
        if entry.name in HF_TOKEN_NAMES and entry.value and "$" not in entry.value \
                and not entry.value.startswith("hf_"):
            out.append(Finding(
                R.TOKEN_FORMAT, f"{entry.name} does not start with hf_ "
                f"({secrets.mask(entry.value)})",
                fix="Paste a user access token from huggingface.co/settings/tokens.",
                path=display, line=entry.line))
        if entry.name.endswith("GPU_MEMORY_UTILIZATION"):
            try:
                value = float(entry.value)
            except ValueError:
                continue
            if not 0.1 <= value <= 0.95:
                out.append(Finding(
                    R.GPU_MEMORY, f"{entry.name} is {value:g}",
                    fix="Keep it between 0.1 and 0.95.",
                    replacement=f"{entry.name}=0.90", path=display, line=entry.line))
    return out
