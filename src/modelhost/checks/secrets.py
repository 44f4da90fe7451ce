"""Secrets written in files: a token in a compose file's environment, a literal --api-key,
a token in a Dockerfile's ENV or ARG. A value that is a `${VARIABLE}` reference is not a
secret in the file (the value lives elsewhere: an uncommitted .env, a secret store).
"""

from __future__ import annotations

import re

from modelhost.checks import rules as R
from modelhost.checks.report import Finding
from modelhost.checks.yamlloc import Node, walk

SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEYS?$|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)",
    re.IGNORECASE)
# Token shapes that are secrets whatever the variable is called.
TOKEN = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}|"
                   r"xox[bpas]-[A-Za-z0-9-]{10,})")
_KEY_FLAGS = {"--api-key": "VLLM_API_KEY", "--hf-token": "HF_TOKEN"}
_REFERENCE = re.compile(r"_(FILE|PATH|DIR|URL|NAME|ID)$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"^(|<.*>|\*+|x+|changeme|none|null|false|true|0|1)$", re.IGNORECASE)


def is_secret(name: str, value: str) -> bool:
    """A literal value of a secret-named variable, or a value shaped like a token."""
    value = value.strip().strip("'\"")
    if TOKEN.search(value):  # also a token given as a ${VAR:-default}
        return True
    if "$" in value or _PLACEHOLDER.match(value):
        return False
    if _REFERENCE.search(name):  # HF_TOKEN_FILE=/run/secrets/hf_token names where it is
        return bool(TOKEN.search(value))
    return bool(SECRET_NAME.search(name)) or bool(TOKEN.search(value))


def mask(value: str) -> str:
    value = value.strip()
    return value[:3] + "..." if len(value) > 6 else "..."


def _entry(name: str, value: str, path: str, line: int, where: str) -> Finding:
    return Finding(
        R.PLAINTEXT, f"{name} is written in plain text in {where} ({mask(value)})",
        fix="Take it from the environment: keep the value in an uncommitted .env file "
        "(chmod 600) or a secret store, and rotate the token that was written here.",
        replacement=f"- {name}=${{{name}}}", path=path, line=line)


def in_environment(service: Node, path: str) -> list[Finding]:
    """Secrets in a compose service's `environment:` (list or mapping)."""
    out: list[Finding] = []
    environment = service.get("environment")
    if environment is None:
        return out
    pairs: list[tuple[str, str, int]] = []
    if isinstance(environment.value, dict):
        pairs = [(k, v.scalar() or "", v.line) for k, v in environment.mapping().items()]
    else:
        for item in environment.sequence():
            name, eq, value = (item.scalar() or "").partition("=")
            if eq:
                pairs.append((name.strip(), value, item.line))
    for name, value, line in pairs:
        if is_secret(name, value):
            out.append(_entry(name, value, path, line, "the compose file's environment"))
    return out


def in_command(tokens: list[tuple[str, int]], path: str) -> list[Finding]:
    out: list[Finding] = []
    for i, (text, line) in enumerate(tokens):
        name, eq, value = text.partition("=")
        if name not in _KEY_FLAGS:
            continue
        if not eq:
            value = tokens[i + 1][0] if i + 1 < len(tokens) else ""
        if value and not value.startswith("-") and "$" not in value and \
                not _PLACEHOLDER.match(value):
            out.append(Finding(
                R.KEY_IN_COMMAND, f"{name} is written in the command ({mask(value)})",
                fix="Pass it from a variable defined in an uncommitted .env (or set "
                "VLLM_API_KEY / HF_TOKEN in the environment).",
                replacement=f"{name} ${{{_KEY_FLAGS[name]}}}", path=path, line=line))
    return out


def tokens_in(node: Node, path: str, skip: set[int]) -> list[Finding]:
    """Token-shaped values anywhere under `node` (labels, args, ...), but in `skip`'s nodes."""
    out: list[Finding] = []
    for child in walk(node):
        text = child.scalar()
        if id(child) in skip or text is None:
            continue
        match = TOKEN.search(text)
        if match:
            out.append(Finding(
                R.PLAINTEXT, f"a token is written in plain text ({mask(match[1])})",
                fix="Take it from the environment (an uncommitted .env file or a secret "
                "store), and rotate the token that was written here.",
                path=path, line=child.line))
    return out


def in_text(name: str, value: str, path: str, line: int, where: str) -> Finding | None:
    return _entry(name, value, path, line, where) if is_secret(name, value) else None
