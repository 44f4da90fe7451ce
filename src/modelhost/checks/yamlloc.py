"""YAML with line numbers, compose-style `${VAR}` interpolation, and `.env` files.

PyYAML's composer gives nodes with marks; `Node` keeps each value with the line it was
written on (1-based), so that a finding can point at the line a person must change. Merge
keys (`<<: *anchor`, used by compose files for shared blocks) are resolved the way YAML 1.1
says: the mapping's own keys win.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Node:
    """A YAML value and where it was written. `value` is a str, int, float, bool, None,
    a dict of str to Node, or a list of Node."""

    value: Any
    line: int
    raw: str | None = None  # a scalar's text as written (before YAML typing)
    items: dict[str, Node] = field(default_factory=dict)  # a mapping's keys' nodes
    end_line: int = 0  # the last line the value spans

    def get(self, key: str) -> Node | None:
        if isinstance(self.value, dict):
            found = self.value.get(key)
            return found if isinstance(found, Node) else None
        return None

    def key_line(self, key: str) -> int:
        """The line of `key` in this mapping (the mapping's own line when absent)."""
        node = self.items.get(key)
        return node.line if node is not None else self.line

    def mapping(self) -> dict[str, Node]:
        return self.value if isinstance(self.value, dict) else {}

    def sequence(self) -> list[Node]:
        return self.value if isinstance(self.value, list) else []

    def scalar(self) -> str | None:
        """A scalar as text (None for a mapping, a list or null)."""
        if isinstance(self.value, dict | list) or self.value is None:
            return None
        if isinstance(self.value, bool):
            return "true" if self.value else "false"
        return self.raw if self.raw is not None else str(self.value)

    def plain(self) -> Any:
        """The value as plain Python data (no Nodes)."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value


class YamlError(Exception):
    """A file that is not YAML; `line` is where the parser gave up (1-based), if known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


_constructor = yaml.constructor.SafeConstructor()


def _convert(node: yaml.Node) -> Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        values: dict[str, Node] = {}
        keys: dict[str, Node] = {}
        merged: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) \
                    else [value_node]
                for source in sources:
                    converted = _convert(source)
                    for k, v in converted.mapping().items():
                        merged.setdefault(k, v)
                continue
            key = _convert(key_node)
            scalar = key.scalar()
            name = scalar if scalar is not None else str(key.value)
            values[name] = _convert(value_node)
            keys[name] = key
        for k, v in merged.items():
            values.setdefault(k, v)
        return Node(values, line, items=keys, end_line=node.end_mark.line + 1)
    if isinstance(node, yaml.SequenceNode):
        return Node([_convert(child) for child in node.value], line,
                    end_line=node.end_mark.line + 1)
    assert isinstance(node, yaml.ScalarNode)
    try:
        value = _constructor.construct_object(node, deep=True)
    except yaml.YAMLError:
        value = node.value
    if not isinstance(value, str | int | float | bool) and value is not None:
        value = node.value  # dates, binary: their text is enough here
    return Node(value, line, raw=node.value, end_line=node.end_mark.line + 1)


def load_yaml(text: str, name: str = "<string>") -> Node | None:
    """The document's root node (None for an empty document)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        line = mark.line + 1 if mark is not None else None
        raise YamlError(f"{name} is not valid YAML: {problem}"
                        + (f" (line {line})" if line else ""), line) from None
    return None if root is None else _convert(root)


# ---------------------------------------------------------------------------------------------
# Interpolation, as `docker compose` does it: ${VAR}, ${VAR:-default}, ${VAR-default},
# ${VAR:?error}, ${VAR?error}, ${VAR:+alt}, $VAR, and $$ for a literal dollar.

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATOR = re.compile(r":?[-?+]")


@dataclass
class Interpolated:
    text: str
    unresolved: list[str]  # variables used with no value and no default
    variables: list[str]  # every variable named


def _closing(text: str, start: int) -> int:
    """The index of the `}` closing the `${` whose content starts at `start` (nesting
    allowed: ${A:-${B}}), or -1."""
    depth = 1
    i = start
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def interpolate(text: str, env: Mapping[str, str]) -> Interpolated:
    result = Interpolated("", [], [])
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
            continue
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("${", i):
            end = _closing(text, i + 2)
            name = _NAME.match(text, i + 2)
            if end < 0 or name is None:
                out.append(text[i:])
                break
            out.append(_braced(name[0], text[name.end():end], env, result))
            i = end + 1
            continue
        name = _NAME.match(text, i + 1)
        if name is None:
            out.append("$")
            i += 1
            continue
        out.append(_braced(name[0], "", env, result))
        i = name.end()
    result.text = "".join(out)
    return result


def _braced(name: str, rest: str, env: Mapping[str, str], result: Interpolated) -> str:
    result.variables.append(name)
    operator = _OPERATOR.match(rest)
    op, arg = (operator[0], rest[operator.end():]) if operator else ("", "")
    value = env.get(name)
    present, nonempty = value is not None, bool(value)

    def nested(text: str) -> str:
        inner = interpolate(text, env)
        result.unresolved += inner.unresolved
        result.variables += inner.variables
        return inner.text

    if op in (":-", "-"):
        return nested(arg) if (not nonempty if op == ":-" else not present) else value or ""
    if op in (":+", "+"):
        return nested(arg) if (nonempty if op == ":+" else present) else ""
    if not present:
        result.unresolved.append(name)
    return value or ""


# ---------------------------------------------------------------------------------------------
# .env files, as compose reads them: KEY=VALUE, optional `export `, quotes, # comments.

@dataclass(frozen=True)
class EnvEntry:
    name: str
    value: str
    line: int


_ENV_LINE = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(.*)")


def parse_env_file(text: str) -> list[EnvEntry]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(line)
        if match is None:
            continue
        name, value = match[1], match[2].strip()
        if value[:1] in ("'", '"'):
            quote = value[0]
            end = value.find(quote, 1)
            value = value[1:end] if end > 0 else value[1:]
        else:
            value = re.sub(r"\s+#.*$", "", value)
        entries.append(EnvEntry(name, value, number))
    return entries


def read_env_file(path: Path) -> dict[str, str]:
    try:
        return {e.name: e.value for e in parse_env_file(path.read_text(encoding="utf-8"))}
    except (OSError, UnicodeDecodeError):
        return {}


def walk(node: Node) -> Iterator[Node]:
    yield node
    if isinstance(node.value, dict):
        for child in node.value.values():
            yield from walk(child)
    elif isinstance(node.value, list):
        for child in node.value:
            yield from walk(child)
