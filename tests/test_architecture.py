"""The shape of the code (docs/architecture.md): no import circle between modelhost's modules,
no module over 600 lines, and the request path where the architecture document says it is.

Imports are read from the source (every `import` and `from ... import`, also those inside
functions, except under `if TYPE_CHECKING:`), so a circle hidden behind a lazy import counts.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = SRC / "modelhost"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
           if "migrations" not in p.parts}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str) -> str | None:
    """The modelhost module `name` names (or the package holding it), if any."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """The modelhost modules `module` imports."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for branch in node.orelse:
                visit(branch)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name)
                if target is not None:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = _resolve(f"{base}.{alias.name}") if base else None
                if target is None or target == module:
                    target = _resolve(base)
                if target is not None and target != module:
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def import_circles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph = {m: imports_of(m) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return circles


def test_no_import_circle() -> None:
    assert import_circles() == []


def test_the_checker_finds_a_circle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The circle check itself, on two modules that import each other (one lazily)."""
    (tmp_path / "modelhost").mkdir()
    (tmp_path / "modelhost" / "__init__.py").write_text("")
    (tmp_path / "modelhost" / "a.py").write_text("from modelhost.b import thing\n")
    (tmp_path / "modelhost" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import modelhost.c\n"
        "def f():\n    from modelhost import a\n")
    (tmp_path / "modelhost" / "c.py").write_text("import modelhost.b\n")
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    fake = {module_name(p): p for p in (tmp_path / "modelhost").rglob("*.py")}
    monkeypatch.setattr(f"{__name__}.MODULES", fake)
    assert import_circles() == [["modelhost.a", "modelhost.b"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_600_lines(module: str) -> None:
    lines = MODULES[module].read_text().count("\n")
    assert lines <= MAX_LINES, f"{module} has {lines} lines"


def test_the_request_path_is_where_the_architecture_says() -> None:
    """Every `module.Name` the request path of docs/architecture.md names exists there."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = {path for path in re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", doc)
             if not path.startswith("tests/")}
    assert named, "docs/architecture.md names no module"
    for relative in named:
        assert (PACKAGE / relative).is_file(), f"docs/architecture.md names {relative}"
    for relative, name in re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py):([A-Za-z_.]+)`", doc):
        source = (PACKAGE / relative).read_text()
        first = name.split(".")[0]
        last = name.split(".")[-1]
        assert re.search(rf"^(class|def|async def) {first}\b|^{first}\b *[:=]"
                         rf"|^    (async )?def {last}\b", source, re.M), \
            f"docs/architecture.md names {relative}:{name}, which is not there"
