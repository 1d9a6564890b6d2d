"""License, citation, version and references agree across the files that state them."""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

import cxrlib
from cxrlib.__main__ import main
from cxrlib.data.download import SOURCES
from cxrlib.data.sources import ADAPTERS, DatasetAdapter
from cxrlib.references import (
    ADAPTER_FIELDS,
    WORKS,
    check_adapter_metadata,
    references_differ,
    references_path,
    render_references,
)

ROOT = Path(cxrlib.__file__).resolve().parent.parent
#: Top-level keys of the Citation File Format 1.2.0 schema (https://citation-file-format.github.io).
CFF_KEYS = {
    "abstract", "authors", "cff-version", "commit", "contact", "date-released", "doi",
    "identifiers", "keywords", "license", "license-url", "message", "preferred-citation",
    "references", "repository", "repository-artifact", "repository-code", "title", "type", "url",
    "version",
}
#: A release heading of Keep a Changelog: ``## [0.1.0] - 2026-12-04``.
RELEASE = re.compile(r"^## \[(?P<version>[^\]]+)\] - (?P<date>\d{4}-\d{2}-\d{2})\s*$", re.MULTILINE)


def _citation() -> dict:
    return yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))


def _latest_release() -> tuple[str, str]:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    match = RELEASE.search(text)
    assert match, "CHANGELOG.md has no release heading like '## [0.1.0] - 2026-12-04'"
    headings = re.findall(r"^## .*$", text, re.MULTILINE)
    # nothing but an [Unreleased] section may stand above the latest release
    assert headings[0] in ("## [Unreleased]", match.group(0).rstrip()), headings[0]
    return match.group("version"), match.group("date")


def test_license_identifier_agrees():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert pyproject["license"] == "MIT"
    assert license_text.splitlines()[0] == "MIT License"
    assert "Permission is hereby granted, free of charge" in license_text
    assert _citation()["license"] == pyproject["license"]


def test_version_is_written_once_and_agrees():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"], "the version lives in cxrlib/__init__.py only"
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cxrlib.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", cxrlib.__version__)

    citation = _citation()
    version, date = _latest_release()
    assert str(citation["version"]) == cxrlib.__version__
    assert version == cxrlib.__version__
    assert str(citation["date-released"]) == date


def test_citation_cff_has_the_required_fields():
    citation = _citation()
    assert citation["cff-version"] == "1.2.0"
    assert set(citation) <= CFF_KEYS, set(citation) - CFF_KEYS
    assert isinstance(citation["message"], str) and citation["message"].strip()
    assert isinstance(citation["title"], str) and citation["title"].strip()
    assert citation["authors"] and all(
        isinstance(author, dict) and (author.get("name") or author.get("family-names"))
        for author in citation["authors"]
    )
    dt.date.fromisoformat(str(citation["date-released"]))


def test_version_option_prints_the_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cxrlib {cxrlib.__version__}"


def test_every_adapter_carries_its_reference_metadata():
    check_adapter_metadata(ADAPTERS)
    page = render_references()
    for name, adapter in ADAPTERS.items():
        row = next(line for line in page.splitlines() if line.startswith(f"| `{name}` |"))
        for field in ADAPTER_FIELDS:
            assert " ".join(getattr(adapter, field).split()) in row, (name, field)
    # the terms that differ per image or forbid reuse are stated, not smoothed over
    assert "CC BY-NC-ND" in ADAPTERS["ieee8023"].license
    assert "mixed" in ADAPTERS["ieee8023"].license
    for work in ("Zunair & Hamza 2021", "Oh, Park & Ye 2020", "Minaee et al. 2020",
                 "This X-Ray Does Not Exist 2024"):
        assert any(w.short == work for w in WORKS)
        assert f"| {work} |" in page


def test_adapter_without_metadata_is_refused():
    class Undocumented(DatasetAdapter):
        name: ClassVar[str] = "undocumented"
        title: ClassVar[str] = "A collection"
        citation: ClassVar[str] = "Someone, 2020"
        url: ClassVar[str] = "https://example.org"

        def rows(self):
            return []

    with pytest.raises(ValueError, match=r"'undocumented' .*Undocumented\) lacks license"):
        render_references({**ADAPTERS, "undocumented": Undocumented})


def test_download_sources_take_their_terms_from_the_adapters():
    for source in SOURCES.values():
        assert source.adapter in ADAPTERS, source.name
        assert source.license == ADAPTERS[source.adapter].license
        assert source.citation == ADAPTERS[source.adapter].citation


def test_render_escapes_table_breakers():
    class Piped(DatasetAdapter):
        name: ClassVar[str] = "piped"
        title: ClassVar[str] = "A | B"
        citation: ClassVar[str] = "line one\nline two"
        license: ClassVar[str] = "CC BY 4.0"
        url: ClassVar[str] = "https://example.org"

        def rows(self):
            return []

    row = next(line for line in render_references({"piped": Piped}, sources={}).splitlines()
               if line.startswith("| `piped`"))
    assert "A \\| B" in row and "line one line two" in row
    assert row.count(" | ") == 5  # six cells, none split by the title's pipe


def test_committed_references_page_is_current():
    """docs/references.md is what the adapters render; if this fails run
    ``python -m cxrlib docs references`` and commit the page."""
    assert references_differ() is None, references_differ()
    assert render_references().isascii()


def test_references_differ_notices_a_stale_or_missing_page(tmp_path):
    page = tmp_path / "references.md"
    assert "does not exist" in references_differ(page)
    page.write_text(render_references().replace("CC BY 4.0", "CC0"), encoding="utf-8")
    assert "differs" in references_differ(page)
    page.write_text(render_references(), encoding="utf-8")
    assert references_differ(page) is None


def test_docs_command_checks_the_page(capsys):
    assert references_path() == ROOT / "docs" / "references.md"
    assert main(["docs", "references", "--check"]) == 0
    assert "up to date" in capsys.readouterr().out
