"""Guards that keep the repository readable: import contracts, module sizes, docs and layout.

The import contracts live in pyproject.toml ([tool.importlinter]) and are checked by
import-linter's `lint-imports`; the second test proves that the cycle contract catches a
function-local import, so a green first test means something.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
MAX_LINES = 500
DOC_PAGES = ("serving", "search", "training", "models", "benchmarks")


def lint_imports(cwd: Path, *config: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache", *config],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_import_contracts_of_pyproject_are_kept():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BROKEN" not in out.stdout and "KEPT" in out.stdout


def test_the_cycle_contract_catches_a_function_local_import(tmp_path):
    pkg = tmp_path / "demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from demo import b\n")
    (pkg / "b.py").write_text("def f():\n    from demo import a  # hidden in a function\n")
    (tmp_path / "contracts.toml").write_text(
        textwrap.dedent(
            """
            [tool.importlinter]
            root_packages = ["demo"]

            [[tool.importlinter.contracts]]
            name = "no cycles"
            type = "acyclic_siblings"
            ancestors = ["demo"]
            """
        )
    )
    out = lint_imports(tmp_path, "contracts.toml")
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout + out.stderr


def test_no_source_file_of_the_product_packages_is_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for package in ("embedserve", "training")
        for p in sorted((ROOT / package).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_the_docs_are_pages_in_docs_and_the_readme_links_to_each():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300, "the README is the user's manual: at most 300 lines"
    for page in DOC_PAGES:
        assert (ROOT / "docs" / f"{page}.md").is_file(), f"docs/{page}.md is missing"
        assert f"docs/{page}.md" in readme, f"the README does not link docs/{page}.md"


def test_every_relative_link_of_the_readme_and_the_docs_resolves():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def layout_section() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert match, "the README has no '## Layout' section"
    return match.group(1)


def test_the_layout_section_matches_the_tree():
    """Every module and subpackage of the product is named, and every named path exists."""
    layout = layout_section()
    named = set(re.findall(r"`([\w./-]+)`", layout))
    missing_paths = sorted(p for p in named if "/" in p and not (ROOT / p.rstrip("/")).exists())
    assert not missing_paths, f"the Layout names paths that do not exist: {missing_paths}"
    unnamed = []
    for package in ("embedserve", "training", "benchmarks"):
        for p in sorted((ROOT / package).iterdir()):
            if p.name.startswith(("_", ".")) or p.name == "results":
                continue
            if p.is_file() and p.suffix != ".py":
                continue
            rel = str(p.relative_to(ROOT))
            if not ({rel, rel + "/", p.name, p.name + "/", p.stem} & named):
                unnamed.append(rel)
    assert not unnamed, f"the Layout section leaves out: {unnamed}"


@pytest.mark.parametrize("package", ["embedserve", "training"])
def test_importing_a_product_package_loads_no_model_and_no_torch_for_embedserve(package):
    code = (
        f"import importlib, pkgutil, sys; import {package}; "
        f"mods = [m.name for m in pkgutil.walk_packages({package}.__path__, '{package}.')"
        " if not m.name.endswith('.service')]; "
        "[importlib.import_module(m) for m in mods]; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    if package == "embedserve":
        assert out.stdout.strip() == "False", "a module of embedserve imported torch"
