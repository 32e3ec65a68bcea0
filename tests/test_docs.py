"""The documentation: the README stays a short user guide whose links resolve, the MkDocs site
builds strictly, the commands page is what the parsers generate, and the Python API page's
imports exist."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README = REPO / "README.md"
README_MAX_LINES = 260


def _nav_pages(nav: list) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            pages += _nav_pages(value)
        else:
            pages.append(value)
    return pages


def _mkdocs_config() -> dict:
    return yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))


def test_mkdocs_builds_strictly(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        message = "mkdocs is not installed; `make test` installs it with the dev extras"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(REPO / "mkdocs.yml"), "--site-dir", str(site)],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "index.html").is_file()
    assert (site / "privacy.html").is_file()


def test_commands_page_matches_parsers() -> None:
    sys.path.insert(0, str(DOCS))
    try:
        import gen_commands
    finally:
        sys.path.remove(str(DOCS))
    expected = gen_commands.render()
    committed = (DOCS / "commands.md").read_text(encoding="utf-8")
    assert committed == expected, (
        "docs/commands.md is stale: run `.venv/bin/python docs/gen_commands.py`")


def test_every_command_is_on_the_commands_page() -> None:
    from slidefed.cli import build_parser

    page = (DOCS / "commands.md").read_text(encoding="utf-8")
    parser = build_parser()
    names = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    for name in names[0].choices:
        assert f"`slidefed {name}`" in page or name == "bench"


def test_readme_is_short_and_its_links_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets, "README.md links to nothing"
    missing = []
    for target in targets:
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (REPO / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"README.md links to missing files: {missing}"
    # The two commands, exactly as the Makefile has them.
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert f"\n{target}:" in makefile and f"make {target}" in text


def test_every_docs_page_is_in_the_nav() -> None:
    config = _mkdocs_config()
    assert config.get("strict") is True
    nav = set(_nav_pages(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == name:
                return True
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (alias.asname or alias.name.split(".")[0]) == name for alias in node.names):
            return True
    return False


def test_api_page_imports_exist() -> None:
    """Every ``from module import name`` on the API page names a module and a top-level name
    it defines (checked from the source, without importing torch)."""
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    imports = re.findall(r"^from ([\w.]+) import ([\w, ]+)$", text, flags=re.MULTILINE)
    assert len(imports) >= 10
    wrong = []
    for module, names in imports:
        if module.split(".")[0] in ("pathlib", "h5py"):
            continue
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            wrong.append(module)
            continue
        for name in (n.strip() for n in names.split(",")):
            if not _defines(Path(spec.origin), name):
                wrong.append(f"{module}.{name}")
    assert not wrong, f"docs/api.md names what does not exist: {wrong}"
