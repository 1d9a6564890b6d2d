"""External cohorts wired into the stages: notebook 01's early refusal of bad cohorts, notebook
04's evaluation on a held-out phantom site (results rows, metrics, figure), notebook 02's and 05's
scores on external cohorts with masks, and the results page's held-out-site table."""

from __future__ import annotations

import json
import warnings

import matplotlib
import pandas as pd
import pytest

from cxrlib import runs, stages
from cxrlib.data.external import ExternalCohortError, external_specs, load_externals

matplotlib.use("Agg")


def test_external_specs_accepts_one_name_or_a_list():
    assert external_specs("") == [] and external_specs(None) == [] and external_specs([]) == []
    assert external_specs("cxnet_covid") == ["cxnet_covid"]
    assert external_specs(["a", "b", "a"]) == ["a", "b"]
    with pytest.raises(ExternalCohortError, match="empty cohort name"):
        external_specs(["a", " "])


def _recipe(tmp_path, klass="covid"):
    path = tmp_path / f"mine_{klass}.yaml"
    (tmp_path / "nowhere").mkdir(exist_ok=True)  # an empty folder: no image
    path.write_text(f"name: mine\ndescription: test\nsources:\n  s: {{adapter: covid-cxnet, root: nowhere}}\n"
                    f"classes:\n  {klass}:\n    - source: s\n")
    return path


def test_bad_external_cohorts_stop_the_pipeline_before_any_notebook(tmp_path):
    from cxrlib.pipeline import run_pipeline

    run_dir = tmp_path / "run"
    cases = [({"EXTERNAL": "cxnet_covid", "DATA_ROOT": str(tmp_path / "missing")}, "does not exist"),
             ({"EXTERNAL": [str(_recipe(tmp_path, "lung_opacity"))], "DATA_ROOT": str(tmp_path)}, "unknown class"),
             ({"EXTERNAL": [str(_recipe(tmp_path))], "DATA_ROOT": str(tmp_path)}, "mine"),
             ({"EXTERNAL": "no_such_recipe", "DATA_ROOT": str(tmp_path)}, "unknown recipe")]
    for params, message in cases:
        with pytest.raises(ExternalCohortError, match=message) as caught:
            run_pipeline(dataset="phantom", profile="quick", run_dir=run_dir, notebooks=["01"], extra_params=params,
                         progress=False)
        text = str(caught.value)
        assert "\n" not in text and text.startswith("external cohort ")
    assert not (run_dir / "notebooks").exists(), "nothing may run before the cohorts are checked"
    with pytest.raises(ExternalCohortError, match="no data folder"):
        load_externals(["cxnet_covid"], "")


def test_a_recipe_needs_its_data_folder_only_where_notebook_01_runs(tmp_path, monkeypatch):
    import cxrlib.pipeline as pipeline

    with pytest.raises(ValueError, match="--param DATA_ROOT=PATH"):
        pipeline.check_dataset("realdata", {})
    pipeline.check_dataset("realdata", {}, needs_data_root=False)  # a later notebook rerun alone
    with pytest.raises(ValueError, match="unknown dataset"):
        pipeline.check_dataset("no_such_recipe", {}, needs_data_root=False)
    checked = []
    monkeypatch.setattr(pipeline, "check_external", lambda *args: checked.append(args))
    with pytest.raises(ValueError, match="no selected notebook declares --param EXTERNAL"):
        # notebook 04 alone: neither DATA_ROOT nor the external cohorts are asked for
        pipeline.run_pipeline(dataset="realdata", profile="quick", run_dir=tmp_path / "run", notebooks=["04"],
                              extra_params={"EXTERNAL": "cxnet_covid"}, progress=False)
    assert checked == [] and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A 30-patient phantom with a site held out (site-label correlation 1), one trained cell."""
    from cxrlib.data import cohort
    from cxrlib.data.external import assemble_external, read_external
    from cxrlib.stages import classifiers

    base = tmp_path_factory.mktemp("held_out")
    run_dir = base / "run"
    raw, external = cohort.load_or_make_held_out_phantom(40, 48, 0, site_label_correlation=1.0, base=base / "data",
                                                         progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest, _ = cohort.assemble(raw, seed=0)
    stage_01 = stages.stage_dir(run_dir, "01")
    assemble_external(external, manifest, name="heldout", out_dir=stage_01, near=None)
    cohorts = read_external(stage_01, allowed_roots=[base / "data"])
    config = classifiers.GridConfig(tasks=("normal_vs_covid",), conditions=("real",), seeds=(0, 1), ratios=(2,),
                                    image_size=32, epochs=1, steps_per_epoch=2, batch_size=8, n_boot=20,
                                    device="cpu", progress=False)
    results = classifiers.run_grid(manifest, config, stages.stage_dir(run_dir, "04"))
    return run_dir, manifest, cohorts, results


def test_evaluate_external_scores_every_cell_on_every_set(held_out):
    from cxrlib.evaluate.shortcut import ABOVE, NOT_SHOWN
    from cxrlib.stages.external import evaluate_external, internal_rows

    run_dir, manifest, cohorts, results = held_out
    assert list(cohorts) == ["heldout"]
    evaluation = evaluate_external(results, cohorts, manifest, n_boot=50)
    table = evaluation.table.set_index("evaluation_set")
    assert list(table.index) == ["internal", "heldout"]
    assert table["n"].gt(0).all() and {"auc", "sensitivity", "specificity", "floor_auc"} <= set(table.columns)
    assert set(table["versus_floor"]) <= {ABOVE, NOT_SHOWN}
    # the floor learnt the sites (each class from its own site): near perfect on the internal test split
    floor = evaluation.floor.set_index("evaluation_set")
    assert list(floor.index) == ["internal", "heldout"] and floor.loc["internal", "auc"] > 0.9
    drop = evaluation.drops[evaluation.drops["metric"] == "auc"].iloc[0]
    assert drop["external"] == "heldout" and drop["difference"] == pytest.approx(
        drop["internal"] - drop["external_estimate"])
    assert set(evaluation.summary["view"]) >= {"all", "PA"}  # per view where known
    assert evaluation.sources["development"]["column"] == "site" and "auc" in evaluation.sources["heldout"]
    # results.csv: one row per cell and set; the grid readers keep the internal rows
    rows = evaluation.results_rows(results)
    assert rows["evaluation_set"].tolist() == ["internal"] * len(results) + ["heldout"] * len(results)
    assert rows["cell_dir"].notna().all()
    pd.testing.assert_frame_equal(internal_rows(rows)[list(results.columns)], results.reset_index(drop=True),
                                  check_dtype=False)
    assert internal_rows(results) is results
    metrics = runs.to_plain(evaluation.metrics())
    json.dumps(metrics)
    assert metrics["cohorts"] == ["heldout"] and len(metrics["table"]) == 2


def test_read_grid_results_keeps_the_internal_rows(held_out, tmp_path):
    from cxrlib.stages import umap_gradcam
    from cxrlib.stages.external import evaluate_external

    run_dir, manifest, cohorts, results = held_out
    rows = evaluate_external(results, cohorts, manifest, n_boot=20).results_rows(results)
    rows.to_csv(stages.output_path(run_dir, "04", "results.csv"), index=False)
    read = umap_gradcam.read_grid_results(run_dir)
    assert len(read) == len(results) and (read["evaluation_set"] == "internal").all()


def test_external_figure_draws_each_set_and_the_floor(held_out):
    from cxrlib.stages.external import evaluate_external
    from cxrlib.viz.classifiers import external_figure

    run_dir, manifest, cohorts, results = held_out
    table = evaluate_external(results, cohorts, manifest, n_boot=20).table
    fig = external_figure(table)
    axes = fig.get_axes()
    assert len(axes) == 2  # AUC and sensitivity, one task
    labels = axes[0].get_legend_handles_labels()[1]
    assert {"internal", "heldout", "floor (internal)", "floor (heldout)"} <= set(labels)
    positives_only = table.assign(auc=float("nan"))  # a COVID-19-only cohort: no AUC, the panel stays
    assert len(external_figure(positives_only).get_axes()) == 2


def test_segmentation_and_saliency_on_external_cohorts_with_masks(held_out):
    from cxrlib.models.unet import UNet, UNetConfig
    from cxrlib.stages import lung_segmentation, umap_gradcam
    from cxrlib.train.classifier import load_classifier

    run_dir, manifest, cohorts, results = held_out
    model = UNet(UNetConfig(base_channels=4, depth=2)).eval()
    no_masks = cohorts["heldout"].drop(columns=["mask_lung_left", "mask_lung_right"])
    scored, skipped = lung_segmentation.evaluate_cohorts(model, {**cohorts, "plain": no_masks}, input_size=32,
                                                         n_boot=20)
    assert list(scored) == ["heldout"] and skipped == {"plain": "no lung masks"}
    assert scored["heldout"].n_images == len(cohorts["heldout"]) and "dice_mean" in scored["heldout"].metrics()
    choice = umap_gradcam.choose_classifier(results, run_dir, condition="real")
    summaries, skipped = umap_gradcam.external_saliency(
        choice, {**cohorts, "plain": no_masks}, ["gradcam"], load=lambda d: load_classifier(d, device="cpu"),
        positive_label="covid", size=48, max_images=3, n_random=2, n_boot=20)
    assert list(summaries) == ["heldout"] and "no lung masks" in skipped["plain"]
    table = summaries["heldout"].set_index("method")
    assert 0 <= table.loc["gradcam", "lung_overlap"] <= 1 and table.loc["gradcam", "n_images"] <= 3


def test_results_page_has_the_held_out_table_from_the_metrics(held_out, tmp_path):
    from cxrlib import results as results_page
    from cxrlib.stages.external import evaluate_external

    run_dir, manifest, cohorts, results = held_out
    metrics = runs.to_plain(evaluate_external(results, cohorts, manifest, n_boot=20).metrics())
    page_run = tmp_path / "run"
    runs.write_json(stages.stage_dir(page_run, "04") / "metrics.json",
                    {"comparisons": {}, "seed_mean_summary": [], "external": metrics})
    summary = results_page.summarize_run(page_run)
    stage = summary["stages"][0]
    assert [row["evaluation_set"] for row in stage["external"]] == ["internal", "heldout"]
    heldout = stage["external"][1]
    assert heldout["auc"]["estimate"] == pytest.approx(metrics["table"][1]["auc"])
    assert heldout["difference"]["verdict"] in ("drops externally", "higher externally", "no difference shown")
    assert any("internal minus heldout" in claim["subject"] for claim in stage["claims"])
    text = results_page.render_markdown(summary)
    assert "Internal test split vs external cohorts vs the shortcut floor" in text
    assert f"{metrics['table'][1]['floor_auc']:.3f}" in text
    # a run without external cohorts renders as before
    runs.write_json(stages.stage_dir(page_run, "04") / "metrics.json", {"comparisons": {}, "seed_mean_summary": []})
    assert "external" not in results_page.summarize_run(page_run)["stages"][0]
