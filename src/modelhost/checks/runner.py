"""`modelhost check`: find the files, read each with its reader, apply the rules, one report.

With no path, the current folder is examined: compose*.y*ml, docker-compose*.y*ml,
Dockerfile*, *.Dockerfile, .env, and below it (4 folders down) every compose file whatever
its name and every Dockerfile (not in hidden, environment or test folders); the models
file (MODELHOST_CONFIG or --config) and the settings from the environment. A folder given
as a path is examined the same way (without the settings); a file is recognised by its
name (Dockerfile, .env) or its content (`services:` for compose, `models:` for a models
file).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from modelhost.checks import compose, conflicts, dockerfile, envfile, models, services
from modelhost.checks import rules as R
from modelhost.checks.report import Finding, Report
from modelhost.checks.vllm import check as check_vllm
from modelhost.checks.yamlloc import YamlError, load_yaml
from modelhost.settings import Settings

_COMPOSE_GLOBS = ("compose*.yml", "compose*.yaml", "docker-compose*.yml",
                  "docker-compose*.yaml")
_DOCKERFILE_GLOBS = ("Dockerfile", "Dockerfile.*", "*.Dockerfile", "*.dockerfile")
_EXAMPLES = (".example", ".sample", ".template", ".dist")


# Left out below the folder: environments, caches, and test folders (whose fixtures are
# broken on purpose; name them to check them).
_SKIP = {"venv", "node_modules", "__pycache__", "site-packages", "tests", "test", "fixtures"}
# Dockerfile.<variant>, but not dockerfile.py and its kind.
_NOT_DOCKERFILE = {".py", ".md", ".txt", ".rst", ".json", ".yml", ".yaml", ".sh", ".toml",
                   ".cfg", ".ini", ".j2", ".tmpl"}
_DEPTH = 4


def _below(folder: Path) -> list[Path]:
    """Files under `folder`, at most _DEPTH folders down, leaving out hidden folders,
    environments and test folders."""
    found: list[Path] = []
    stack = [(folder, 0)]
    while stack:
        current, depth = stack.pop()
        try:
            entries = sorted(current.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir() and depth < _DEPTH and entry.name not in _SKIP and \
                    not entry.name.startswith("."):
                stack.append((entry, depth + 1))
            elif entry.is_file() and depth > 0:
                found.append(entry)
    return sorted(found)


def _is_compose(path: Path) -> bool:
    """A YAML file whose `services:` are compose services (an image, a build, a command)."""
    try:
        if path.stat().st_size > 1024 * 1024:
            return False
        root = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, YamlError):
        return False
    services = root.get("services") if root is not None else None
    return services is not None and any(
        isinstance(s.value, dict) and ({"image", "build", "command"} & set(s.value))
        for s in services.mapping().values())


def discover(folder: Path) -> list[Path]:
    """The folder's compose files, Dockerfiles and .env files; below it, the compose files
    (whatever their name, e.g. configs/docker/profiles/medium.yml) and Dockerfiles."""
    found: list[Path] = []
    for pattern in (*_COMPOSE_GLOBS, *_DOCKERFILE_GLOBS, ".env", ".env.*"):
        for path in sorted(folder.glob(pattern)):
            if path.is_file() and path not in found and not path.name.endswith(_EXAMPLES) \
                    and (pattern not in _DOCKERFILE_GLOBS or _is_dockerfile(path)):
                found.append(path)
    for path in _below(folder):
        if _is_dockerfile(path) or (path.suffix in (".yml", ".yaml") and _is_compose(path)):
            found.append(path)
    return found


def _is_dockerfile(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(_EXAMPLES) or path.suffix.lower() in _NOT_DOCKERFILE:
        return False
    return name in ("dockerfile", "containerfile") or name.startswith("dockerfile.") or \
        name.endswith(".dockerfile")


def kind_of(path: Path, text: str) -> str:
    name = path.name.lower()
    if name.startswith("dockerfile") or name.endswith(".dockerfile") or \
            name.startswith("containerfile"):
        return "dockerfile"
    if name == ".env" or name.startswith(".env.") or name.endswith(".env"):
        return "env"
    try:
        root = load_yaml(text, str(path))
    except YamlError:
        return "yaml-broken"
    if root is not None and isinstance(root.value, dict) and "services" in root.value:
        return "compose"
    if models.looks_like_models_file(root):
        return "models"
    return "unknown"


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_check(paths: list[Path], *, settings: Settings | None = None,
              models_file: Path | None = None,
              environ: Mapping[str, str] | None = None,
              cache_dirs: list[Path] | None = None) -> Report:
    """Check `paths` (files or folders; none: the current folder), `models_file` and, when
    given, `settings`. `environ` interpolates compose files (default: os.environ)."""
    environ = dict(os.environ) if environ is None else environ
    if cache_dirs is None:
        cache_dirs = [settings.model_cache_dir] if settings is not None else []
    files: list[Path] = []
    for path in paths or [Path.cwd()]:
        for found in discover(path) if path.is_dir() else [path]:
            if found not in files:
                files.append(found)
    if models_file is not None and models_file not in files:
        files.append(models_file)
    # The .env beside a compose file is part of its deployment.
    for path in list(files):
        if path.suffix in (".yml", ".yaml") and (path.parent / ".env").is_file() and \
                path.parent / ".env" not in files:
            files.append(path.parent / ".env")

    findings: list[Finding] = []
    inputs: list[str] = []
    declared: list[compose.Service] = []
    composes: list[compose.ComposeFile] = []
    for path in files:
        display = _display(path)
        inputs.append(display)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            findings.append(_unreadable(display, f"cannot read {display}: {exc}", None,
                                        "Make the file readable (UTF-8 text)."))
            continue
        kind = kind_of(path, text)
        if kind == "dockerfile":
            findings += dockerfile.check(text, display)
        elif kind == "env":
            findings += envfile.check(path, text, display)
        elif kind == "models":
            findings += models.check(path, text, display, cache_dirs)
        elif kind == "compose":
            try:
                parsed = compose.load(path, display, environ, text)
            except YamlError as exc:
                findings.append(_unreadable(display, str(exc), exc.line))
                continue
            composes.append(parsed)
            declared += parsed.services
        elif kind == "yaml-broken":
            try:
                load_yaml(text, display)
            except YamlError as exc:
                findings.append(_unreadable(display, str(exc), exc.line))
        else:
            findings.append(Finding(
                R.NOT_RECOGNISED, f"{display} is neither a compose file (services:), a "
                "models file (models:), a Dockerfile nor an .env file: skipped",
                fix="Name only compose files, models files, Dockerfiles and .env files.",
                path=display))
    pins = _pins(declared)
    for service in declared:
        findings += services.check_service(service, pins)
        if service.vllm is not None:
            findings += check_vllm(service.vllm, cache_dirs)
    findings += conflicts.check(declared)
    for parsed in composes:
        for name, line in parsed.undefined.items():
            findings.append(Finding(
                R.UNDEFINED_VARIABLE, f"${{{name}}} is not set (not in the environment nor in "
                f"{_display(parsed.folder / '.env')}): compose uses an empty string",
                fix=f"Define {name} in the .env file beside the compose file, or give a "
                f"default: ${{{name}:-value}}.", path=parsed.path, line=line))
    if settings is not None:
        inputs.append("(environment: modelhost settings)")
        findings += models.check_settings(settings)
    return Report("check", _dedupe(findings), inputs)


def _unreadable(display: str, message: str, line: int | None,
                fix: str = "Fix the syntax at the line named (`docker compose config` "
                "names it too).") -> Finding:
    return Finding(R.INPUT_UNREADABLE, message, fix=fix, path=display, line=line)


def _pins(declared: list[compose.Service]) -> dict[str, str]:
    """A pinned tag per image repository, from any service that pins it."""
    pins: dict[str, str] = {}
    for service in declared:
        if service.image:
            repo, tag = compose.image_ref(service.image)
            if tag not in (None, "latest", "@digest"):
                pins.setdefault(repo, tag or "")
    return pins


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen: set[tuple[str, str | None, int | None, str]] = set()
    out = []
    for finding in findings:
        key = (finding.rule.id, finding.path, finding.line, finding.message)
        if key not in seen:
            seen.add(key)
            out.append(finding)
    return out
