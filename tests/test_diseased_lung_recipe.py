"""The multi-source recipe end to end on tiny fixtures: rows, training, scores per convention, QC."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
from test_covid_segmentations import build_layout
from test_sources import build_radiography

from cxrlib.data.sources import Covid19RadiographyDatabase, CovidSegmentations
from cxrlib.runs import read_json, write_json
from cxrlib.stages import lung_segmentation as seg


def expert_manifest(tmp_path) -> pd.DataFrame:
    """The covid-segmentations fixture with two more patients (films copied from a.jpg)."""
    root = build_layout(tmp_path / "covseg")
    metadata = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    structure = pd.read_csv(root / "structure.csv", dtype=str, keep_default_na=False)
    extra_meta, extra_structure = [], []
    for patient, film in (("4", "d.jpg"), ("5", "e.jpg"), ("6", "f.jpg")):
        shutil.copy(root / "images" / "a.jpg", root / "images" / film)
        extra_meta.append(metadata.iloc[0].replace({"a.jpg": film, "1": patient}))
        copied = structure[structure["Filename"] == "a.jpg"].copy()
        copied["Filename"] = film
        extra_structure.append(copied)
    pd.concat([metadata, pd.DataFrame(extra_meta)]).to_csv(root / "metadata.csv", index=False)
    pd.concat([structure, *extra_structure]).to_csv(root / "structure.csv", index=False)
    with pytest.warns(UserWarning):
        return CovidSegmentations(root, cache_dir=tmp_path / "cache").manifest()


def test_rows_keep_patients_apart_and_the_recipe_trains_and_scores(tmp_path, one_thread):
    visible = Covid19RadiographyDatabase(build_radiography(tmp_path / "db", {"Viral Pneumonia": 8})).manifest()
    expert = expert_manifest(tmp_path)
    rows = seg.diseased_lung_rows(visible, expert, n_train_patients=5, n_test_patients=2,
                                  n_expert_test_patients=1, seed=0)
    for source, part in rows.groupby("source"):
        splits = part.groupby("patient_id")["split"].nunique()
        assert (splits == 1).all(), source  # a patient never straddles splits
        assert set(part["split"]) == {"train", "val", "test"}, source
    recipe = seg.DiseasedLungRecipe(image_size=32, base_channels=4, depth=2, epochs=1, batch_size=4,
                                    expert_repeats=2, opacity_p=1.0)
    result = seg.train_diseased_lung_segmenter(rows, tmp_path / "unet", recipe, device="cpu")
    assert (tmp_path / "unet" / "recipe.json").is_file() and result.checkpoint_path.is_file()
    assert read_json(tmp_path / "unet" / "recipe.json")["opacity_kinds"] == list(recipe.opacity_kinds)
    # the same recipe resumes quietly; a changed one is named (the training config does not hold it)
    assert seg.resumed_recipe_changes(tmp_path / "unet", recipe) == {}
    assert seg.resumed_recipe_changes(tmp_path / "elsewhere", recipe) == {}
    # prediction-time settings (test-time flips and zooms) do not make it another network
    assert seg.resumed_recipe_changes(tmp_path / "unet", dataclasses.replace(recipe, flips=False, zooms=(1.0,))) == {}
    other = dataclasses.replace(recipe, opacity_kinds=("white_out",), scale_max=1.1, zooms=(1.0,))
    assert seg.resumed_recipe_changes(tmp_path / "unet", other) == {
        "opacity_kinds": [list(recipe.opacity_kinds), ["white_out"]], "scale_max": [1.3, 1.1]}
    # a recipe.json written before a setting existed: that setting is not compared
    saved = read_json(tmp_path / "unet" / "recipe.json")
    (tmp_path / "older").mkdir()
    shutil.copy(tmp_path / "unet" / "last.pt", tmp_path / "older" / "last.pt")
    write_json(tmp_path / "older" / "recipe.json", {k: v for k, v in saved.items() if k != "opacity_kinds"})
    assert seg.resumed_recipe_changes(tmp_path / "older", other) == {"scale_max": [1.3, 1.1]}
    with pytest.warns(UserWarning, match="other recipe settings.*opacity_kinds"):
        seg.train_diseased_lung_segmenter(rows, tmp_path / "unet", other, device="cpu")
    assert read_json(tmp_path / "unet" / "recipe.json")["resumed_with_changes"]["scale_max"] == [1.3, 1.1]
    test = rows[rows["split"] == "test"]
    evaluation = seg.evaluate_by_convention(result.model, test, input_size=32, flips=True, zooms=recipe.zooms,
                                            size=64, n_boot=20)
    per_image = evaluation.per_image
    expert_ids = set(test.loc[test["source"] == "covid-segmentations", "image_id"])
    conventions = per_image.groupby("image_id")["convention"].apply(set)
    assert all(conventions[i] == {"anatomical", "visible"} for i in expert_ids)
    assert all(conventions[i] == {"visible"} for i in set(conventions.index) - expert_ids)
    assert per_image.loc[per_image["image_id"].isin(expert_ids), "lesion_burden"].notna().all()
    assert per_image.loc[~per_image["image_id"].isin(expert_ids), "lesion_burden"].isna().all()
    metrics = evaluation.metrics()
    assert metrics["test_time_flips"] is True and {"anatomical", "visible"} <= set(metrics)
    assert metrics["test_time_zooms"] == [1.0, 1.15, 1.3]
    assert 0.0 <= metrics["visible"]["dice_mean"] <= 1.0
    assert set(evaluation.by_burden(n_boot=20)["convention"]) == {"anatomical", "visible"}


def test_flipped_logits_come_back_with_the_lungs_exchanged():
    logits = np.zeros((1, 4, 2, 3), dtype=np.float32)
    logits[0, 1, :, 2] = 5.0  # "left lung" on the image right of the mirrored image
    import torch

    back = seg._flip_lr(torch.from_numpy(logits)).numpy()
    assert back[0, 2, 0, 0] == 5.0 and back[0, 1].max() == 0.0


def test_quality_control_and_figures_on_a_segmented_manifest(tmp_path, one_thread):
    import matplotlib

    matplotlib.use("Agg")
    from cxrlib.models.unet import UNet, UNetConfig
    from cxrlib.viz import segmentation as segviz

    expert = expert_manifest(tmp_path)
    model = UNet(UNetConfig(in_channels=1, num_classes=4, base_channels=4, depth=2))
    segmented = seg.segment_manifest(model, expert, tmp_path / "out", input_size=32, device="cpu")
    qc = seg.qc_manifest(segmented)
    assert list(qc["image_id"]) == list(segmented["image_id"])
    assert qc["qc_pass"].dtype == bool and (qc.loc[~qc["qc_pass"], "qc_reason"] != "").all()
    # an untrained network finds no plausible lungs: every image fails, with its reason shown
    assert not qc["qc_pass"].any()
    figure = segviz.qc_failure_gallery(segmented, qc, max_images=2)
    assert "fail" in figure._suptitle.get_text()
    evaluation = seg.evaluate_by_convention(model, expert, input_size=32, size=48, n_boot=10)
    segviz.dice_by_burden_figure(evaluation)
    segviz.convention_gallery(evaluation, k=2, convention="visible")


def test_notebook_02_trains_the_recipe_scores_conventions_and_external_folders(tmp_path, monkeypatch):
    """Notebook 02 with SEG_DATA + EXPERT_SEG_DATA: the 4-class recipe, scores under both lung
    conventions and by burden, a SEG_EXTERNAL folder in the covid-segmentations layout (its
    training patients left out), and the quality control of every segmented image."""
    import json

    from cxrlib import stages
    from cxrlib.pipeline import run_pipeline

    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "data"))
    radiography = build_radiography(tmp_path / "db", {"Viral Pneumonia": 8})
    expert_manifest(tmp_path)  # builds tmp_path / "covseg" with six patients
    run_dir = tmp_path / "run"
    result = run_pipeline(dataset="phantom", profile="quick", run_dir=run_dir, device="cpu", notebooks=["02"],
                          progress=False, extra_params={
                              "SEG_DATA": str(radiography), "EXPERT_SEG_DATA": str(tmp_path / "covseg"),
                              "SEG_EXTERNAL": [str(tmp_path / "covseg")], "N_TRAIN_PATIENTS": 5,
                              "N_TEST_PATIENTS": 2, "N_EXPERT_TEST_PATIENTS": 2, "EXPERT_REPEATS": 2,
                              "IMAGE_SIZE": 32, "DEPTH": 2, "EPOCHS": 1, "FLIPS": True, "ZOOMS": [1.0, 1.3],
                              "N_BOOT": 20})
    assert result.ok
    metrics = json.loads(stages.output_path(run_dir, "02", "metrics.json").read_text())
    assert metrics["recipe"]["expert_repeats"] == 2 and metrics["test_time_flips"] is True
    assert metrics["test_time_zooms"] == metrics["recipe"]["zooms"] == [1.0, 1.3]
    assert metrics["lung_convention"] == "visible"
    assert {"anatomical", "visible"} <= set(metrics["by_convention"])
    assert {row["convention"] for row in metrics["dice_by_burden"]} == {"anatomical", "visible"}
    # the external folder: scored under both conventions on its test patients only
    external = metrics["external"]["covseg"]
    assert {"anatomical", "visible"} <= set(external) and external["anatomical"]["n_patients"] == 2
    left_out = pd.read_csv(stages.output_path(run_dir, "02", "external_left_out.csv"), dtype=str)
    assert len(left_out) and set(left_out["reason"]) == {"patient in the segmenter's training data"}
    # every segmented image has a quality-control verdict, in the manifest and in lung_qc.csv
    qc = pd.read_csv(stages.output_path(run_dir, "02", "lung_qc.csv"))
    manifest = pd.read_csv(stages.output_path(run_dir, "02", "manifest.csv"), dtype=str)
    assert len(qc) == len(manifest) == metrics["lung_qc"]["n_images"]
    assert set(manifest["lung_qc_pass"]) <= {"True", "False"}
    assert metrics["lung_qc"]["n_failed"] == int((manifest["lung_qc_pass"] == "False").sum())
    for name in ("dice_by_burden.png", "best_worst_anatomical.png", "best_worst_visible.png"):
        assert stages.output_path(run_dir, "02", name).is_file(), name


def test_mask_cohorts_are_read_by_layout_and_refused_with_the_folder_named(tmp_path):
    from cxrlib.errors import CxrInputError

    expert_manifest(tmp_path)
    cohort = seg.load_mask_cohort(tmp_path / "covseg", cache_dir=tmp_path / "masks")
    assert set(cohort["split"]) == {"test"} and seg.has_anatomical_references(cohort)
    radiography = seg.load_mask_cohort(build_radiography(tmp_path / "db", {"Viral Pneumonia": 3}),
                                       cache_dir=tmp_path / "unused")
    assert len(radiography) == 3 and not seg.has_anatomical_references(radiography)
    (tmp_path / "empty").mkdir()
    for folder, message in ((tmp_path / "missing", "no such folder"), (tmp_path / "empty", "neither")):
        with pytest.raises(CxrInputError, match=message) as raised:
            seg.load_mask_cohort(folder, cache_dir=tmp_path / "masks")
        assert str(folder) in str(raised.value)
    training = cohort.assign(split=["train"] + ["test"] * (len(cohort) - 1))
    kept, dropped = seg.without_training_patients(cohort, training)
    trained_patient = cohort["patient_id"].iloc[0]
    assert trained_patient not in set(kept["patient_id"]) and trained_patient in set(dropped["patient_id"])
    assert len(kept) + len(dropped) == len(cohort)
    # several folders at once, as notebook 02's SEG_EXTERNAL reads them
    cohorts, left_out = seg.external_mask_cohorts([tmp_path / "covseg", tmp_path / "db"], training,
                                                  cache_dir=tmp_path / "external")
    assert sorted(cohorts) == ["covseg", "db"] and len(cohorts["covseg"]) == len(kept)
    assert left_out["cohort"].tolist() == ["covseg"] * len(dropped)
    assert set(left_out["patient_id"]) == {trained_patient}
    all_trained = seg.external_mask_cohorts([tmp_path / "covseg"], cohort.assign(split="train"),
                                            cache_dir=tmp_path / "external")
    assert all_trained[0] == {} and len(all_trained[1]) == len(cohort)
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="same name 'covseg'"):
        seg.external_mask_cohorts([tmp_path / "covseg", tmp_path / "other" / "covseg"], training,
                                  cache_dir=tmp_path / "external")


def test_a_four_class_segmenter_gives_the_lungs_of_the_convention_asked_for():
    import torch

    class Fixed(torch.nn.Module):  # background, visible left / right, lung behind the heart
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = torch.full((x.shape[0], 4, *x.shape[-2:]), -5.0)
            width = x.shape[-1]
            logits[:, 0] = 5.0
            logits[:, 2, 4:28, 2:12] = 10.0           # right lung, image left
            logits[:, 1, 4:28, width - 12:width - 2] = 10.0
            logits[:, 3, 16:28, 12:16] = 10.0         # behind the heart, next to the right lung
            return logits

    image = np.full((32, 32), 128, np.uint8)
    visible = seg.predict_label_maps(Fixed(), [image], input_size=32, convention="visible")[0]
    anatomical = seg.predict_label_maps(Fixed(), [image], input_size=32, convention="anatomical")[0]
    assert (visible == 3).sum() == 0 and (anatomical == 3).sum() == 0
    assert (anatomical == 2).sum() == (visible == 2).sum() + 12 * 4  # the retrocardiac part joins the right lung
    assert ((anatomical == 1) == (visible == 1)).all()
    with pytest.raises(ValueError, match="convention"):
        seg.predict_label_maps(Fixed(), [image], input_size=32, convention="heart")


def test_expert_folds_test_every_patient_once_and_keep_patients_whole(tmp_path):
    expert = expert_manifest(tmp_path)
    tested = []
    for fold in range(3):
        rows = seg.expert_fold_splits(expert, fold=fold, n_folds=3, seed=0)
        assert (rows.groupby("patient_id")["split"].nunique() == 1).all()
        assert set(rows["split"]) == {"train", "val", "test"}
        tested += sorted(rows.loc[rows["split"] == "test", "patient_id"].unique())
    assert sorted(tested) == sorted(expert["patient_id"].unique())  # each patient tested exactly once
    with pytest.raises(ValueError, match="fold must be"):
        seg.expert_fold_splits(expert, fold=3, n_folds=3)
    visible = Covid19RadiographyDatabase(build_radiography(tmp_path / "db", {"Viral Pneumonia": 8})).manifest()
    rows = seg.diseased_lung_rows(visible, expert, n_train_patients=5, n_test_patients=2, expert_fold=1,
                                  n_expert_folds=3)
    expected = seg.expert_fold_splits(expert, fold=1, n_folds=3)
    expert_rows = rows[rows["source"] == "covid-segmentations"].set_index("image_id")["split"]
    assert expert_rows.to_dict() == expected.set_index("image_id")["split"].to_dict()
