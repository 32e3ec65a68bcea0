"""The floors of DESIGN.md's layout, read from the source with ``ast``: every package imports
only the floors below it, and no module below the console script imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("formats", "wsi", "preprocessing", "federation", "report", "benchmarks", "slidefed")
HEAVY = {"torch", "torchvision", "timm", "opacus", "mpi4py"}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every package ``path`` imports, at module level or in a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def imported_modules(path: Path) -> set[str]:
    """Full dotted names of every module ``path`` imports (``from a.b import c``: ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


# What each floor may not import: the floors above it, and what its jobs must run without.
FORBIDDEN = {
    # the bottom floor: file formats and helpers every floor shares
    "formats": {"wsi", "preprocessing", "federation", "report", "benchmarks", "slidefed", *HEAVY},
    # reading slides: a hospital's preprocessing job needs no torch or MPI
    "wsi": {"preprocessing", "federation", "report", "benchmarks", "slidefed", *HEAVY},
    # per-hospital jobs: trains nothing
    "preprocessing": {"federation", "report", "benchmarks", "slidefed", "opacus", "mpi4py"},
    # the engine reads bags, never slides, and is launched by the console script
    "federation": {"wsi", "preprocessing", "report", "benchmarks", "slidefed"},
    # the workflow's HTML page reads run files; it never loads a model
    "report": {"wsi", "preprocessing", "benchmarks", "slidefed", *HEAVY},
    # benchmarks measure every floor, predict (slidefed.predict) included; like everything
    # they never import the console script (test_nothing_imports_the_console_script)
    "benchmarks": {"report"},
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_the_floors_below_it(package: str) -> None:
    sources = sorted((REPO / package).rglob("*.py"))
    assert sources
    found = {str(p.relative_to(REPO)): sorted(imported_packages(p) & FORBIDDEN[package])
             for p in sources}
    assert {p: names for p, names in found.items() if names} == {}


def test_nothing_imports_the_console_script() -> None:
    """``slidefed.cli`` composes every floor; a module it (indirectly) imports that imported it
    back would be a cycle from the library to the entry point."""
    sources = sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py")
                     if p.name not in ("cli.py", "__main__.py"))
    found = [str(p.relative_to(REPO)) for p in sources if "slidefed.cli" in imported_modules(p)]
    assert found == []


def test_every_package_is_a_floor() -> None:
    """A new top-level package is placed on a floor here before it lands."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages == set(PACKAGES)
