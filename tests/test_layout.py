"""The import boundaries of DESIGN.md's layout, read from the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every package ``path`` imports, at module level or in a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package, forbidden", [
    ("federation", {"wsi"}),  # the engine reads bags, never slides
    ("wsi", {"torch", "mpi4py"}),  # a hospital's preprocessing job needs neither
])
def test_package_does_not_import(package, forbidden):
    sources = sorted((REPO / package).rglob("*.py"))
    assert sources
    found = {str(p.relative_to(REPO)): sorted(imported_packages(p) & forbidden) for p in sources}
    assert {p: names for p, names in found.items() if names} == {}
