"""Notebooks are stored clean and run end to end (quick profile) through the real pipeline."""

from __future__ import annotations

import json
import re

import nbformat
import pytest

from cxrlib import config, stages
from cxrlib.pipeline import PipelineError, list_notebooks, run_pipeline

NOTEBOOKS = list_notebooks()
COMMON_PARAMETERS = {"DATASET", "PROFILE", "SEED", "RUN_DIR", "DEVICE"}


def test_there_are_numbered_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no NN_name.ipynb notebook"
    assert NOTEBOOKS[0].name.startswith("01_")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean_with_parameters(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path.name} cell {i} has stored outputs"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"
            assert "sys.path" not in cell.source, f"{path.name} cell {i} edits sys.path"
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    names = {line.split("=")[0].strip() for line in tagged[0].source.splitlines()
             if "=" in line and not line.lstrip().startswith("#")}
    assert COMMON_PARAMETERS <= names, f"{path.name} parameters lack {COMMON_PARAMETERS - names}"
    after = nb.cells[nb.cells.index(tagged[0]) + 1:]
    first_code = next(c for c in after if c.cell_type == "code")
    assert first_code.source.startswith(f'stage = open_stage("{path.stem[:2]}", globals())'), \
        f"{path.name}: the cell after the parameters must open its stage (seeds, profile, folders)"
    assert "stage.finish(" in "".join(c.source for c in nb.cells), f"{path.name} does not record its metrics"
    assert nb.cells[-1].cell_type == "markdown" and "Exercises" in nb.cells[-1].source


@pytest.mark.slow
def test_quick_pipeline_runs_every_notebook(tmp_path, monkeypatch):
    """The CI smoke run: every numbered notebook, quick profile, phantom data, fresh folders."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "data"))
    run_dir = tmp_path / "run"
    gallery = config.figures_dir() / "phantom_gallery.png"
    before = gallery.stat().st_mtime_ns if gallery.exists() else None
    result = run_pipeline(dataset="phantom", profile="quick", run_dir=run_dir, device="cpu",
                          progress=False)
    assert result.ok and [s.notebook for s in result.stages] == [p.name for p in NOTEBOOKS]
    for stage in result.stages:
        executed = nbformat.read(stage.output, as_version=4)
        errors = [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors
    data_metrics = json.loads((stages.output_path(run_dir, "01", "metrics.json")).read_text())
    assert data_metrics["leakage_ok"] is True
    assert data_metrics["n_images"] > 0 and data_metrics["n_unreadable"] == 0
    assert stages.output_path(run_dir, "01", "gallery.png").exists()
    # the held-out phantom site: assembled by 01, scored by 04 on both sets with the floor, segmented by 02
    assert data_metrics["external"]["heldout_valley_imaging"]["n_kept"] > 0
    external = json.loads(stages.output_path(run_dir, "04", "metrics.json").read_text())["external"]
    assert [row["evaluation_set"] for row in external["table"]][:2] == ["internal", "heldout_valley_imaging"]
    assert all("floor_auc" in row and "versus_floor" in row for row in external["table"])
    segmentation = json.loads(stages.output_path(run_dir, "02", "metrics.json").read_text())
    assert segmentation["external"]["heldout_valley_imaging"]["n_test"] > 0
    # the quick run must not overwrite the README figures
    assert (gallery.stat().st_mtime_ns if gallery.exists() else None) == before
    # executed notebooks keep their widgets' state (the explorers show without a kernel)
    executed = nbformat.read(result.stages[0].output, as_version=4)
    assert executed.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state")
    from nbformat.sign import NotebookNotary

    assert NotebookNotary().check_signature(executed), "JupyterLab draws stored widgets only in trusted notebooks"
    # the same profile, seed and machine give the same metrics (every value but wall-clock times)
    again = run_pipeline(dataset="phantom", profile="quick", run_dir=tmp_path / "again", device="cpu",
                         progress=False)
    for first, _ in zip(result.stages, again.stages, strict=True):  # strict: both ran every stage
        stage = stages.get_stage(first.notebook.removesuffix(".ipynb"))
        assert _without_timings(json.loads(stages.output_path(run_dir, stage, "metrics.json").read_text())) == \
            _without_timings(json.loads(stages.output_path(tmp_path / "again", stage, "metrics.json").read_text())), \
            f"{stage.name}: a rerun computed other metrics"
    # a notebook run by hand with PROFILE = "quick" computes what the pipeline computed
    by_hand = tmp_path / "by_hand"
    for key in ("01", "02"):
        _run_by_hand(key, profile="quick", run_dir=by_hand)
        pipeline_metrics = json.loads(stages.output_path(run_dir, key, "metrics.json").read_text())
        hand_metrics = json.loads(stages.output_path(by_hand, key, "metrics.json").read_text())
        assert _without_timings(hand_metrics) == _without_timings(pipeline_metrics), key


def _run_by_hand(key: str, *, profile: str, run_dir) -> None:
    """Execute a notebook as a person would in JupyterLab: edit its parameters cell, run all cells."""
    from nbclient import NotebookClient

    stage = stages.get_stage(key)
    nb = nbformat.read(config.notebooks_dir() / stage.notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    edited = re.sub(r'^PROFILE = "default"', f'PROFILE = "{profile}"', cell.source, flags=re.M)
    edited = re.sub(r'^RUN_DIR = ""', f"RUN_DIR = {str(run_dir)!r}", edited, flags=re.M)
    edited = re.sub(r'^DEVICE = "auto"', 'DEVICE = "cpu"', edited, flags=re.M)
    assert edited.count(profile) and edited.count(str(run_dir)), "the parameters cell changed its layout"
    cell.source = edited
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(config.notebooks_dir())}}).execute()


def _without_timings(value):
    """``value`` without wall-clock entries (keys naming seconds or times), which differ between runs."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items()
                if not re.search(r"seconds|_s$|time", k)}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_pipeline_failure_names_notebook_and_cell(tmp_path):
    bad = tmp_path / "nbs"
    bad.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("DATASET = 'x'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('broken on purpose')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, bad / "01_broken.ipynb")
    with pytest.raises(PipelineError) as info:
        run_pipeline(profile="quick", run_dir=tmp_path / "run", notebooks_dir=bad, progress=False)
    message = str(info.value)
    assert "01_broken.ipynb" in message and "broken on purpose" in message and "cell" in message
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["stages"][0]["ok"] is False
