"""Dockerfiles: unpinned base images, the user the image runs as, a HEALTHCHECK, secrets in
ENV and ARG. Instructions are read with their continuation lines joined; `${ARG}` in FROM is
resolved from the ARG defaults declared before it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from modelhost.checks import rules as R
from modelhost.checks import secrets
from modelhost.checks.compose import image_ref
from modelhost.checks.report import Finding
from modelhost.checks.yamlloc import interpolate


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def parse(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1])
            continue
        buffer.append(stripped)
        joined = " ".join(part.strip() for part in buffer if part.strip())
        buffer = []
        keyword, _, arguments = joined.partition(" ")
        out.append(Instruction(keyword.upper(), arguments.strip(), start))
    return out


def _pairs(arguments: str) -> list[tuple[str, str]]:
    """ENV/ARG arguments: `K=V K2=V2`, or the legacy `K V`."""
    try:
        words = shlex.split(arguments)
    except ValueError:
        words = arguments.split()
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [(w.partition("=")[0], w.partition("=")[2]) for w in words]


def check(text: str, path: str) -> list[Finding]:
    out: list[Finding] = []
    args: dict[str, str] = {}
    stages: set[str] = set()
    user_by_stage: dict[str, str | None] = {}
    user: str | None = None
    healthcheck = False
    current = ""
    for ins in parse(text):
        if ins.keyword == "ARG":
            for name, value in _pairs(ins.arguments):
                if value:
                    args.setdefault(name, value)
                    found = secrets.in_text(name, value, path, ins.line, "a Dockerfile ARG")
                    if found:
                        out.append(found)
        elif ins.keyword == "ENV":
            for name, value in _pairs(ins.arguments):
                found = secrets.in_text(name, value, path, ins.line, "a Dockerfile ENV")
                if found:
                    out.append(found)
        elif ins.keyword == "FROM":
            words = [w for w in ins.arguments.split() if not w.startswith("--")]
            if not words:
                continue
            image = interpolate(words[0], args).text
            stage = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            user = user_by_stage.get(image.lower())  # a stage built on an earlier stage
            healthcheck = False
            if image.lower() not in stages and image != "scratch":
                _, tag = image_ref(image)
                if tag in (None, "latest"):
                    out.append(Finding(
                        R.BASE_UNPINNED, f"FROM {words[0]}"
                        + (f" (resolves to {image})" if image != words[0] else "")
                        + (" has no tag (latest)" if tag is None else " uses latest"),
                        fix="Pin the base image to a version (or a digest).",
                        replacement=None, path=path, line=ins.line))
            if stage:
                stages.add(stage.lower())
                current = stage.lower()
            else:
                current = ""
            user_by_stage[current] = user
        elif ins.keyword == "USER":
            user = ins.arguments.split()[0] if ins.arguments else None
            user_by_stage[current] = user
        elif ins.keyword == "HEALTHCHECK":
            healthcheck = not ins.arguments.upper().startswith("NONE")
        elif ins.keyword == "RUN":
            match = secrets.TOKEN.search(ins.arguments)
            if match:
                found = secrets.in_text("a RUN command's token", match[1], path, ins.line,
                                        "a Dockerfile RUN")
                if found:
                    out.append(found)
    if user is None or user.split(":")[0] in ("root", "0"):
        out.append(Finding(
            R.DOCKER_ROOT, "the final stage runs as root"
            + (f" (USER {user})" if user else " (no USER)"),
            fix="Create an unprivileged user and switch to it before the entry point.",
            replacement="RUN useradd --create-home --uid 1000 app\nUSER app",
            path=path, line=len(text.splitlines()) or 1))
    if not healthcheck:
        out.append(Finding(
            R.DOCKER_HEALTH, "the final stage has no HEALTHCHECK",
            fix="Probe the server's readiness endpoint.",
            replacement='HEALTHCHECK --interval=30s --timeout=5s --start-period=120s '
            '--retries=3 CMD curl -fsS http://127.0.0.1:8000/ready || exit 1',
            path=path, line=len(text.splitlines()) or 1))
    return out


