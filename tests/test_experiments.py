"""The classifier experiment grid (notebook 04): cells, resume, training sets, controls, seed pooling.

A 40-patient phantom cohort at 64 px, with stand-in synthetic COVID-19 images rendered by
the phantom generator (:mod:`cxrlib.data.oracle`); every model trains for a few steps at 32 px.
"""

from __future__ import annotations

import dataclasses
import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest

from cxrlib.data import cohort
from cxrlib.data import manifest as mf
from cxrlib.data.oracle import oracle_synthetic
from cxrlib.data.phantom import CohortConfig, write_cohort
from cxrlib.stages import classifiers as ex

matplotlib.use("Agg")

TINY = dict(image_size=32, epochs=1, steps_per_epoch=2, batch_size=8, n_boot=50, seeds=(0, 1), ratios=(5,),
            device="cpu", progress=False)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """``(real, with_synthetic)`` manifests of a split 40-patient cohort."""
    base = tmp_path_factory.mktemp("cohort")
    write_cohort(base / "phantom", CohortConfig(n_patients=40, size=64, seed=0), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real, _ = cohort.assemble(mf.read_manifest(base / "phantom" / "manifest.csv"), seed=0)
    with_synthetic = oracle_synthetic(real, base / "synthetic", checkpoint="test", size=64)
    return real, with_synthetic


@pytest.fixture(scope="module")
def grid(manifests, tmp_path_factory):
    """The binary grid: 1 task x 5 conditions x 1 ratio x 2 seeds."""
    run_dir = tmp_path_factory.mktemp("grid")
    config = ex.GridConfig(tasks=("normal_vs_covid",), **TINY)
    return ex.run_grid(manifests[1], config, run_dir), config, run_dir


def test_oracle_rows_follow_the_manifest_rules(manifests):
    real, combined = manifests
    synthetic = combined[combined["origin"] != mf.REAL]
    assert mf.check_leakage(combined).ok
    assert (synthetic["label"] == "covid").all() and (synthetic["split"] == "train").all()
    assert (synthetic["source"] == "synthetic").all()
    parsed = [mf.parse_origin(o) for o in synthetic["origin"]]
    assert {p[0] for p in parsed} == {"G_NC", "G_PC"} and {p[1] for p in parsed} == {"test"}
    sources = real.set_index("image_id").loc[[p[2] for p in parsed]]
    assert (sources["split"] == "train").all()
    assert len(synthetic) == int(((real["split"] == "train") & real["label"].isin(["normal", "pneumonia"])).sum())


def test_grid_has_one_row_per_cell_with_the_promised_columns(grid):
    results, config, run_dir = grid
    assert len(results) == len(config.tasks) * len(config.archs) * len(config.conditions) * len(config.ratios) * 2
    assert not results.duplicated(["task", "arch", "condition", "imbalance", "seed"]).any()
    for column in ("auc", "pr_auc", "sensitivity", "specificity", "ppv", "f1", "balanced_accuracy"):
        assert {column, f"{column}_low", f"{column}_high"} <= set(results.columns)
        finite = results[column].notna()
        assert (results.loc[finite, f"{column}_low"] <= results.loc[finite, column] + 1e-9).all()
    for column in ("n_train_normal", "n_train_covid_real", "n_synthetic", "n_val_covid", "n_val_other",
                   "n_test_covid", "n_test_other", "threshold", "best_epoch", "train_seconds", "ece"):
        assert column in results.columns
    assert (results["status"] == "trained").all()
    for row in results.to_dict("records"):
        folder = run_dir / row["cell_dir"]
        assert (folder / "best.pt").is_file() and (folder / "cell.json").is_file()
    assert results.loc[results["condition"] == "real", "n_synthetic"].eq(0).all()
    assert results.loc[results["condition"] == "real_gnc_gpc", "n_synthetic"].gt(0).all()
    assert results["cell_dir"].str.match(r"normal_vs_covid/small_cnn/\w+/(1-5|all)/seed\d$").all()


def test_a_rerun_loads_every_cell_and_a_killed_grid_resumes(grid, manifests, monkeypatch):
    results, config, run_dir = grid
    calls = []
    real_train = ex.grid.train_classifier

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(ex.grid, "train_classifier", counting)  # where the grid runner calls it
    again = ex.run_grid(manifests[1], config, run_dir)
    assert not calls and (again["status"] == "loaded").all()
    metrics = ["auc", "sensitivity", "specificity", "threshold"]
    pd.testing.assert_frame_equal(again[metrics], results[metrics])
    # a grid killed after training one cell but before scoring it: only that cell trains again
    (run_dir / results.iloc[3]["cell_dir"] / "cell.json").unlink()
    resumed = ex.run_grid(manifests[1], config, run_dir)
    assert len(calls) == 1 and (resumed["status"] == "trained").sum() == 1
    # other evaluation settings rescore the stored predictions without training
    rescored = ex.run_grid(manifests[1], dataclasses.replace(config, n_boot=30), run_dir)
    assert len(calls) == 1 and (rescored["status"] == "loaded").all()
    assert np.allclose(rescored["auc"], resumed["auc"])


def test_synthetic_images_are_only_ever_in_training(grid, manifests):
    results, _, run_dir = grid
    combined = manifests[1]
    synthetic_ids = set(combined.loc[combined["origin"] != mf.REAL, "image_id"])
    predictions = ex.read_predictions(results, run_dir)
    assert not set(predictions["image_id"]) & synthetic_ids
    for task in ex.TASKS:
        for split in ("val", "test"):
            assert not set(ex.evaluation_rows(combined, task, split)["image_id"]) & synthetic_ids
    train, info = ex.training_rows(combined, "normal_vs_covid", "real_gnc_gpc", 5, 0)
    synthetic = train[train["origin"] != mf.REAL]
    assert len(synthetic) == info["n_synthetic"] > 0 and (synthetic["split"] == "train").all()
    train_ids = set(combined.loc[(combined["split"] == "train") & (combined["origin"] == mf.REAL), "image_id"])
    assert {mf.parse_origin(o)[2] for o in synthetic["origin"]} <= train_ids
    # a synthetic image made from a test image is refused, even if someone put it in the train split
    test_id = combined.loc[combined["split"] == "test", "image_id"].iloc[0]
    bad = combined.copy()
    bad.loc[bad.index[-1], "origin"] = mf.make_origin("G_NC", "test", test_id)
    with pytest.raises(mf.LeakageError):
        ex.run_grid(bad, ex.GridConfig(tasks=("normal_vs_covid",), conditions=("real_gnc",), **TINY),
                    run_dir / "never")
    with pytest.raises(ValueError, match="no real source image in the train split"):
        ex.synthetic_rows(bad, ["G_NC"])


def test_subsampling_keeps_whole_patients_and_the_requested_ratio(manifests):
    real = manifests[0]
    train = real[real["split"] == "train"]
    covid = train[train["label"] == "covid"]
    per_patient = covid.groupby("patient_id").size()
    n_normal = int((train["label"] == "normal").sum())
    for seed in (0, 1, 2):
        previous = None
        order = ex.covid_patient_order(train, seed)
        for ratio in (1, 2, 5, 20):
            rows, info = ex.subsample_covid(train, "normal_vs_covid", ratio, seed)
            chosen = rows[rows["label"] == "covid"]
            patients = set(chosen["patient_id"])
            # whole patients: every image of a chosen patient, nothing else
            assert len(chosen) == int(per_patient[list(patients)].sum())
            assert (rows["label"] == "normal").sum() == n_normal == info["n_majority"]
            target = max(1, round(n_normal / ratio))
            assert info["covid_target"] == target
            # the closest prefix of the seeded patient order
            prefix_counts = np.cumsum([per_patient[p] for p in order])
            best = np.abs(prefix_counts - target).min()
            assert abs(len(chosen) - target) == best
            assert patients == set(order[: len(patients)])
            assert info["ratio_achieved"] == pytest.approx(n_normal / len(chosen))
            if previous is not None:
                assert patients <= previous  # 1:20 is part of 1:5 for the same seed
            previous = patients
    assert ex.covid_patient_order(train, 0) == ex.covid_patient_order(train, 0)
    assert ex.covid_patient_order(train, 0) != ex.covid_patient_order(train, 1)
    everything, _ = ex.subsample_covid(train, "normal_vs_covid", None, 0)
    assert (everything["label"] == "covid").sum() == len(covid)


def test_val_and_test_are_not_subsampled_and_are_reported(grid, manifests):
    results = grid[0]
    real = manifests[0]
    for split in ("val", "test"):
        rows = real[(real["split"] == split) & real["label"].isin(["normal", "covid"])]
        assert (results[f"n_{split}_covid"] == (rows["label"] == "covid").sum()).all()
        assert (results[f"n_{split}_other"] == (rows["label"] == "normal").sum()).all()


def test_synthetic_only_has_no_real_covid_in_training(grid, manifests):
    train, info = ex.training_rows(manifests[1], "pneumonia_vs_covid", "synthetic_only", 5, 0)
    covid = train[train["label"] == "covid"]
    assert len(covid) > 0 and (covid["origin"] != mf.REAL).all()
    assert info["n_train_covid_real"] == 0 and info["n_synthetic"] == len(covid)
    rows = grid[0][grid[0]["condition"] == "synthetic_only"]
    assert (rows["n_train_covid_real"] == 0).all() and rows["cell_dir"].str.contains("/all/").all()


def test_the_three_class_task_runs(manifests, tmp_path):
    config = ex.GridConfig(tasks=("three_class",), conditions=("real_gnc",), **{**TINY, "seeds": (0,)})
    results = ex.run_grid(manifests[1], config, tmp_path)
    row = results.iloc[0]
    assert len(results) == 1 and row["n_train_pneumonia"] > 0 and row["n_train_normal"] > 0
    assert np.isfinite(row["threshold"]) and 0 <= row["mc_balanced_accuracy"] <= 1
    assert np.asarray(row["confusion_matrix"]).shape == (3, 3)
    predictions = ex.read_predictions(results, tmp_path)
    assert {"prob_normal", "prob_pneumonia", "prob_covid", "score", "called"} <= set(predictions.columns)
    assert np.allclose(predictions[["prob_normal", "prob_pneumonia", "prob_covid"]].sum(axis=1), 1)


def test_conditions_and_tasks_that_cannot_run_are_named(manifests, tmp_path):
    real = manifests[0]
    reasons = ex.available_conditions(real)
    assert set(reasons) == {"real_gnc", "real_gnc_gpc", "synthetic_only"}
    assert "notebook 03" in reasons["real_gnc"]
    assert "notebook 06" in ex.available_conditions(real, ["real_diffusion"])["real_diffusion"]
    assert ex.available_conditions(manifests[1]) == {}
    assert "lung" in ex.available_conditions(real, ["real"], input_mode="lung_masked")["real"]
    with pytest.raises(ValueError, match="real_gnc"):
        ex.run_grid(real, ex.GridConfig(tasks=("normal_vs_covid",), conditions=("real_gnc",), **TINY), tmp_path)
    no_val_covid = real[~((real["split"] == "val") & (real["label"] == "covid"))]
    assert "no covid image in val" in ex.task_problems(no_val_covid, ["normal_vs_covid"])["normal_vs_covid"]


def test_seed_means_and_the_paired_difference():
    rng = np.random.default_rng(0)
    n_patients = 40
    patients = np.repeat([f"p{i}" for i in range(n_patients)], 2)
    labels = np.where(np.arange(2 * n_patients) < n_patients, "covid", "normal")
    rows = []
    for condition, shift in (("real", 0.0), ("real_gnc_gpc", 1.0)):
        for seed in range(5):
            score = rng.normal(size=len(labels)) + (labels == "covid") * (0.5 + shift)
            rows.append(pd.DataFrame({"task": "normal_vs_covid", "arch": "small_cnn", "condition": condition,
                                      "imbalance": "1:20", "seed": seed, "image_id": [f"i{k}" for k in range(len(labels))],
                                      "patient_id": patients, "label": labels, "score": score, "called": score >= 0.5}))
    predictions = pd.concat(rows, ignore_index=True)
    summary = ex.summarize_over_seeds(predictions, ("sensitivity", "auc"), n_boot=200)
    for row in summary.to_dict("records"):
        chosen = predictions[predictions["condition"] == row["condition"]]
        per_seed = [np.mean(g.loc[g["label"] == "covid", "called"]) if row["metric"] == "sensitivity" else
                    ex.summaries.rank_auc((g["label"] == "covid").to_numpy(), g["score"].to_numpy())
                    for _, g in chosen.groupby("seed")]
        assert row["estimate"] == pytest.approx(np.mean(per_seed))
        assert row["low"] <= row["estimate"] <= row["high"] and row["n_seeds"] == 5
    comparison = ex.compare_conditions(predictions, "real", "real_gnc_gpc", ("sensitivity", "auc"), n_boot=200)
    assert len(comparison) == 2
    for row in comparison.to_dict("records"):
        assert row["difference"] == pytest.approx(row["treatment_estimate"] - row["baseline_estimate"])
        assert row["difference_low"] <= row["difference"] <= row["difference_high"]
        assert row["difference_low"] > 0  # a shift of one standard deviation is found
        # the paired interval is narrower than the two intervals side by side would suggest
        assert row["difference_high"] - row["difference_low"] < (row["treatment_high"] - row["treatment_low"]
                                                                 + row["baseline_high"] - row["baseline_low"])


def test_site_and_lung_controls(manifests, tmp_path):
    real = manifests[0]
    config = ex.GridConfig(tasks=("normal_vs_covid",), mask_column="ground_truth", **{**TINY, "seeds": (0,)})
    column, reason = ex.site_target(real, ("site", "sex"))
    assert column == "sex" and reason == ""  # the tiny cohort lacks some sites in val / test
    assert ex.site_target(real, ("site",))[0] is None
    site = ex.site_control(real, config, tmp_path, target="sex")
    row = site.iloc[0]
    assert len(site) == 1 and row["classes"] == "F, M" and row["chance_balanced_accuracy"] == 0.5
    assert 0 <= row["balanced_accuracy_low"] <= row["balanced_accuracy"] <= row["balanced_accuracy_high"] <= 1
    assert (tmp_path / "controls" / "site" / "small_cnn" / "seed0" / "cell.json").is_file()
    assert ex.lung_masks_available(real, "lungs_removed", "ground_truth") == (True, "")
    assert not ex.lung_masks_available(real, "lungs_removed")[0]
    lungs = ex.lung_control(real, config, tmp_path, modes=("lung_masked", "lungs_removed"))
    assert list(lungs["input_mode"]) == ["lung_masked", "lungs_removed"]
    assert (lungs["n_train_covid_real"] == ((real["split"] == "train") & (real["label"] == "covid")).sum()).all()
    assert (lungs["n_left_out_lung_qc"] == 0).all()
    # images whose lung mask failed quality control are left out of every lung mode, and counted
    failed = real[(real["split"] == "train") & (real["label"] == "covid")]["image_id"].iloc[:2].tolist()
    checked = real.assign(lung_qc_pass=np.where(real["image_id"].isin(failed), "False", "True"))
    kept = ex.lung_control(checked, config, tmp_path / "qc", modes=("lung_masked",))
    assert kept["n_left_out_lung_qc"].tolist() == [2]
    assert kept["n_train_covid_real"].tolist() == [lungs["n_train_covid_real"].iloc[0] - 2]
    with pytest.raises(ValueError, match=r"after leaving out \d+ image\(s\) whose lung mask failed"):
        ex.lung_control(real.assign(lung_qc_pass="False"), config, tmp_path / "none", modes=("lung_masked",))
    # the notebook asks the same question before it trains anything
    assert ex.lung_control_problem(real, "normal_vs_covid", ("lung_masked",), "ground_truth") == ""
    assert ex.lung_control_problem(checked, "normal_vs_covid", ("lung_masked",), "ground_truth") == ""
    everything_failed = ex.lung_control_problem(real.assign(lung_qc_pass="False"), "normal_vs_covid",
                                                ("lung_masked",), "ground_truth")
    assert everything_failed.endswith(f"after leaving out {len(real)} image(s) whose lung mask failed quality control")
    assert "predicted lung masks" in ex.lung_control_problem(real, "normal_vs_covid", ("lungs_removed",))
    assert ex.lung_control_problem(real, "no_such_task").startswith("unknown task 'no_such_task'")


def test_grid_config_from_params_is_the_notebook_mapping():
    from cxrlib.stages.runtime import stage_parameters

    params = stage_parameters("04", "quick", SEED=5, DEVICE="cpu")
    config = ex.grid_config_from_params(params, conditions=["real"])
    assert config.seeds == (5,) and config.conditions == ("real",) and config.tasks == ("normal_vs_covid",)
    assert config.image_size == 32 and config.lr == params["LEARNING_RATE"] and config.boot_seed == 5
    assert config.steps_per_epoch == 4 and config.n_boot == 200 and config.device == "cpu"
    whole = ex.grid_config_from_params({**params, "STEPS_PER_EPOCH": 0, "N_SEEDS": 3})
    assert whole.steps_per_epoch is None and whole.seeds == (5, 6, 7)


def test_figures_and_explorer_build(grid):
    from cxrlib.viz import classifiers as cviz

    results, _, run_dir = grid
    predictions = ex.read_predictions(results, run_dir)
    summary = ex.summarize_over_seeds(predictions, n_boot=20)
    figures = [cviz.sensitivity_figure(summary), cviz.roc_pr_figure(predictions, "normal_vs_covid", "small_cnn", "1:5"),
               cviz.confusion_figure(predictions, "normal_vs_covid", "small_cnn", "1:5"),
               cviz.reliability_figure(predictions, "normal_vs_covid", "small_cnn", "1:5"),
               cviz.control_figure(results.head(2), "condition")]
    assert all(len(fig.axes) >= 1 for fig in figures)
    assert cviz.grid_explorer(results, predictions) is not None
    table = ex.ci_text(results, ["auc"], ["condition", "auc"])
    assert list(table.columns) == ["condition", "auc"] and table["auc"].str.match(r"\d\.\d\d \[").all()


def test_training_set_table_matches_the_grid(grid, manifests):
    results, config, _ = grid
    table = ex.training_set_table(manifests[1], config)
    assert len(table) == len(config.conditions)
    first_seed = results[results["seed"] == config.seeds[0]].set_index("condition")
    for row in table.to_dict("records"):
        for column in ("n_train_normal", "n_train_covid_real", "n_synthetic"):
            assert row[column] == first_seed.loc[row["condition"], column]
    assert set(ex.training_set_table(manifests[0], config)["condition"]) == {"real", "real_oversample"}


def test_shared_images_give_the_same_pixels_as_a_fresh_dataset(manifests):
    from cxrlib.data.classification import ClassificationDataset

    combined = manifests[1]
    rows = combined[combined["label"].isin(["normal", "covid"])].iloc[::7]
    shared = ex.SharedImages(combined, image_size=32, input_mode="whole")
    view = shared.subset(rows, ["normal", "covid"])
    fresh = ClassificationDataset(rows, image_size=32, label_map={"normal": 0, "covid": 1})
    assert len(view) == len(fresh) and list(view.labels) == list(fresh.labels)
    for index in (0, len(rows) - 1):
        assert np.array_equal(view[index][0].numpy(), fresh[index][0].numpy()) and view[index][1] == fresh[index][1]
    augmented = shared.subset(rows, ["normal", "covid"], augment="heavy", seed=3)
    augmented.set_epoch(2)
    assert not np.array_equal(augmented[0][0].numpy(), view[0][0].numpy())
    assert view.source.augment is None  # the views do not change each other


def _predictions_with_seed_spread():
    """20 test images of 20 patients; 'real' finds every COVID-19 image with seed 0 only, 'real_gnc_gpc' never."""
    rows = []
    for condition, found_by in (("real", {0}), ("real_gnc_gpc", set())):
        for seed in (0, 1, 2):
            for i in range(20):
                positive = i < 10
                called = positive and seed in found_by
                rows.append({"task": "normal_vs_covid", "arch": "small_cnn", "condition": condition,
                             "imbalance": "1:20", "seed": seed, "image_id": f"i{i}", "patient_id": f"p{i}",
                             "label": "covid" if positive else "normal", "score": 0.9 if called else 0.1 + i / 100,
                             "called": called})
    return pd.DataFrame(rows)


def test_comparisons_cover_the_spread_between_training_seeds():
    """Seed-means 1/3 vs 0 on identical patients: a patient-only interval has zero width; two levels reach 0."""
    table = ex.compare_conditions(_predictions_with_seed_spread(), "real", "real_gnc_gpc", ("sensitivity",),
                                  n_boot=2000, seed=0)
    row = table.iloc[0]
    assert row["difference"] == pytest.approx(-1 / 3)
    assert row["difference_high"] >= 0.0 and row["difference_low"] <= -2 / 3
    assert row["baseline_per_seed"] == [1.0, 0.0, 0.0] and "seeds" in row["interval"]
    from cxrlib.evaluate.claims import NO_DIFFERENCE, difference_claim

    claim = difference_claim("x", row["difference"], row["difference_low"], row["difference_high"])
    assert claim.verdict == NO_DIFFERENCE
