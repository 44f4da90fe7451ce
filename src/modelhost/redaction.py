"""Secrets in model specs: which values are secret, how they are shown, and how they are kept
out of the state database (docs/admin-api.md, "Secrets").

A secret is, in a spec (as a JSON-like dict):

* `source.api_key` (the key sent to a remote server);
* the user and password of `source.url` (`http://user:pass@host/v1`);
* every value of `env`;
* an `engine_args` value whose key names a secret (`api_key`, `hf_token`, `password`, ...);
* in `command`, the argument after a flag that names a secret (`--api-key X`), or the value
  of `--api-key=X`.

`redact_spec` replaces each with `***` (what every admin answer, history entry and event
shows); `split_spec` does the same and returns the values by their place in the spec
(`"source.api_key"`, `"env.HF_TOKEN"`, `"command.4"`), which `merge_spec` puts back. The
state database stores the redacted spec; the values live in a 0600 file beside it
(`persistence.SecretFile`). `Scrubber` removes known secret values and URL credentials from
free text (errors, worker output, log lines).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
_SECRET_NAME = re.compile(r"(?i)(^|[_-])(api[_-]?key|key|token|secret|password|passwd|pass|"
                          r"credentials?|auth|authorization|bearer|cookie|session)([_-]|$)")
_FLAG = re.compile(r"^--?([A-Za-z0-9_-]+)$")
_FLAG_ASSIGN = re.compile(r"^(--?([A-Za-z0-9_-]+)=)(.+)$")
# user:password@ (or user@) in any URL of a text.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")
# Secrets shorter than this are not searched for in free text (they would hide digits).
MIN_SCRUB_LENGTH = 6


def secret_name(name: str) -> bool:
    """Whether an engine argument or variable name says its value is a secret."""
    return bool(_SECRET_NAME.search(name))


def _secret_flag(part: object) -> bool:
    match = _FLAG.match(part) if isinstance(part, str) else None
    return match is not None and secret_name(match.group(1))


def _secret_assign(part: str) -> re.Match[str] | None:
    match = _FLAG_ASSIGN.match(part)
    return match if match and secret_name(match.group(2)) else None


def redact_url(url: str) -> str:
    """The URL with its user and password (if any) replaced by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _URL_USERINFO.sub(r"\1" + MASK + "@", url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{MASK}@{host}"))


def url_credentials(url: str) -> str | None:
    """The `user:password` part of a URL, or None."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return None
    return netloc.rsplit("@", 1)[0] if "@" in netloc else None


def _masked_value(place: tuple[str | int, ...], value: Any) -> bool:
    """Whether the value at a secret place is already `***` (a redacted spec)."""
    if not isinstance(value, str):
        return False
    if place == ("source", "url"):
        return url_credentials(value) == MASK
    match = _secret_assign(value) if place[0] == "command" else None
    return (match.group(3) if match else value) == MASK


def _places(spec: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """(place, value) of every secret of a spec dict (not those already `***`)."""
    return [(place, value) for place, value in _all_places(spec)
            if not _masked_value(place, value)]


def _all_places(spec: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    found: list[tuple[tuple[str | int, ...], str]] = []
    source = spec.get("source")
    if isinstance(source, dict):
        if isinstance(source.get("api_key"), str) and source["api_key"]:
            found.append((("source", "api_key"), source["api_key"]))
        if isinstance(source.get("url"), str) and url_credentials(source["url"]):
            found.append((("source", "url"), source["url"]))
    env = spec.get("env")
    if isinstance(env, dict):
        found += [(("env", k), v) for k, v in env.items() if isinstance(v, str) and v]
    args = spec.get("engine_args")
    if isinstance(args, dict):
        found += [(("engine_args", k), v) for k, v in args.items()
                  if isinstance(v, str) and v and secret_name(k)]
    command = spec.get("command")
    if isinstance(command, list):
        for i, part in enumerate(command):
            if not isinstance(part, str):
                continue
            previous = command[i - 1] if i else None
            if (_secret_flag(previous) and not part.startswith("-")) or _secret_assign(part):
                found.append((("command", i), part))
    return found


def _masked(place: tuple[str | int, ...], value: str) -> str:
    if place == ("source", "url"):
        return redact_url(value)
    match = _secret_assign(value) if place[0] == "command" else None
    return match.group(1) + MASK if match else MASK


def _set(spec: dict[str, Any], place: tuple[str | int, ...], value: str) -> None:
    holder: Any = spec
    for key in place[:-1]:
        holder = holder[key]
    holder[place[-1]] = value


def _key(place: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in place)


def redact_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of the spec with every secret replaced by `***`."""
    return split_spec(spec)[0]


def split_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The redacted spec, and the secret values by place (`"env.NAME"`)."""
    places = _places(spec)
    if not places:
        return spec, {}
    public = copy.deepcopy(spec)
    secrets: dict[str, str] = {}
    for place, value in places:
        _set(public, place, _masked(place, value))
        secrets[_key(place)] = value
    return public, secrets


def merge_spec(public: dict[str, Any], secrets: dict[str, str]) -> dict[str, Any]:
    """The spec with its secrets put back (the inverse of `split_spec`)."""
    if not secrets:
        return public
    spec = copy.deepcopy(public)
    for place in _places_of(spec):
        key = _key(place)
        if key in secrets:
            _set(spec, place, secrets[key])
    return spec


def _places_of(spec: dict[str, Any]) -> list[tuple[str | int, ...]]:
    """Every place that may hold a secret, redacted or not."""
    places: list[tuple[str | int, ...]] = []
    source = spec.get("source")
    if isinstance(source, dict):
        places += [("source", key) for key in ("api_key", "url") if key in source]
    for section in ("env", "engine_args"):
        values = spec.get(section)
        if isinstance(values, dict):
            places += [(section, k) for k in values]
    command = spec.get("command")
    if isinstance(command, list):
        places += [("command", i) for i in range(len(command))]
    return places


def restore_masked(spec: dict[str, Any], secrets: dict[str, str]) -> dict[str, Any]:
    """The spec with each `***` it holds at a place of `secrets` given that secret back: a
    card's spec sent back with a change keeps the stored key."""
    spec = copy.deepcopy(spec)
    for place in _places_of(spec):
        key = _key(place)
        holder: Any = spec
        for part in place[:-1]:
            holder = holder[part]
        value = holder[place[-1]]
        if key not in secrets or not _masked_value(place, value):
            continue
        if place == ("source", "url"):  # the stored credentials, in the URL as it is now
            parts = urlsplit(value)
            host = parts.netloc.rsplit("@", 1)[1]
            value = urlunsplit(parts._replace(
                netloc=f"{url_credentials(secrets[key])}@{host}"))
        else:
            value = secrets[key]
        holder[place[-1]] = value
    return spec


def secret_texts(spec: dict[str, Any]) -> list[str]:
    """The secret values of a spec, as they may appear in text."""
    values = []
    for place, value in _places(spec):
        if place == ("source", "url"):
            credentials = url_credentials(value) or ""
            values += [credentials, *credentials.split(":", 1)]
        elif place[0] == "command" and (match := _secret_assign(value)):
            values.append(match.group(3))
        else:
            values.append(value)
    return values


class Scrubber:
    """Removes known secret values and URL credentials from text."""

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()

    def set(self, secrets: Iterable[str]) -> None:
        # Longest first, so that a secret containing another is replaced whole.
        self._secrets = tuple(sorted({s for s in secrets if len(s) >= MIN_SCRUB_LENGTH},
                                     key=len, reverse=True))

    def __call__(self, text: str) -> str:
        if "@" in text:
            text = _URL_USERINFO.sub(r"\1" + MASK + "@", text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def value(self, data: Any) -> Any:
        """A JSON-like value with every string scrubbed."""
        if isinstance(data, str):
            return self(data)
        if isinstance(data, dict):
            return {k: self.value(v) for k, v in data.items()}
        if isinstance(data, list | tuple):
            return [self.value(v) for v in data]
        return data


class ScrubFilter(logging.Filter):
    """A logging filter (put on the handlers) that scrubs every record's message."""

    def __init__(self, scrub: Scrubber) -> None:
        super().__init__()
        self.scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let the handler report it
            return True
        clean = self.scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        return True
