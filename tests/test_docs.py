"""The documentation, the example models file and the JSON Schema agree with the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from pydantic import AliasChoices, BaseModel

from modelhost.cli import cli, serve
from modelhost.config import (
    Backend,
    HubSource,
    ModelsFile,
    ModelSpec,
    PackageSource,
    PathSource,
    RaySpec,
    Task,
    UrlSource,
    json_schema,
    load_models_file,
)
from modelhost.registry.lifecycle import TRANSITIONS, State
from modelhost.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLE = ROOT / "config.example.yaml"
SCHEMA = ROOT / "config.schema.json"

CONFIG_CLASSES: list[type[BaseModel]] = [
    ModelsFile, ModelSpec, HubSource, PathSource, PackageSource, UrlSource, RaySpec]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _env_names(field: str) -> list[str]:
    alias = Settings.model_fields[field].validation_alias
    assert isinstance(alias, AliasChoices), f"{field} has no AliasChoices"
    names = [choice for choice in alias.choices if isinstance(choice, str)]
    assert len(names) == len(alias.choices), f"{field}: unexpected alias paths"
    return names


# (a) the environment settings ------------------------------------------------------------

@pytest.mark.parametrize("field", list(Settings.model_fields))
def test_every_setting_is_documented(field: str) -> None:
    text = _read(DOCS / "configuration.md")
    assert f"`{field}`" in text, f"setting {field} is missing from docs/configuration.md"
    for name in _env_names(field):
        assert f"`{name}`" in text, f"variable {name} ({field}) is missing from the docs"


def test_every_setting_has_a_prefixed_variable() -> None:
    for field in Settings.model_fields:
        assert any(name.startswith("MODELHOST_") for name in _env_names(field)), field


# (b) the models file -----------------------------------------------------------------------

def _yaml_key(text: str, key: str) -> bool:
    """`key:` used as a mapping key (block or flow style), in a value or in a comment."""
    return re.search(rf"(^|[\s{{,#-]){re.escape(key)}:", text, re.MULTILINE) is not None


@pytest.mark.parametrize("model", CONFIG_CLASSES, ids=lambda m: m.__name__)
def test_every_models_file_field_is_documented(model: type[BaseModel]) -> None:
    docs = _read(DOCS / "configuration.md")
    example = _read(EXAMPLE)
    assert model.__name__ in docs, f"{model.__name__} is missing from docs/configuration.md"
    for field in model.model_fields:
        assert f"`{field}`" in docs, \
            f"{model.__name__}.{field} is missing from docs/configuration.md"
        assert _yaml_key(example, field), \
            f"{model.__name__}.{field} is missing from config.example.yaml"


def test_every_backend_and_task_is_documented() -> None:
    docs = _read(DOCS / "configuration.md")
    for backend in Backend:
        assert f"#### `{backend.value}`" in docs, f"backend {backend} has no section"
    for task in Task:
        assert f"`{task.value}`" in docs, f"task {task} is not documented"


# (c) the lifecycle table -------------------------------------------------------------------

def _transitions_table(text: str) -> list[tuple[State, State, str]]:
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines)
                  if [c.strip() for c in line.strip().strip("|").split("|")]
                  == ["from", "to", "when"])
    assert re.fullmatch(r"\|[-|\s:]+\|", lines[header + 1].strip()), "no separator row"
    rows: list[tuple[State, State, str]] = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"malformed row: {line}"
        rows.append((State(cells[0].strip("`")), State(cells[1].strip("`")), cells[2]))
    return rows


def test_lifecycle_table_is_the_transitions() -> None:
    table = _transitions_table(_read(DOCS / "lifecycle.md"))
    expected = [(src, dst, when) for (src, dst), when in TRANSITIONS.items()]
    assert table == expected


def test_lifecycle_lists_every_state() -> None:
    text = _read(DOCS / "lifecycle.md")
    for state in State:
        assert f"| `{state.value}` |" in text, f"state {state} is not described"


# (d) the example models file ---------------------------------------------------------------

def test_example_validates_and_covers_every_backend() -> None:
    models_file = load_models_file(EXAMPLE)
    assert models_file.include_builtin
    assert {spec.backend for spec in models_file.models} == set(Backend)


def test_example_points_at_the_schema() -> None:
    first = _read(EXAMPLE).splitlines()[0]
    assert first == "# yaml-language-server: $schema=./config.schema.json"


# (e) the JSON Schema -----------------------------------------------------------------------

def test_schema_file_is_current() -> None:
    assert json.loads(_read(SCHEMA)) == json_schema(), \
        "regenerate it: modelhost config schema > config.schema.json"


def test_schema_file_is_the_command_output() -> None:
    result = CliRunner().invoke(cli, ["config", "schema"])
    assert result.exit_code == 0, result.output
    assert result.output == _read(SCHEMA)


# (f) the command line ----------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["config", "--help"]],
                         ids=" ".join)
def test_help(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")


def test_serve_options_are_documented() -> None:
    docs = _read(DOCS / "configuration.md") + _read(DOCS / "operations.md")
    help_text = CliRunner().invoke(cli, ["serve", "--help"]).output
    options = [opt for param in serve.params if isinstance(param, click.Option)
               for opt in param.opts]
    assert {"--host", "--port", "--config", "--log-level"} <= set(options)
    for opt in options:
        assert opt in help_text
        assert f"`{opt}" in docs, f"serve option {opt} is not documented"


def test_commands_are_documented() -> None:
    docs = "".join(_read(p) for p in sorted(DOCS.glob("*.md")))
    assert isinstance(cli, click.Group)
    for name, command in cli.commands.items():
        assert f"modelhost {name}" in docs, f"`modelhost {name}` is not documented"
        if isinstance(command, click.Group):
            for sub in command.commands:
                assert f"modelhost {name} {sub}" in docs, \
                    f"`modelhost {name} {sub}` is not documented"
