"""The torch and vLLM of each environment a worker runs from: the gateway's own, and each
GPU model's `python:` (read by running `versions.py` there, since it is another
interpreter with its own packages)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import dataclass, field

from modelhost.doctor import versions

OWN = "the gateway's environment"
TIMEOUT = 30.0  # seconds: a cold interpreter on a slow disk reads its metadata in ~1 s


@dataclass(frozen=True)
class Environment:
    """What one environment has. `error` says why it could not be read."""

    name: str  # OWN, or the interpreter's path
    versions: dict[str, str | None] = field(default_factory=dict)
    error: str | None = None

    def get(self, key: str) -> str | None:
        return self.versions.get(key)


def own_environment(path: list[str] | None = None) -> Environment:
    return Environment(OWN, versions.read_versions(list(sys.path if path is None else path)))


def other_environment(python: str) -> Environment:
    """Run `versions.py` with `python` and read what it prints."""
    source = inspect.getsource(versions)
    try:
        done = subprocess.run([python, "-c", source], capture_output=True, text=True,
                              timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    except OSError as exc:
        return Environment(python, error=f"cannot run {python}: {exc.strerror or exc}")
    except subprocess.TimeoutExpired:
        return Environment(python, error=f"{python} did not answer within {TIMEOUT:.0f} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Environment(python, error=f"{python} failed ({last})")
    try:
        data = json.loads(done.stdout)
    except ValueError:
        return Environment(python, error=f"{python} printed something unexpected")
    if not isinstance(data, dict):
        return Environment(python, error=f"{python} printed something unexpected")
    return Environment(python, {str(k): (str(v) if v is not None else None)
                                for k, v in data.items()})
