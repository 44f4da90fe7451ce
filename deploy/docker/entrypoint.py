"""The images' entrypoint: reads the secrets given as files into modelhost's settings, then
replaces itself with the command (`modelhost serve` by default), which so keeps the process id
and receives the container's signals itself (SIGTERM drains, docs/operations.md).

modelhost reads its keys, the Hugging Face token and the database URL from the environment.
Docker and compose hand secrets over as files (`/run/secrets/NAME`); a value written in
`environment:` would be shown by `docker inspect` and kept in the compose file. For each name
below, `NAME_FILE=/path` sets `NAME` from that file:

* key lists (`MODELHOST_OPENAI_API_KEYS`, `MODELHOST_ADMIN_KEYS`): one key a line, or
  comma-separated; blank lines and lines starting with `#` are skipped; the keys are joined
  with commas, as the setting takes them;
* single values (`MODELHOST_HUGGINGFACE_TOKEN`, `MODELHOST_DATABASE_URL`): the file's first
  line that is neither blank nor a comment.

A file that holds nothing leaves the setting unset (the token is optional; the gateway refuses
to listen on 0.0.0.0 with no key at all, so a forgotten key file stops it at start, with the
reason). Setting both `NAME` and `NAME_FILE`, or naming a file that cannot be read, stops the
container at once with exit status 78 (EX_CONFIG) and says which. The `_FILE` variables are
removed before the command runs. Workers never see any of these (docs/security.md).
"""

from __future__ import annotations

import os
import sys

KEY_LISTS = ("MODELHOST_OPENAI_API_KEYS", "MODELHOST_ADMIN_KEYS")
SINGLE_VALUES = ("MODELHOST_HUGGINGFACE_TOKEN", "MODELHOST_DATABASE_URL")
DEFAULT_COMMAND = ["modelhost", "serve"]
EX_CONFIG = 78


class SecretFileError(Exception):
    """A `_FILE` variable that cannot be honoured; the message says why."""


def _lines(text: str) -> list[str]:
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_secret(name: str, path: str) -> str:
    """The value that the file at `path` gives the setting `name` ("" when it holds none)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SecretFileError(f"{name}_FILE={path}: cannot be read ({reason}); the file "
                              f"must be readable by uid {os.getuid()}") from None
    lines = _lines(text)
    if name in KEY_LISTS:
        keys = [key.strip() for line in lines for key in line.split(",")]
        return ",".join(key for key in keys if key)
    return lines[0] if lines else ""


def apply_secret_files(environ: dict[str, str]) -> None:
    """Set each `NAME` from `NAME_FILE` in `environ`, and drop the `_FILE` variables."""
    for name in KEY_LISTS + SINGLE_VALUES:
        path = environ.pop(f"{name}_FILE", "")
        if not path:
            continue
        if environ.get(name):
            raise SecretFileError(f"both {name} and {name}_FILE are set: keep one (the file "
                                  "keeps the secret out of `docker inspect`)")
        value = read_secret(name, path)
        if value:
            environ[name] = value


def main(argv: list[str]) -> None:
    environ = dict(os.environ)
    try:
        apply_secret_files(environ)
    except SecretFileError as exc:
        print(f"modelhost entrypoint: {exc}", file=sys.stderr)
        sys.exit(EX_CONFIG)
    command = argv or DEFAULT_COMMAND
    try:
        os.execvpe(command[0], command, environ)
    except OSError as exc:
        print(f"modelhost entrypoint: cannot run {command[0]!r}: {exc.strerror}",
              file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
