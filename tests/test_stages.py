"""The stage contract: one table of stages, override-only profiles, open_stage / finish, parameter routing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cxrlib import config, pipeline, stages
from cxrlib.stages import runtime

NOTEBOOKS = pipeline.list_notebooks()


def _namespace(**values):
    namespace = dict(runtime.notebook_parameters("04"))
    namespace.update(values)
    return namespace


def test_every_notebook_is_a_stage_and_every_stage_a_notebook():
    assert [p.stem for p in NOTEBOOKS] == [s.name for s in stages.STAGES]
    for stage in stages.STAGES:
        assert stage.name.startswith(stage.key + "_")
        assert Path(config.PROJECT_ROOT / stage.module.replace(".", "/")).with_suffix(".py").exists() or \
            Path(config.PROJECT_ROOT / stage.module.replace(".", "/")).is_dir() or stage.key == "01"


def test_edges_point_backwards_unless_declared_optional():
    keys = [s.key for s in stages.STAGES]
    for stage in stages.STAGES:
        for upstream in (*stage.manifest_from, *stage.reads):
            assert keys.index(upstream) < keys.index(stage.key), (stage.name, upstream)
        for later in stage.optional:
            assert keys.index(later) > keys.index(stage.key), (stage.name, later)


def test_get_stage_by_key_and_name():
    assert stages.get_stage("04").name == "04_classifiers"
    assert stages.get_stage("04_classifiers").key == "04"
    with pytest.raises(KeyError, match="unknown stage"):
        stages.get_stage("04_classifier")
    with pytest.raises(KeyError):
        stages.get_stage("09")


def test_input_manifest_takes_the_first_existing_upstream(tmp_path):
    with pytest.raises(FileNotFoundError, match="01_data_assembly/manifest.csv"):
        stages.input_manifest(tmp_path, "04")
    for key in ("01", "02"):
        (stages.stage_dir(tmp_path, key) / "manifest.csv").write_text("x\n")
    path, upstream = stages.input_manifest(tmp_path, "04")
    assert upstream.key == "02" and path == tmp_path / "02_lung_segmentation" / "manifest.csv"
    # notebook 06's manifest is read only when asked for (the declared optional edge)
    (stages.stage_dir(tmp_path, "06") / "manifest.csv").write_text("x\n")
    assert stages.input_manifest(tmp_path, "04")[1].key == "02"
    assert stages.input_manifest(tmp_path, "04", use_optional=("06",))[1].key == "06"
    with pytest.raises(ValueError, match="declares no optional input"):
        stages.input_manifest(tmp_path, "03", use_optional=("06",))


def test_no_stage_folder_name_is_spelt_outside_the_table():
    """Folder names live in cxrlib/stages/table.py only (profiles name notebooks by the same stems)."""
    names = [s.name for s in stages.STAGES] + ["01_data", "02_segmentation", "05_analysis", "06_diffusion"]
    pattern = re.compile("|".join(rf"['\"/]{re.escape(n)}['\"/]" for n in names))
    root = config.PROJECT_ROOT
    offenders = []
    for path in [*root.joinpath("cxrlib").rglob("*.py"), *root.joinpath("notebooks").glob("*.ipynb")]:
        if path == root / "cxrlib" / "stages" / "table.py":
            continue
        text = path.read_text()
        if path.suffix == ".ipynb":
            text = "".join("".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "code")
        offenders += [f"{path.relative_to(root)}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not offenders, offenders


@pytest.mark.parametrize("profile", runtime.profile_names())
def test_profiles_are_override_only(profile):
    """Each value differs from its notebook's default and names a declared parameter."""
    for stage_name, values in runtime.load_profile(profile).items():
        defaults = runtime.notebook_parameters(stage_name)
        assert set(values) <= set(defaults), (profile, stage_name, set(values) - set(defaults))
        same = [k for k, v in values.items() if defaults[k] == v and type(defaults[k]) is type(v)]
        assert not same, f"profile {profile!r}, {stage_name}: {same} repeat the notebook default"


def test_default_profile_is_empty_and_unknown_profiles_fail():
    assert {"quick", "default", "full", "real-cpu"} <= set(runtime.profile_names())
    assert runtime.load_profile("default") == {}
    with pytest.raises(runtime.ProfileError, match="unknown profile 'huge'"):
        runtime.load_profile("huge")


def test_stage_parameters_layers_defaults_profile_and_pins():
    params = runtime.stage_parameters("04", "quick", SEED=7)
    assert params["N_SEEDS"] == 1 and params["SEED"] == 7
    assert params["LEARNING_RATE"] == runtime.notebook_parameters("04")["LEARNING_RATE"]


def test_open_stage_applies_the_profile_seeds_and_records(tmp_path, monkeypatch):
    monkeypatch.delenv(runtime.PINNED_ENV, raising=False)
    torch_threads = torch.get_num_threads()
    try:
        namespace = _namespace(PROFILE="quick", RUN_DIR=str(tmp_path), SEED=3, DEVICE="cpu", NUM_THREADS=1)
        run = stages.open_stage("04", namespace, quiet=True)
        assert namespace["N_SEEDS"] == 1 and namespace["IMAGE_SIZE"] == 32  # quick sizes
        assert run.out_dir == tmp_path / "04_classifiers" and run.out_dir.is_dir()
        assert run.params["IMAGE_SIZE"] == 32 and run.params["RUN_DIR"] == str(tmp_path)
        assert run.profile_overrides["N_SEEDS"] == 1
        assert torch.get_num_threads() == 1
        first = torch.rand(3)
        stages.open_stage("04", dict(namespace), quiet=True)
        assert torch.equal(first, torch.rand(3))  # seeded from SEED
        run.finish({"auc": 0.5}, grid_config={"x": 1})
        params = json.loads((run.out_dir / "params.json").read_text())
        assert json.loads((run.out_dir / "metrics.json").read_text()) == {"auc": 0.5}
        assert params["params"]["N_BOOT"] == 200 and params["grid_config"] == {"x": 1}
        from cxrlib import __version__
        assert params["cxrlib_version"] == __version__ and params["cpu"]["cores"] >= 1
    finally:
        torch.set_num_threads(torch_threads)


def test_pinned_parameters_beat_the_profile(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.PINNED_ENV, json.dumps(["IMAGE_SIZE"]))
    namespace = _namespace(PROFILE="quick", RUN_DIR=str(tmp_path), IMAGE_SIZE=40, NUM_THREADS=1)
    threads = torch.get_num_threads()
    try:
        stages.open_stage("04", namespace, quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert namespace["IMAGE_SIZE"] == 40 and namespace["N_SEEDS"] == 1


def test_open_stage_refuses_a_profile_setting_an_undeclared_parameter(tmp_path):
    namespace = _namespace(PROFILE="quick", RUN_DIR=str(tmp_path))
    del namespace["N_SEEDS"]
    with pytest.raises(runtime.ProfileError, match="N_SEEDS"):
        stages.open_stage("04", namespace, quiet=True)


def test_cpu_threads_never_follow_the_load(monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (50.0, 50.0, 50.0), raising=False)
    threads = torch.get_num_threads()
    try:
        assert config.set_cpu_threads(0) == config.available_cores()
        assert config.set_cpu_threads(1) == 1 == torch.get_num_threads()
        with pytest.raises(ValueError):
            config.set_cpu_threads(-1)
    finally:
        torch.set_num_threads(threads)


def test_parameters_reach_only_the_notebooks_that_declare_them():
    routed = pipeline.route_parameters(NOTEBOOKS, {"SEG_DATA": "x", "N_BOOT": 10})
    assert [stem for stem, params in routed.items() if "SEG_DATA" in params] == ["02_lung_segmentation"]
    assert "N_BOOT" in routed["04_classifiers"] and "N_BOOT" not in routed["01_data_assembly"]
    with pytest.raises(ValueError, match=r"SEG_DATA \(declared by 02_lung_segmentation\)"):
        pipeline.route_parameters([p for p in NOTEBOOKS if p.stem.startswith("03")], {"SEG_DATA": "x"})
    with pytest.raises(ValueError, match="no notebook declares it"):
        pipeline.route_parameters(NOTEBOOKS, {"NO_SUCH_PARAMETER": 1})


@pytest.mark.parametrize("kwargs, message", [
    ({"profile": "nosuch"}, "unknown profile 'nosuch'"),
    ({"dataset": "nosuch"}, "unknown dataset 'nosuch'"),
    ({"dataset": "realdata"}, "give the folder holding its sources"),
    ({"extra_params": {"NO_SUCH": 1}}, "no notebook declares it"),
])
def test_bad_pipeline_arguments_fail_before_anything_runs(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipeline.run_pipeline(run_dir=tmp_path / "run", progress=False, **kwargs)
    assert not (tmp_path / "run").exists()


def test_pipeline_summary_is_written_atomically(tmp_path, monkeypatch):
    """pipeline.json goes through runs.atomic_write (a crash leaves the previous file whole)."""
    from cxrlib import runs

    calls = []
    original = runs.atomic_write
    monkeypatch.setattr(runs, "atomic_write", lambda path, *a, **k: (calls.append(path), original(path, *a, **k)))
    path = tmp_path / "pipeline.json"
    pipeline._write_summary(path, pipeline.PipelineResult(run_dir=tmp_path), {"profile": "quick"})
    assert calls == [path] and json.loads(path.read_text())["profile"] == "quick"
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline.json"]
