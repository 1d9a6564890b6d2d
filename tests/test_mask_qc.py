"""Lung conventions, mask quality control without a reference, and lesion burden tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlib.data.masks import (
    LUNG_LEFT,
    LUNG_RIGHT,
    LungQCLimits,
    body_box,
    convert_lung_convention,
    lung_convention_of,
    lung_mask_qc,
)
from cxrlib.evaluate.segmentation import (
    lesion_burden,
    metrics_by_burden,
    per_image_metrics_by_convention,
    summarize_by_convention,
)
from cxrlib.stages.lung_segmentation import (
    BACKGROUND_OR_RETROCARDIAC,
    RETROCARDIAC_PARTIAL_LABELS,
    labels_by_convention,
    mask_qc_table,
    retrocardiac_training_labels,
)


def chest(height: int = 100, width: int = 100) -> np.ndarray:
    """A plausible label map: right lung on the image left, left lung on the image right."""
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[20:80, 15:45] = LUNG_RIGHT
    labels[22:78, 55:83] = LUNG_LEFT
    return labels


def test_conversion_removes_the_cardiomediastinum_and_refuses_the_impossible_direction():
    labels = chest()
    heart = np.zeros_like(labels, dtype=bool)
    heart[40:90, 40:60] = True
    visible = convert_lung_convention(labels, "anatomical", "visible", heart)
    assert not np.isin(visible[heart], (LUNG_LEFT, LUNG_RIGHT)).any()
    np.testing.assert_array_equal(visible[~heart], labels[~heart])
    np.testing.assert_array_equal(convert_lung_convention(labels, "visible", "visible"), labels)
    with pytest.raises(ValueError, match="cannot be converted"):
        convert_lung_convention(labels, "visible", "anatomical", heart)
    with pytest.raises(ValueError, match="needs the cardiomediastinum"):
        convert_lung_convention(labels, "anatomical", "visible")
    with pytest.raises(ValueError, match="unknown lung convention"):
        convert_lung_convention(labels, "anatomic", "visible", heart)


def test_convention_of_a_row():
    assert lung_convention_of({"source": "covid-segmentations"}) == "anatomical"
    assert lung_convention_of({"source": "covid19-radiography"}) == "visible"
    assert lung_convention_of({"source": "phantom"}) == ""
    assert lung_convention_of({"source": "covid19-radiography", "lung_convention": "anatomical"}) == "anatomical"
    with pytest.raises(ValueError, match="lung_convention"):
        lung_convention_of({"image_id": "x", "lung_convention": "whole"})


def test_metrics_under_both_conventions_say_which():
    truth = chest()
    heart = np.zeros_like(truth, dtype=bool)
    heart[30:90, 38:62] = True
    # a prediction in the visible convention: perfect once the heart region is removed
    pred = convert_lung_convention(truth, "anatomical", "visible", heart)
    table = per_image_metrics_by_convention([pred, truth], [truth, truth],
                                            reference_conventions=["anatomical", "visible"],
                                            cardiomediastinum=[heart, None], image_ids=["a", "b"])
    assert list(zip(table["image_id"], table["convention"], strict=True)) == [
        ("a", "anatomical"), ("a", "visible"), ("b", "visible")]
    by_key = table.set_index(["image_id", "convention"])["dice_lungs"]
    assert by_key[("a", "visible")] == 1.0 and by_key[("a", "anatomical")] < 0.99
    summary = summarize_by_convention(table, n_boot=50)
    assert set(summary) == {"anatomical", "visible"}
    assert summary["anatomical"]["convention"] == "anatomical" and summary["visible"]["n_images"] == 2
    assert summary["anatomical"]["dice_lungs_worst_decile"] == pytest.approx(by_key[("a", "anatomical")])


def test_a_plausible_mask_passes_and_each_failure_names_its_reason():
    image = np.full((100, 100), 120, dtype=np.uint8)
    assert lung_mask_qc(chest(), image).passed
    one = chest()
    one[one == LUNG_LEFT] = 0
    assert lung_mask_qc(one).reason == "no left lung"
    swapped = chest()
    swapped[chest() == LUNG_LEFT], swapped[chest() == LUNG_RIGHT] = LUNG_RIGHT, LUNG_LEFT
    assert "image right" in lung_mask_qc(swapped).reason
    pieces = chest()
    pieces[45:55, 55:83] = 0  # left lung cut in two halves
    assert "pieces" in lung_mask_qc(pieces).reason
    small = np.zeros((100, 100), dtype=np.uint8)
    small[40:50, 30:38], small[40:50, 60:68] = LUNG_RIGHT, LUNG_LEFT
    assert "cover" in lung_mask_qc(small).reason
    lopsided = chest()
    lopsided[22:78, 55:83] = 0
    lopsided[40:55, 60:70] = LUNG_LEFT
    assert "ratio" in lung_mask_qc(lopsided, limits=LungQCLimits(min_area_fraction=0.05)).reason
    shifted = np.zeros((100, 100), dtype=np.uint8)
    shifted[2:40, 15:45], shifted[60:98, 55:83] = LUNG_RIGHT, LUNG_LEFT
    assert "heights" in lung_mask_qc(shifted).reason
    # the arm case: the "right lung" is a strip along the body's side, inside the film
    framed = np.zeros((100, 100), dtype=np.uint8)
    framed[:, 6:100] = 120  # empty film at the image left: the body starts at column 6
    arm = chest()
    arm[arm == LUNG_RIGHT] = 0
    arm[10:90, 6:28] = LUNG_RIGHT
    result = lung_mask_qc(arm, framed)
    assert "side of the body" in result.reason and result.measures["right_frame_contact"] == 0.0
    # a lung cut by a tight crop also lies along the body's side, but it reaches the film's edge: it passes
    cropped = chest()
    cropped[20:80, 0:15] = LUNG_RIGHT  # the right lung reaches the frame
    result = lung_mask_qc(cropped, np.full((100, 100), 120, dtype=np.uint8))
    assert result.passed and result.measures["right_side_contact"] > 0.3
    assert result.measures["right_frame_contact"] > 0.3


def test_body_box_ignores_empty_film_at_the_borders():
    image = np.zeros((100, 120), dtype=np.uint8)
    image[10:95, 20:110] = 150
    assert body_box(image, image.shape) == (10, 95, 20, 110)
    assert body_box(None, (5, 6)) == (0, 5, 0, 6)
    # on the body box, lungs placed in the body pass; the same lungs on a wider film are off centre
    labels = np.zeros((100, 120), dtype=np.uint8)
    labels[25:80, 30:60], labels[25:80, 70:100] = LUNG_RIGHT, LUNG_LEFT
    assert lung_mask_qc(labels, image).passed


def test_qc_table_has_one_row_per_image():
    table = mask_qc_table([chest(), np.zeros((100, 100), np.uint8)], image_ids=["ok", "empty"])
    assert table["qc_pass"].tolist() == [True, False]
    assert table.set_index("image_id").loc["empty", "qc_reason"] == "no left and no right lung"


def test_retrocardiac_labels_round_trip_to_both_conventions():
    truth = chest()
    heart = np.zeros_like(truth, dtype=bool)
    heart[40:90, 38:62] = True
    four = retrocardiac_training_labels(truth, heart)
    assert set(np.unique(four)) == {0, 1, 2, 3}
    probabilities = np.eye(4, dtype=np.float32)[four].transpose(2, 0, 1)
    out = labels_by_convention(probabilities, postprocess=False)
    np.testing.assert_array_equal(out["anatomical"], truth)
    np.testing.assert_array_equal(out["visible"], convert_lung_convention(truth, "anatomical", "visible", heart))
    three = np.eye(3, dtype=np.float32)[truth].transpose(2, 0, 1)
    same = labels_by_convention(three)
    np.testing.assert_array_equal(same["anatomical"], same["visible"])


def test_a_visible_reference_leaves_the_lung_behind_the_heart_open():
    truth = chest()
    labels = retrocardiac_training_labels(truth, None)
    np.testing.assert_array_equal(np.where(labels == BACKGROUND_OR_RETROCARDIAC, 0, labels), truth)
    open_ = labels == BACKGROUND_OR_RETROCARDIAC
    rows, cols = np.nonzero(truth)
    between = np.zeros_like(open_)
    between[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    assert open_.any() and not (open_ & ~between).any()  # only between and around the lungs
    assert open_[truth.shape[0] // 2, truth.shape[1] // 2]  # the mediastinum, between the lungs
    assert (labels[0] == 0).all() and (labels[:, 0] == 0).all()  # beside and above the chest: background
    assert (retrocardiac_training_labels(np.zeros_like(truth), None) == 0).all()
    np.testing.assert_array_equal(retrocardiac_training_labels(truth, None, partial=False), truth)
    assert RETROCARDIAC_PARTIAL_LABELS == {BACKGROUND_OR_RETROCARDIAC: [0, 3]}


def test_lesion_burden_counts_the_union_inside_the_lung():
    lungs = np.zeros((10, 10), dtype=bool)
    lungs[:, :5] = True  # 50 lung pixels
    ground_glass = np.zeros_like(lungs)
    ground_glass[:2, :] = True  # 10 in the lung, 10 outside
    consolidation = np.zeros_like(lungs)
    consolidation[:4, :1] = True  # 2 new lung pixels
    assert lesion_burden(lungs, [ground_glass, consolidation, None]) == pytest.approx(12 / 50)
    assert lesion_burden(lungs, [None, None]) == 0.0
    assert np.isnan(lesion_burden(np.zeros_like(lungs), [ground_glass]))


def test_metrics_by_burden_bins_images_per_convention():
    table = pd.DataFrame({
        "image_id": ["a", "b", "c", "a", "b", "c"],
        "convention": ["anatomical"] * 3 + ["visible"] * 3,
        "lesion_burden": [0.0, 0.1, 0.6] * 2,
        "dice_lungs": [0.95, 0.9, 0.7, 0.97, 0.93, 0.8],
        "hd95_lungs": [3.0, 5.0, 20.0, 2.0, 4.0, 9.0],
    })
    binned = metrics_by_burden(table, n_boot=50).set_index(["convention", "burden_bin"])
    assert list(binned.loc["anatomical"].index) == ["0-5%", "5-25%", "25-50%", "50-100%"]
    assert binned.loc[("anatomical", "50-100%"), "dice_lungs_mean"] == pytest.approx(0.7)
    assert binned.loc[("visible", "25-50%"), "n_images"] == 0
    assert np.isnan(binned.loc[("visible", "25-50%"), "dice_lungs_mean"])
    with pytest.raises(ValueError, match="increasing"):
        metrics_by_burden(table, bins=[0.5, 0.1])


def test_failed_lung_qc_reads_the_manifest_column_and_the_lung_modes_leave_them_out():
    import pandas as pd

    from cxrlib.data.masks import LUNG_QC_COLUMN, failed_lung_qc
    from cxrlib.stages.classifiers import passing_lung_qc

    manifest = pd.DataFrame({"image_id": list("abcd"), LUNG_QC_COLUMN: ["True", "False", "", "false"]})
    assert failed_lung_qc(manifest).tolist() == [False, True, False, True]  # no verdict (synthetic): passes
    kept, left_out = passing_lung_qc(manifest, "lung_masked")
    assert kept["image_id"].tolist() == ["a", "c"] and left_out == 2
    kept, left_out = passing_lung_qc(manifest, "whole")
    assert len(kept) == 4 and left_out == 0
    assert not failed_lung_qc(manifest.drop(columns=[LUNG_QC_COLUMN])).any()


def test_add_lung_qc_needs_a_verdict_for_every_image():
    import pandas as pd

    from cxrlib.stages.lung_segmentation import add_lung_qc

    segmented = pd.DataFrame({"image_id": ["a", "b"]})
    qc = mask_qc_table([chest(), np.zeros((100, 100), np.uint8)], image_ids=["a", "b"])
    out = add_lung_qc(segmented, qc)
    assert out["lung_qc_pass"].tolist() == ["True", "False"]
    assert out["lung_qc_reason"].tolist() == ["", "no left and no right lung"]
    with pytest.raises(ValueError, match="no quality-control verdict"):
        add_lung_qc(pd.DataFrame({"image_id": ["a", "z"]}), qc)
