"""Dice / IoU / HD95 on hand-made masks, per-image tables, and bootstrap intervals."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from cxrlib.evaluate.segmentation import dice, hd95, iou, per_image_metrics, summarize_metrics
from cxrlib.evaluate.stats import bootstrap_ci


def _square(offset_y: int = 0, offset_x: int = 0, shape=(60, 60)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[20 + offset_y : 40 + offset_y, 20 + offset_x : 40 + offset_x] = True
    return mask


def test_identical_masks():
    square = _square()
    assert dice(square, square) == 1.0 and iou(square, square) == 1.0
    assert hd95(square, square) == 0.0


def test_shifted_square():
    square, shifted = _square(), _square(offset_x=3)
    assert hd95(square, shifted) == 3.0
    assert hd95(shifted, square) == 3.0
    assert dice(square, shifted) == pytest.approx(2 * 17 * 20 / 800)
    assert iou(square, shifted) == pytest.approx(17 * 20 / (23 * 20))
    assert hd95(square, shifted, spacing=0.5) == 1.5  # in the units of the pixel spacing


def test_disjoint_and_empty_masks():
    square, far = _square(), _square(offset_y=-20, offset_x=-20)
    far[:] = False
    far[0:5, 0:5] = True
    assert dice(square, far) == 0.0 and iou(square, far) == 0.0
    assert hd95(square, far) > 15
    empty = np.zeros_like(square)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    assert dice(square, empty) == 0.0
    assert math.isnan(hd95(square, empty)) and math.isnan(hd95(empty, square))
    with pytest.raises(ValueError, match="shape"):
        dice(square, square[:-1])


def _label_map(shift: int = 0) -> np.ndarray:
    labels = np.zeros((64, 64), dtype=np.uint8)
    labels[10:50, 36:56] = 1
    labels[10:50, 8:28] = 2
    return np.roll(labels, shift, axis=1)


def test_per_image_metrics_table():
    truth = np.stack([_label_map(), _label_map(), _label_map()])
    pred = np.stack(
        [_label_map(), _label_map(shift=2), np.where(_label_map() == 1, 0, _label_map())]
    )
    table = per_image_metrics(pred, truth, ["a", "b", "c"])
    assert list(table.columns) == [
        "image_id",
        "dice_left",
        "dice_right",
        "dice_lungs",
        "iou_left",
        "iou_right",
        "iou_lungs",
        "hd95_left",
        "hd95_right",
        "hd95_lungs",
    ]
    assert list(table["image_id"]) == ["a", "b", "c"]
    assert (table.loc[0, table.columns[1:]] == [1, 1, 1, 1, 1, 1, 0, 0, 0]).all()
    assert table.loc[1, "hd95_left"] == 2.0
    assert table.loc[1, "dice_left"] == pytest.approx(2 * 18 * 40 / (2 * 20 * 40))
    assert table.loc[2, "dice_left"] == 0.0 and table.loc[2, "dice_right"] == 1.0
    assert math.isnan(table.loc[2, "hd95_left"])
    assert 0 < table.loc[2, "dice_lungs"] < 1
    # sequences of maps of different sizes work too, and ids default to positions
    ragged = per_image_metrics([_label_map(), _label_map()[:40]], [_label_map(), _label_map()[:40]])
    assert list(ragged["image_id"]) == [0, 1] and (ragged["dice_lungs"] == 1).all()


def test_summarize_metrics_keys_and_json():
    truth = np.stack([_label_map()] * 6)
    pred = np.stack([_label_map(shift=s % 3) for s in range(6)])
    table = per_image_metrics(pred, truth)
    summary = summarize_metrics(table, seed=0)
    assert summary["n_images"] == 6
    low, high = summary["dice_lungs_ci95"]
    assert low <= summary["dice_lungs_mean"] <= high
    assert summary["dice_lungs_mean"] == pytest.approx(table["dice_lungs"].mean())
    assert {"iou_left_mean", "hd95_right_ci95"} <= set(summary)
    json.dumps(summary)
    table["patient_id"] = ["p1", "p1", "p2", "p2", "p3", "p3"]
    grouped = summarize_metrics(table, groups="patient_id")
    assert "patient_id_mean" not in grouped


def test_bootstrap_ci_contains_estimate_and_narrows():
    rng = np.random.default_rng(0)
    small = rng.normal(0.9, 0.05, 30)
    large = rng.normal(0.9, 0.05, 1000)
    est_small, low_small, high_small = bootstrap_ci(small)
    est_large, low_large, high_large = bootstrap_ci(large)
    assert low_small <= est_small <= high_small and low_large <= est_large <= high_large
    assert est_small == pytest.approx(small.mean())
    assert high_large - low_large < (high_small - low_small) / 2
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    est_median, low_median, high_median = bootstrap_ci(small, stat=np.median, alpha=0.1)
    assert est_median == pytest.approx(np.median(small)) and low_median <= est_median <= high_median


def test_bootstrap_ci_nan_handling():
    values = np.array([0.8, np.nan, 0.9, 1.0])
    assert bootstrap_ci(values) == bootstrap_ci(values[~np.isnan(values)])
    assert all(math.isnan(v) for v in bootstrap_ci([np.nan, np.nan]))
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)


def test_grouped_bootstrap_resamples_whole_groups():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(15), 8)
    # strong per-patient effect: images of one patient are far from independent
    values = np.repeat(rng.normal(0, 1, 15), 8) + rng.normal(0, 0.1, len(patients))
    _, low, high = bootstrap_ci(values)
    est_grouped, low_grouped, high_grouped = bootstrap_ci(values, groups=patients)
    assert low_grouped <= est_grouped <= high_grouped
    assert high_grouped - low_grouped > 2 * (high - low)
    # one group per value is the ordinary bootstrap in distribution
    _, low_single, high_single = bootstrap_ci(values, groups=[f"id{i}" for i in range(len(values))])
    assert (high_single - low_single) == pytest.approx(high - low, rel=0.25)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(values, groups=patients[:-1])


def rerun_table(dice_values, patients=None, convention="anatomical"):
    count = len(dice_values)
    return pd.DataFrame({"image_id": [f"img{i:02d}" for i in range(count)], "convention": convention,
                         "patient_id": patients if patients is not None else [f"p{i // 2}" for i in range(count)],
                         "dice_lungs": dice_values, "dice_left": np.asarray(dice_values) - 0.01,
                         "dice_right": np.asarray(dice_values) + 0.01})


def test_worst_share_mean_is_the_mean_of_the_worst_tenth():
    from cxrlib.evaluate.segmentation import worst_share_mean

    values = np.linspace(0.5, 0.99, 48)
    assert worst_share_mean(values) == pytest.approx(values[:5].mean())  # ceil(4.8) = 5 of 48
    assert worst_share_mean([0.9, np.nan, 0.8], fraction=0.1) == pytest.approx(0.8)
    assert np.isnan(worst_share_mean([np.nan]))


def test_rerun_summary_pools_runs_and_patients():
    from cxrlib.evaluate.segmentation import summarize_reruns

    rng = np.random.default_rng(0)
    base = np.clip(rng.normal(0.93, 0.03, 40), 0, 1)
    # identical runs: the estimate is the one run's statistic, the interval the patients' alone
    same = summarize_reruns([rerun_table(base)] * 3, n_boot=200)["anatomical"]
    assert same["dice_mean"]["estimate"] == pytest.approx(base.mean())
    assert same["dice_left_mean"]["estimate"] == pytest.approx(base.mean() - 0.01)
    assert same["dice_p10"]["estimate"] == pytest.approx(np.percentile(base, 10))
    assert same["dice_worst_decile"]["per_run"] == [pytest.approx(np.sort(base)[:4].mean())] * 3
    low, high = same["dice_mean"]["ci95"]
    assert low < base.mean() < high and high - low < 0.03
    # runs that differ by a shift: their spread widens the interval (t interval over 3 runs)
    shifted = summarize_reruns([rerun_table(base + shift) for shift in (-0.02, 0.0, 0.02)], n_boot=200)
    worst = shifted["anatomical"]["dice_worst_decile"]
    assert worst["per_run"] == pytest.approx([np.sort(base)[:4].mean() + s for s in (-0.02, 0.0, 0.02)])
    assert worst["ci95"][0] < min(worst["per_run"]) and worst["ci95"][1] > max(worst["per_run"])


def test_rerun_summary_refuses_runs_on_other_images():
    from cxrlib.evaluate.segmentation import summarize_reruns

    with pytest.raises(ValueError, match="run 1 scores other images"):
        summarize_reruns([rerun_table([0.9, 0.8, 0.7]), rerun_table([0.9, 0.8])], n_boot=10)
    with pytest.raises(ValueError, match="no per-image tables"):
        summarize_reruns([], n_boot=10)
