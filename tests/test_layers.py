"""The layer rules of ``../shared/DESIGN.md``, read from the sources' imports (``ast``, function-level too).

``models/`` never imports Lightning; ``datamodules/`` never imports ``models/``; no library package
(``models``, ``datamodules``, ``stages``) imports the ``demo`` package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("models", "datamodules", "stages")
FORBIDDEN = {
    "models": ("lightning", "pytorch_lightning", "demo"),
    "datamodules": ("models", "demo"),
    "stages": ("demo",),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, at any depth (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
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
