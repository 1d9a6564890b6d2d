"""CXR Lab library."""

#: The one place the version is written: pyproject.toml reads it (setuptools dynamic
#: version), CITATION.cff and CHANGELOG.md must agree (tests/test_citation.py), and runs
#: record it in params.json.
__version__ = "0.1.0"
