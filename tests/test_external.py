"""Scoring prediction tables on external cohorts, on predictions whose answer is known; and
predicting a trained cell on an external manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlib.evaluate import external as ex


def _set(name: str, *, n_patients: int, separable: bool, seeds=(0, 1, 2), only_positive=False,
         views=("PA",), rng=None) -> pd.DataFrame:
    rng = rng or np.random.default_rng(0)
    rows = []
    for p in range(n_patients):
        label = "covid" if only_positive or p % 2 else "normal"
        view = views[(p // 2) % len(views)]
        for k in range(2):
            image_id = f"{name}-p{p}-{k}"
            # PA images separate perfectly when `separable`; AP images never do
            good = separable and view == "PA"
            for seed in seeds:
                score = (0.8 if label == "covid" else 0.2) + rng.normal(0, 0.05) if good else rng.random()
                rows.append({"task": "normal_vs_covid", "arch": "cnn", "condition": "real", "imbalance": "1:20",
                             "seed": seed, "evaluation_set": name, "image_id": image_id,
                             "patient_id": f"{name}-p{p}", "label": label, "score": score,
                             "called": score >= 0.5, "view": view})
    return pd.DataFrame(rows)


def test_score_models_per_set_and_view():
    rng = np.random.default_rng(1)
    predictions = pd.concat([_set("internal", n_patients=40, separable=True, rng=rng),
                             _set("ext", n_patients=40, separable=True, views=("PA", "AP"), rng=rng)])
    scored = ex.score_models(predictions, n_boot=200)
    internal = scored[(scored["evaluation_set"] == "internal") & (scored["view"] == "all")]
    assert len(internal) == 3 and (internal["auc"] == 1.0).all() and (internal["specificity"] == 1.0).all()
    ext = scored[(scored["evaluation_set"] == "ext") & (scored["seed"] == 0)].set_index("view")
    assert list(ext.index) == ["all", "AP", "PA"]
    assert ext.loc["PA", "auc"] == 1.0 and ext.loc["AP", "auc_high"] < 0.95
    assert ext.loc["AP", "auc_low"] <= ext.loc["AP", "auc"] <= ext.loc["AP", "auc_high"]
    assert ext.loc["all", "n"] == 80 and ext.loc["all", "n_patients"] == 40


def test_positives_only_cohort_gives_sensitivity_alone():
    predictions = _set("cxnet", n_patients=30, separable=True, only_positive=True)
    scored = ex.score_models(predictions, n_boot=100)
    assert scored["auc"].isna().all() and scored["specificity"].isna().all()
    assert (scored["sensitivity"] == 1.0).all()
    summary = ex.summarize_sets(predictions, n_boot=100)
    sens = summary[(summary["metric"] == "sensitivity") & (summary["view"] == "all")].iloc[0]
    assert sens["estimate"] == 1.0 and sens["n_seeds"] == 3


def test_summarize_sets_seed_mean_and_interval():
    rng = np.random.default_rng(2)
    predictions = _set("internal", n_patients=40, separable=True, rng=rng)
    # seed 2's model is worse: random scores
    worse = predictions["seed"] == 2
    predictions.loc[worse, "score"] = rng.random(int(worse.sum()))
    predictions["called"] = predictions["score"] >= 0.5
    summary = ex.summarize_sets(predictions, by_view=False, n_boot=300)
    auc = summary[summary["metric"] == "auc"].iloc[0]
    assert auc["seed_max"] == 1.0 and auc["seed_min"] < 0.8
    assert auc["estimate"] == pytest.approx((2 + auc["seed_min"]) / 3)
    assert auc["low"] < auc["estimate"] < auc["high"] and auc["high"] - auc["low"] > 0.05


def test_internal_minus_external_shows_a_drop_and_no_drop():
    rng = np.random.default_rng(3)
    internal = _set("internal", n_patients=40, separable=True, rng=rng)
    dropped = _set("random", n_patients=40, separable=False, rng=rng)
    kept = _set("same", n_patients=40, separable=True, rng=rng)
    table = ex.internal_minus_external(pd.concat([internal, dropped, kept]), n_boot=300)
    auc = table[table["metric"] == "auc"].set_index("external")
    assert auc.loc["random", "shown"] and auc.loc["random", "low"] > 0.2
    assert auc.loc["random", "difference"] == pytest.approx(1.0 - auc.loc["random", "external_estimate"])
    assert not auc.loc["same", "shown"] and auc.loc["same", "difference"] == 0.0
    assert set(table["n_seeds"]) == {3}


def test_bad_prediction_table_is_refused():
    with pytest.raises(ValueError, match="lacks column"):
        ex.score_models(pd.DataFrame({"image_id": ["a"]}))
    with pytest.raises(ValueError, match="unknown metric"):
        ex.summarize_sets(_set("internal", n_patients=4, separable=True), metrics=("accuracy",))


def test_with_columns_adds_the_view():
    predictions = pd.DataFrame({"image_id": ["a", "b", "c"], "score": [0.1, 0.2, 0.3]})
    manifest = pd.DataFrame({"image_id": ["a", "b"], "view": ["PA", "AP"]})
    out = ex.with_columns(predictions, [manifest])
    assert out["view"].tolist() == ["PA", "AP", ""]


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    """One trained cell (Normal vs COVID-19, real only, one seed) on a 30-patient phantom."""
    import warnings

    from cxrlib.data import cohort
    from cxrlib.data import manifest as mf
    from cxrlib.data.phantom import CohortConfig, write_cohort
    from cxrlib.stages import classifiers

    base = tmp_path_factory.mktemp("cohort")
    write_cohort(base / "phantom", CohortConfig(n_patients=30, size=48, seed=0), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest, _ = cohort.assemble(mf.read_manifest(base / "phantom" / "manifest.csv"), seed=0)
    config = classifiers.GridConfig(tasks=("normal_vs_covid",), conditions=("real",), seeds=(0,), ratios=(2,),
                                    image_size=32, epochs=1, steps_per_epoch=2, batch_size=8, n_boot=20,
                                    device="cpu", progress=False)
    results = classifiers.run_grid(manifest, config, base / "grid")
    return manifest, results


def test_predict_cells_reproduces_the_internal_predictions(tiny_grid):
    from cxrlib.stages import external as stage

    manifest, results = tiny_grid
    test = manifest[manifest["split"] == "test"]
    # the test images again, as if another collection held them (with a pneumonia row to leave out)
    outside = test.assign(image_id="ext-" + test["image_id"], patient_id="ext-" + test["patient_id"])
    table = stage.predict_cells(results, {"copy": outside}, development=manifest)
    assert set(table["evaluation_set"]) == {"internal", "copy"}
    internal = table[table["evaluation_set"] == "internal"].set_index("image_id")
    copy = table[table["evaluation_set"] == "copy"].set_index("image_id")
    assert len(copy) == len(internal) == int(test["label"].isin(["normal", "covid"]).sum())
    again = internal.loc[copy.index.str.removeprefix("ext-")]
    assert np.allclose(copy["score"].to_numpy(), again["score"].to_numpy(), atol=1e-5)
    assert (copy["threshold"] == results["threshold"].iloc[0]).all()
    assert (copy["view"] != "").all() and (internal["view"] != "").all()
    assert {"task", "arch", "condition", "imbalance", "seed"} <= set(table.columns)
    # cached: a second call reads the stored predictions
    cell_dir = results.attrs["run_dir"] + "/" + results["cell_dir"].iloc[0]
    assert (Path(cell_dir) / "external" / "copy.csv").is_file()
    scored = ex.score_models(table, n_boot=20)
    assert set(scored["evaluation_set"]) == {"internal", "copy"}


def test_predict_cell_refuses_a_folder_that_is_no_cell(tmp_path):
    from cxrlib.stages import external as stage

    with pytest.raises(FileNotFoundError, match="cell.json"):
        stage.predict_cell(tmp_path, pd.DataFrame({"image_id": [], "label": []}), "x")
