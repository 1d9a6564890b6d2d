"""Run-folder helpers: atomic JSON, plain-JSON conversion, run-dir resolution."""

from __future__ import annotations

import json

import numpy as np

from cxrlib import runs


def test_write_json_converts_numpy_and_nan(tmp_path):
    path = runs.write_json(tmp_path / "m.json", {"a": np.float32(0.5), "b": np.arange(3),
                                                  "c": float("nan"), "d": (1, 2)})
    data = json.loads(path.read_text())
    assert data == {"a": 0.5, "b": [0, 1, 2], "c": None, "d": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left behind


def test_resolve_run_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_RUNS_DIR", str(tmp_path))
    assert runs.resolve_run_dir("", "phantom", "quick") == tmp_path / "phantom-quick"
    assert runs.resolve_run_dir(str(tmp_path / "x"), "phantom", "quick") == tmp_path / "x"
