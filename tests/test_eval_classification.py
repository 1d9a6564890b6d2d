"""Classification metrics: known values, validation-only thresholds, patient bootstrap, calibration."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from sklearn import metrics as skm

from cxrlib.evaluate import classification as ec
from cxrlib.evaluate.classification import (
    binary_metrics,
    choose_threshold,
    ci_table,
    expected_calibration_error,
    metrics_with_ci,
    multiclass_metrics,
    reliability_curve,
    roc_pr_curves,
)
from cxrlib.evaluate.stats import bootstrap_indices


def test_binary_metrics_on_a_hand_made_example():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.6, 0.7, 0.3])
    m = binary_metrics(y, p, threshold=0.5)  # calls: 0 0 1 1 0 -> TP 1, FP 1, TN 2, FN 1
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 2, 1)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["ppv"] == pytest.approx(0.5) and m["npv"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.5)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["auc_roc"] == pytest.approx(4 / 6)  # positive beats negative in 4 of 6 pairs
    pred = (p >= 0.5).astype(int)
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["auc_roc"] == pytest.approx(skm.roc_auc_score(y, p))
    # (N, 2) probabilities give the same as the positive column.
    assert binary_metrics(y, np.stack([1 - p, p], axis=1), 0.5) == m


def test_binary_metrics_degrade_to_nan_not_errors():
    m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.9], 0.5)
    assert np.isnan(m["auc_roc"]) and np.isnan(m["sensitivity"]) and np.isnan(m["pr_auc"])
    assert m["specificity"] == pytest.approx(2 / 3)
    none_called = binary_metrics([0, 1], [0.1, 0.2], 0.5)
    assert np.isnan(none_called["ppv"]) and none_called["npv"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="0 or 1"):
        binary_metrics([0, 2], [0.1, 0.2], 0.5)


def test_threshold_selection_takes_validation_arrays_only():
    assert list(inspect.signature(choose_threshold).parameters) == ["y_val", "p_val", "method", "target_specificity"]


@pytest.mark.parametrize("seed", range(3))
def test_thresholds_meet_their_definitions_on_validation(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(200) < 0.25).astype(int)
    p = np.clip(0.35 * y + rng.random(200) * 0.65, 0, 1).round(2)  # ties on purpose
    spec95 = choose_threshold(y, p, "spec95")
    at_spec95 = binary_metrics(y, p, spec95)
    assert at_spec95["specificity"] >= 0.95
    # No threshold with >= 95 % specificity is more sensitive.
    candidates = [binary_metrics(y, p, t) for t in np.unique(p)]
    best_sensitivity = max(c["sensitivity"] for c in candidates if c["specificity"] >= 0.95)
    assert at_spec95["sensitivity"] == pytest.approx(best_sensitivity)
    youden = choose_threshold(y, p, "youden")
    j = binary_metrics(y, p, youden)
    assert j["sensitivity"] + j["specificity"] == pytest.approx(
        max(c["sensitivity"] + c["specificity"] for c in candidates))
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(np.zeros(5, int), np.linspace(0, 1, 5))


def test_numpy_bootstrap_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(6, 50))
        y = np.r_[0, 1, (rng.random(n - 2) < 0.3).astype(int)]
        p = rng.random(n).round(1)
        reference = binary_metrics(y, p, 0.5)
        fast = ec._binary_scalars(y, p, 0.5)
        for name, value in fast.items():
            assert value == pytest.approx(reference[name], nan_ok=True), name
        y3 = np.r_[0, 1, 2, rng.integers(0, 3, n - 3)]
        prob = rng.dirichlet([1, 1, 1], n)
        reference3 = multiclass_metrics(y3, prob)
        for name, value in ec._multiclass_scalars(y3, prob, None).items():
            assert value == pytest.approx(reference3[name], nan_ok=True), name


def test_bootstrap_resamples_whole_patients():
    groups = np.array(["a", "a", "a", "b", "c", "c"])
    for rows in bootstrap_indices(6, n_boot=50, seed=1, groups=groups):
        drawn = groups[rows]
        # every drawn patient comes with all of its images, the same number of times
        for patient, size in (("a", 3), ("b", 1), ("c", 2)):
            assert np.sum(drawn == patient) % size == 0
            copies = np.bincount(rows[drawn == patient] , minlength=6)[groups == patient]
            assert len(set(copies.tolist())) == 1


def test_ci_contains_the_estimate_and_patients_not_images_are_resampled():
    rng = np.random.default_rng(3)
    n_patients, images_each = 60, 4
    y_patient = (rng.random(n_patients) < 0.3).astype(int)
    p_patient = np.clip(0.3 * y_patient + 0.7 * rng.random(n_patients), 0, 1)
    ci = metrics_with_ci(y_patient, p_patient, 0.5, n_boot=300, seed=7)
    assert ci.n_boot_used == ci.n_boot == 300
    for name, (estimate, low, high) in ci.items():
        assert low <= estimate <= high, name

    # Every patient imaged 4 times (identical images): resampling patients gives exactly the
    # interval of one image per patient; resampling images pretends 4x the data.
    y_images, p_images = np.repeat(y_patient, images_each), np.repeat(p_patient, images_each)
    patients = np.repeat(np.arange(n_patients), images_each)
    by_patient = metrics_with_ci(y_images, p_images, 0.5, groups=patients, n_boot=300, seed=7)
    by_image = metrics_with_ci(y_images, p_images, 0.5, n_boot=300, seed=7)
    for name in ("auc_roc", "sensitivity", "specificity", "balanced_accuracy"):
        assert by_patient[name] == pytest.approx(ci[name]), name
        width_patient = by_patient[name][2] - by_patient[name][1]
        assert by_image[name][2] - by_image[name][1] < width_patient, name
    table = ci_table(by_patient)
    assert list(table.columns) == ["estimate", "low", "high", "text"] and "auc_roc" in table.index


def test_resamples_without_a_positive_patient_are_skipped_and_counted():
    y = np.array([1, 0, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    with pytest.warns(UserWarning, match="lacked a class"):
        ci = metrics_with_ci(y, p, 0.5, n_boot=200, seed=0)
    assert 0 < ci.n_boot_used < 200
    assert np.isfinite(ci["auc_roc"]).all()
    with pytest.raises(ValueError, match="threshold"):
        metrics_with_ci(y, p)


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(5)
    y = np.r_[0, 1, 2, rng.integers(0, 3, 57)]
    prob = rng.dirichlet([1, 1, 1], 60)
    prob[np.arange(60), y] += 0.5
    prob /= prob.sum(axis=1, keepdims=True)
    m = multiclass_metrics(y, prob, ["Normal", "Pneumonia", "COVID-19"])
    assert m["macro_auc"] == pytest.approx(skm.roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    pred = prob.argmax(axis=1)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    recall = skm.recall_score(y, pred, average=None)
    assert [m["sensitivity_Normal"], m["sensitivity_Pneumonia"], m["sensitivity_COVID-19"]] == pytest.approx(recall)
    ci = metrics_with_ci(y, prob, groups=np.arange(60) // 2, n_boot=100, class_names=["N", "P", "C"])
    estimate, low, high = ci["macro_auc"]
    assert estimate == pytest.approx(m["macro_auc"]) and low <= estimate <= high


def test_expected_calibration_error_is_zero_only_when_bins_are_calibrated():
    # Bin [0.2, 0.3): four cases at 0.25, one positive; bin [0.7, 0.8): four at 0.75, three positive.
    p = np.array([0.25] * 4 + [0.75] * 4)
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.0)
    overconfident = np.array([0.05] * 4 + [0.95] * 4)
    assert expected_calibration_error(y, overconfident, n_bins=10) == pytest.approx(0.2)
    curve = reliability_curve(y, p, n_bins=10)
    assert curve["count"].sum() == 8 and len(curve) == 10
    filled = curve[curve["count"] > 0]
    assert filled["fraction_positive"].tolist() == pytest.approx([0.25, 0.75])
    assert reliability_curve([1], [1.0], n_bins=4)["count"].tolist() == [0, 0, 0, 1]  # 1.0 in the last bin


def test_roc_and_pr_curves_for_plotting():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.6, 0.4, 0.8, 0.3, 0.9])
    curves = roc_pr_curves(y, p)
    assert curves["auc_roc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert curves["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert list(curves["roc"].columns) == ["fpr", "tpr", "threshold"]
    assert curves["pr"]["recall"].between(0, 1).all() and curves["prevalence"] == pytest.approx(0.5)
