"""The README is a landing page whose links land, and it says how to install: clone the repository."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import cxrlib

ROOT = Path(cxrlib.__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Markdown links and images: ``[text](target)`` / ``![alt](target)``.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_a_landing_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    for page in ("results", "data", "architecture", "howto", "benchmarks", "references"):
        assert f"(docs/{page}.md)" in text, page
    assert re.search(r"!\[[^\]]*\]\(figures/\w+\.png\)", text), "the README shows a figure"
    for notebook in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"`{notebook.stem}`" in text, f"{notebook.stem} missing from the notebook table"


def test_install_is_clone_then_the_two_commands():
    """The wheel holds the library only; the README must send people to the repository."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    install = text[text.index("## Install"):text.index("\n## ", text.index("## Install") + 1)]
    assert "git clone" in install and "make demo" in install and "make test" in install
    assert "not the notebooks" in install
    # and it is true: the notebooks live outside the package and are not package data
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["packages"]["find"]["include"] == ["cxrlib*"]
    assert not any("ipynb" in pattern for patterns in tool.get("package-data", {}).values()
                   for pattern in patterns)
    assert not list((ROOT / "cxrlib").rglob("*.ipynb"))
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)


def test_relative_links_in_readme_and_docs_resolve():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # web addresses and in-page anchors
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
