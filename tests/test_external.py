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


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """A 12-patient development cohort of distinct textured images and an external cohort holding
    new images, an exact and a re-published (cropped, re-windowed, re-encoded) copy of development
    images, a corrupt file and a blank image. (Phantom images are too alike for the copy detector:
    it calls different phantom patients copies, so phantom external cohorts use exact copies only.)"""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    from cxrlib.data.copies import republish

    base = tmp_path_factory.mktemp("external")
    rng = np.random.default_rng(0)

    def texture(path):
        field = gaussian_filter(rng.normal(size=(160, 128)), 3) + 0.5 * gaussian_filter(rng.normal(size=(160, 128)), 1)
        image = np.clip(128 + 60 * field / field.std(), 0, 255).astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        return str(path), image

    rows = []
    for p in range(12):
        for k in range(1 + p % 2):
            path, _ = texture(base / "dev" / f"d{p}_{k}.png")
            rows.append({"image_id": f"d{p}_{k}", "path": path, "label": ("normal", "covid")[p % 2],
                         "patient_id": f"dp{p}", "split": ("train", "val", "test")[p % 3], "origin": "real",
                         "source": "dev"})
    development = pd.DataFrame(rows)
    source, other = development.iloc[0], development.iloc[-1]
    rows = []
    for p in range(5):
        path, _ = texture(base / "ext" / f"e{p}.png")
        rows.append({"image_id": f"new-{p}", "path": path, "label": "covid", "patient_id": f"new-p{p}"})
    folder = base / "odd"
    folder.mkdir()
    Image.open(source["path"]).save(folder / "exact.png")
    Image.fromarray(republish(np.asarray(Image.open(other["path"])), ["crop", "window", "jpeg"],
                              np.random.default_rng(0))).save(folder / "near.png")
    Image.fromarray(np.full((128, 128), 90, dtype=np.uint8)).save(folder / "blank.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for name, patient in (("exact", "ext-A"), ("near", "ext-B"), ("blank", "ext-C"), ("broken", "ext-D")):
        rows.append({"image_id": name, "path": str(folder / f"{name}.png"), "label": "covid", "patient_id": patient})
    # ext-A has a second, unique image: it goes with its patient
    sibling, _ = texture(folder / "sibling.png")
    rows.append({"image_id": "new-sibling", "path": sibling, "label": "covid", "patient_id": "ext-A"})
    external = pd.DataFrame(rows).assign(origin="real", source="ext", view="PA")
    return development, external, source, other


def test_assemble_external_drops_copies_and_their_patients(cohorts, tmp_path):
    from cxrlib.data.external import assemble_external, read_external

    development, external, source, other = cohorts
    kept, report = assemble_external(external, development, name="odd one", out_dir=tmp_path, near="copies")
    excluded = report.excluded.set_index("image_id")["reason"].to_dict()
    assert excluded == {"broken": "unreadable", "blank": "degenerate", "exact": "exact copy of development",
                        "near": "near copy of development", "new-sibling": "patient of a development copy"}
    copies = report.copies.set_index("image_id")
    assert copies.loc["exact", "development_image_id"] == source["image_id"]
    assert copies.loc["near", "development_patient_id"] == other["patient_id"]
    assert set(kept["image_id"]) == set(external["image_id"]) - set(excluded)
    assert (kept["split"] == "test").all() and (kept["cohort"] == "odd one").all()
    metrics = report.metrics()
    assert metrics["n_excluded_by_reason"]["near copy of development"] == 1 and metrics["n_linked_patients"] == 2
    written = read_external(tmp_path, allowed_roots=[Path(external["path"].iloc[0]).parent.parent])
    assert list(written) == ["odd one"] and sorted(written["odd one"]["image_id"]) == sorted(kept["image_id"])
    assert (tmp_path / "external" / "odd_one" / "copies.csv").is_file()


def test_assemble_external_resizes_like_the_development_cohort(cohorts, tmp_path):
    from cxrlib.data.external import assemble_external, read_external
    from cxrlib.data.io import read_image

    development, external, _, _ = cohorts
    kept, _ = assemble_external(external, development, name="resized", out_dir=tmp_path, size=64, near=None)
    assert all(read_image(p).shape == (64, 64) for p in kept["path"])
    assert "near" in set(kept["image_id"])  # exact copies only: the re-published one stays
    assert set(read_external(tmp_path)) == {"resized"}


def test_bad_external_input_stops_in_one_line_naming_the_cohort(cohorts, tmp_path):
    from cxrlib.data.external import ExternalCohortError, assemble_external, load_external

    development, external, _, _ = cohorts
    with pytest.raises(ExternalCohortError, match="external cohort 'nosuch': unknown recipe"):
        load_external("nosuch", tmp_path)
    with pytest.raises(ExternalCohortError, match="external cohort 'realdata':.*expects") as info:
        load_external("realdata", tmp_path)
    assert "\n" not in str(info.value)
    recipe = tmp_path / "odd.yaml"
    recipe.write_text("name: odd\nsources: {a: {adapter: image-folder, root: a}}\n"
                      "classes: {tuberculosis: [{source: a}]}\n")
    with pytest.raises(ExternalCohortError, match=r"unknown class\(es\) \['tuberculosis'\]"):
        load_external(recipe, tmp_path)
    with pytest.raises(ExternalCohortError, match="'empty': no image"):
        assemble_external(external.iloc[:0], development, name="empty")
    with pytest.raises(ExternalCohortError, match="'copies only': no image left"):
        assemble_external(development.iloc[:3], development, name="copies only", near=None)


def test_weighted_metrics_equal_the_metrics_of_the_expanded_sample():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    pos = rng.random(40) < 0.4
    score = np.round(rng.random((2, 40)), 1)  # rounded: many ties
    called = score >= 0.5
    weights = rng.integers(0, 3, (3, 40)).astype(float)
    got = ex.weighted_metrics(pos, score, called, weights)
    for b in range(3):
        rows = np.repeat(np.arange(40), weights[b].astype(int))
        for s in range(2):
            assert got["auc"][b, s] == pytest.approx(roc_auc_score(pos[rows], score[s, rows]))
            assert got["sensitivity"][b, s] == pytest.approx(called[s, rows][pos[rows]].mean())
            assert got["specificity"][b, s] == pytest.approx((~called[s, rows][~pos[rows]]).mean())
    only_positive = ex.weighted_metrics(np.ones(4, bool), score[:, :4], called[:, :4], np.ones((1, 4)))
    assert np.isnan(only_positive["auc"]).all() and np.isnan(only_positive["specificity"]).all()


def test_score_models_with_a_model_that_missed_images():
    predictions = _set("internal", n_patients=20, separable=True)
    missing = predictions[(predictions["seed"] == 1)].index[:4]
    scored = ex.score_models(predictions.drop(index=missing), by_view=False, n_boot=50).set_index("seed")
    assert scored.loc[0, "n"] == 40 and scored.loc[1, "n"] == 36 and (scored["auc"] == 1.0).all()
    summary = ex.summarize_sets(predictions.drop(index=missing), by_view=False, n_boot=50)
    assert (summary["n"] == 36).all()  # seed-means use the images every seed predicted


def test_wide_table_with_the_floor():
    rng = np.random.default_rng(4)
    predictions = pd.concat([_set("internal", n_patients=30, separable=True, rng=rng),
                             _set("random", n_patients=30, separable=False, rng=rng)])
    summary = ex.summarize_sets(predictions, n_boot=100)
    floor = pd.DataFrame({"task": ["normal_vs_covid"] * 2, "evaluation_set": ["internal", "random"],
                          "auc": [0.6, 0.6], "auc_low": [0.5, 0.5], "auc_high": [0.7, 0.7]})
    table = ex.wide_table(summary, floor).set_index("evaluation_set")
    assert list(table.index) == ["internal", "random"] and table.loc["internal", "auc"] == 1.0
    assert table.loc["internal", "versus_floor"] == "above the image-statistics floor"
    assert table.loc["random", "versus_floor"] == "not shown to beat image statistics"
    assert table.loc["random", "n"] == 60 and {"sensitivity_low", "floor_auc_high"} <= set(table.columns)


def test_a_positives_only_cohort_is_read_against_the_floor_on_sensitivity():
    rng = np.random.default_rng(6)
    predictions = pd.concat([_set("internal", n_patients=30, separable=True, rng=rng),
                             _set("positives", n_patients=30, separable=False, only_positive=True, rng=rng)])
    summary = ex.summarize_sets(predictions, n_boot=100)
    floor = pd.DataFrame({"task": ["normal_vs_covid"] * 2, "evaluation_set": ["internal", "positives"],
                          "auc": [0.6, np.nan], "auc_low": [0.5, np.nan], "auc_high": [0.7, np.nan],
                          "sensitivity": [0.5, 0.95], "sensitivity_low": [0.4, 0.9],
                          "sensitivity_high": [0.6, 0.99]})
    table = ex.wide_table(summary, floor).set_index("evaluation_set")
    assert np.isnan(table.loc["positives", "auc"]) and table.loc["positives", "floor_sensitivity"] == 0.95
    # random scores call about half the positives: below a floor that calls 95% of them
    assert table.loc["positives", "sensitivity_high"] < 0.9
    assert table.loc["positives", "versus_floor"] == "not shown to beat image statistics"
    # where the AUC exists the verdict stays on the AUC
    assert table.loc["internal", "versus_floor"] == "above the image-statistics floor"
    floor.loc[1, ["sensitivity", "sensitivity_low", "sensitivity_high"]] = [0.1, 0.05, 0.2]
    assert ex.wide_table(summary, floor).set_index("evaluation_set").loc["positives", "versus_floor"] == \
        "above the image-statistics floor"


def test_drop_claim_is_worded_from_its_interval():
    row = {"task": "normal_vs_covid", "arch": "cnn", "imbalance": "1:20", "condition": "real", "metric": "auc",
           "external": "site_b", "difference": 0.2, "low": 0.05, "high": 0.3}
    claim = ex.drop_claim(row)
    assert claim.verdict == "drops externally" and "auc: internal minus site_b" in claim.subject
    assert ex.drop_claim({**row, "low": -0.05}).verdict == "no difference shown"
    assert ex.drop_claim({**row, "difference": -0.2, "low": -0.3, "high": -0.1}).verdict == "higher externally"
