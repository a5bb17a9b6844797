"""The layer rules of ``../shared/DESIGN.md``, read from the sources' imports (``ast``, function-level too).

``models/`` never imports Lightning; ``datamodules/`` never imports ``models/``; neither imports
``stages/`` (which composes them); no library package (``models``, ``datamodules``, ``stages``)
imports the ``demo`` package; and no module of ours imports one that imports it back
(``ARCHITECTURE.md``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("models", "datamodules", "stages")
FORBIDDEN = {
    "models": ("lightning", "pytorch_lightning", "datamodules", "stages", "demo"),
    "datamodules": ("models", "stages", "demo"),
    "stages": ("demo",),
}


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))  # fmt: skip


def _nodes(tree: ast.AST, runtime_only: bool):
    """``ast.walk``, leaving out ``if TYPE_CHECKING:`` blocks when ``runtime_only``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if runtime_only and _type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imported_modules(path: Path, *, runtime_only: bool = False) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, at any depth (relative imports resolved);
    ``runtime_only``: not those under ``if TYPE_CHECKING:``, which never run."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), runtime_only):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base:
                found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
    return found


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return sorted(set(bad))


@pytest.mark.parametrize("package", LIBRARY)
def test_library_packages_keep_to_their_layer(package):
    assert violations(package) == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    fake = tmp_path / "datamodules"
    fake.mkdir()
    (fake / "x.py").write_text("def f():\n    from models.rvq import ResidualVQ\n    import demo.tiny\n")
    (fake / "y.py").write_text("from .. import models\n")
    globals()["ROOT"] = tmp_path
    try:
        found = violations("datamodules")
    finally:
        globals()["ROOT"] = Path(__file__).resolve().parents[1]
    assert any("x.py:2 imports models.rvq" in v for v in found), found
    assert any("x.py:3 imports demo.tiny" in v for v in found), found
    assert any("y.py:1 imports models" in v for v in found), found


PACKAGES = (*LIBRARY, "demo")


def module_graph(root: Path | None = None) -> dict[str, set[str]]:
    """``module -> modules of ours it imports`` when it runs (any depth; not under ``if TYPE_CHECKING:``),
    one node per source file."""
    root = root or ROOT
    files = {".".join(p.relative_to(root).with_suffix("").parts): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    names = {m.removesuffix(".__init__"): m for m in files}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges = set()
        for _, imported in _imports_under(path, root):
            target = names.get(imported)
            if target and target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def _imports_under(path: Path, root: Path) -> list[tuple[int, str]]:
    global ROOT
    saved, ROOT = ROOT, root
    try:
        return imported_modules(path, runtime_only=True)
    finally:
        ROOT = saved


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, one per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_our_modules():
    """Function-level imports count too: an import deferred into a function still ties the two
    modules together."""
    assert cycles(module_graph()) == []


def test_the_cycle_finder_finds_a_deferred_import_cycle(tmp_path):
    pkg = tmp_path / "stages"
    pkg.mkdir()
    for name in PACKAGES[:2] + PACKAGES[3:]:
        (tmp_path / name).mkdir()
    (pkg / "cli.py").write_text("from stages.promote import Promote\n")
    (pkg / "promote.py").write_text("class Promote: ...\ndef main():\n    from stages.cli import main\n")
    (pkg / "other.py").write_text("import stages.cli\n")
    (pkg / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from stages.other import x\n")
    (pkg / "other.py").write_text("import stages.cli\nimport stages.typed\n")
    assert cycles(module_graph(tmp_path)) == [["stages.cli", "stages.promote"]]
