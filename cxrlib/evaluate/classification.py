"""Classification metrics that survive heavy class imbalance, with patient-level intervals.

The works reproduced here report accuracy on test sets with few COVID-19 images and pick
thresholds and models on the test set. Here:

- the operating threshold is chosen on the VALIDATION split (:func:`choose_threshold`
  takes validation arrays only: Youden's J, or the highest sensitivity at >= 95 %
  specificity) and then applied unchanged to the test split;
- metrics are threshold-free (ROC AUC, PR AUC) or imbalance-aware (sensitivity,
  specificity, PPV, NPV, balanced accuracy) (:func:`binary_metrics`,
  :func:`multiclass_metrics`);
- confidence intervals resample test PATIENTS, not images (:func:`metrics_with_ci`);
- calibration is shown, not assumed (:func:`reliability_curve`,
  :func:`expected_calibration_error`).

Conventions: ``y_true`` ``(N,)`` int class indices (binary: 1 = positive, e.g. COVID-19);
``prob`` either ``(N,)`` positive-class probabilities in [0, 1] or ``(N, C)`` class
probabilities (rows sum to 1; for ``C = 2`` column 1 is used). A sample is called
positive when ``prob >= threshold``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.stats import rankdata
from sklearn import metrics as skm

from cxrlib.evaluate.stats import bootstrap_indices

ThresholdMethod = Literal["youden", "spec95"]
BINARY_METRICS: tuple[str, ...] = ("auc_roc", "pr_auc", "sensitivity", "specificity", "ppv", "npv", "f1",
                                   "balanced_accuracy", "accuracy")


def _labels(y_true: npt.ArrayLike) -> np.ndarray:
    y = np.asarray(y_true).ravel()
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    return y


def positive_scores(prob: npt.ArrayLike) -> np.ndarray:
    """Positive-class scores ``(N,)`` float64 from ``(N,)`` or ``(N, 2)`` probabilities."""
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim == 2:
        if p.shape[1] != 2:
            raise ValueError(f"binary metrics need (N,) or (N, 2) probabilities, got {p.shape}")
        p = p[:, 1]
    if p.ndim != 1:
        raise ValueError(f"prob must be (N,) or (N, 2), got shape {p.shape}")
    return p


def _check_lengths(y: np.ndarray, p: np.ndarray) -> None:
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} entries, prob {len(p)}")


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else float("nan")


# --------------------------------------------------------------------------- binary


def binary_metrics(y_true: npt.ArrayLike, prob: npt.ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Binary metrics at a given (validation-chosen) threshold.

    Returns floats: ``auc_roc`` (ROC AUC), ``pr_auc`` (average precision), and at
    ``prob >= threshold``: ``sensitivity`` (recall of class 1), ``specificity``, ``ppv``
    (precision), ``npv``, ``f1``, ``balanced_accuracy`` (mean of sensitivity and
    specificity), ``accuracy``; plus the counts ``tp, fp, tn, fn, n, n_pos`` and the
    ``threshold``. A metric whose denominator is empty (AUC with one class present, PPV
    with no positive call) is NaN, never an error.
    """
    y = _labels(y_true)
    p = positive_scores(prob)
    _check_lengths(y, p)
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"binary labels must be 0 or 1, got values {sorted(set(y.tolist()))}")
    pred = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    both_classes = 0 < y.sum() < len(y)
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    ppv, npv = _ratio(tp, tp + fp), _ratio(tn, tn + fn)
    return {
        "auc_roc": float(skm.roc_auc_score(y, p)) if both_classes else float("nan"),
        "pr_auc": float(skm.average_precision_score(y, p)) if y.sum() > 0 else float("nan"),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": ppv,
        "npv": npv,
        # F1 = 2 TP / (2 TP + FP + FN), as sklearn.metrics.f1_score; NaN when there is no positive at all.
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": float(np.mean([sensitivity, specificity])) if both_classes else float("nan"),
        "accuracy": _ratio(tp + tn, len(y)),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
        "n": int(len(y)), "n_pos": int(y.sum()),
        "threshold": float(threshold),
    }


def choose_threshold(y_val: npt.ArrayLike, p_val: npt.ArrayLike, method: ThresholdMethod = "youden",
                     *, target_specificity: float = 0.95) -> float:
    """Operating threshold chosen on VALIDATION labels and scores (never pass test data).

    ``method="youden"``: the threshold maximising Youden's J = sensitivity + specificity - 1.
    ``method="spec95"``: the threshold with the highest sensitivity among those giving at
    least ``target_specificity`` (default 95 %) specificity on the validation set.
    Thresholds are validation scores (``roc_curve`` over every distinct score), so
    ``p_val >= threshold`` reproduces the chosen point exactly. When no score reaches
    the target, the threshold lies just above the highest score (every case negative).
    """
    y = _labels(y_val)
    p = positive_scores(p_val)
    _check_lengths(y, p)
    if not 0 < y.sum() < len(y):
        raise ValueError("choosing a threshold needs both classes in the validation labels")
    fpr, tpr, thresholds = skm.roc_curve(y, p, drop_intermediate=False)
    # The first point (nothing called positive) has threshold +inf; just above the top score does the same.
    thresholds = np.where(np.isfinite(thresholds), thresholds, np.nextafter(p.max(), np.inf))
    if method == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if method == "spec95":
        allowed = np.flatnonzero(1.0 - fpr >= target_specificity - 1e-12)
        # roc_curve orders points by decreasing threshold, so tpr grows along `allowed`.
        return float(thresholds[allowed[-1]])
    raise ValueError(f"method must be 'youden' or 'spec95', got {method!r}")


def choose_thresholds(y_val: npt.ArrayLike, p_val: npt.ArrayLike) -> dict[str, float]:
    """Both validation thresholds: ``{"youden": ..., "spec95": ...}`` (see :func:`choose_threshold`)."""
    return {method: choose_threshold(y_val, p_val, method) for method in ("youden", "spec95")}


# --------------------------------------------------------------------------- multiclass


def multiclass_metrics(y_true: npt.ArrayLike, prob: npt.ArrayLike,
                       class_names: Sequence[str] | None = None) -> dict[str, object]:
    """Metrics of ``(N, C)`` class probabilities, predicted class = argmax.

    Returns ``macro_auc`` (one-vs-rest ROC AUC averaged over classes; NaN unless every
    class is present), ``auc_<name>`` (each class vs the rest), ``sensitivity_<name>``
    (per-class recall), ``balanced_accuracy`` (mean per-class recall), ``accuracy``, and
    ``confusion_matrix`` (``(C, C)`` int list, rows = true class, columns = predicted).
    """
    y = _labels(y_true)
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"prob must be (N, C), got shape {p.shape}")
    _check_lengths(y, p)
    num_classes = p.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} probability columns")
    classes = np.arange(num_classes)
    pred = p.argmax(axis=1)
    present = np.isin(classes, y)
    recall = skm.recall_score(y, pred, labels=classes, average=None, zero_division=np.nan)
    aucs = [float(skm.roc_auc_score(y == c, p[:, c])) if 0 < np.sum(y == c) < len(y) else float("nan")
            for c in classes]
    # One-vs-rest macro AUC (sklearn's multi_class="ovr", average="macro") is the mean of these.
    result: dict[str, object] = {"macro_auc": float(np.mean(aucs)) if num_classes > 2 else aucs[1]}
    for index, name in enumerate(names):
        result[f"auc_{name}"] = aucs[index]
        result[f"sensitivity_{name}"] = float(recall[index])
    result["balanced_accuracy"] = float(np.nanmean(recall)) if present.any() else float("nan")
    result["accuracy"] = float(np.mean(pred == y)) if len(y) else float("nan")
    result["confusion_matrix"] = skm.confusion_matrix(y, pred, labels=classes).tolist()
    return result


# --------------------------------------------------------------------------- intervals


class MetricsCI(dict):
    """``metric name -> (estimate, low, high)``, plus how many bootstrap resamples were used.

    ``n_boot_used``: resamples that contained every class (the others were skipped);
    ``n_boot``: resamples drawn.
    """

    def __init__(self, values: dict[str, tuple[float, float, float]], n_boot_used: int, n_boot: int) -> None:
        super().__init__(values)
        self.n_boot_used = int(n_boot_used)
        self.n_boot = int(n_boot)


def metrics_with_ci(
    y_true: npt.ArrayLike,
    prob: npt.ArrayLike,
    threshold: float | None = None,
    *,
    groups: npt.ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    class_names: Sequence[str] | None = None,
) -> MetricsCI:
    """Every scalar metric with a percentile-bootstrap ``(estimate, low, high)`` interval.

    Binary (``prob`` ``(N,)`` or ``(N, 2)``): the metrics of :func:`binary_metrics` at
    ``threshold`` (required; choose it on validation). Multiclass (``(N, C)``, C > 2): the
    scalar metrics of :func:`multiclass_metrics`. ``groups``: one id per row (patient ids):
    whole patients are resampled (:func:`cxrlib.evaluate.stats.bootstrap_indices`, the
    resampling of ``bootstrap_ci``), since images of one patient are not independent.

    Inside the resampling loop the metrics are computed by exact NumPy formulas (AUC as the
    Mann-Whitney statistic with mid-ranks, average precision as sklearn defines it,
    counts by ``bincount``); they equal the scikit-learn values of :func:`binary_metrics`
    / :func:`multiclass_metrics` (tested) at a fraction of sklearn's per-call cost.

    A resample that lacks a class (no positive patient drawn) cannot give an AUC and is
    skipped for every metric, so all intervals come from the same resamples; the result's
    ``n_boot_used`` says how many were used (a warning says how many were skipped).
    ``estimate`` is the metric on all rows.
    """
    y = _labels(y_true)
    p = np.asarray(prob, dtype=np.float64)
    binary = p.ndim == 1 or p.shape[1] == 2
    if binary and threshold is None:
        raise ValueError("binary metrics need a threshold chosen on validation (choose_threshold)")

    scores = positive_scores(p) if binary else p

    def scalars(rows: np.ndarray | slice) -> dict[str, float]:
        if binary:
            return _binary_scalars(y[rows], scores[rows], threshold)
        return _multiclass_scalars(y[rows], scores[rows], class_names)

    if binary:
        full = binary_metrics(y, scores, threshold)
        estimate = {name: full[name] for name in BINARY_METRICS}
    else:
        estimate = {k: float(v) for k, v in multiclass_metrics(y, p, class_names).items()
                    if k != "confusion_matrix"}
    num_classes = 2 if binary else p.shape[1]
    needed = np.arange(num_classes)
    samples: list[dict[str, float]] = []
    for rows in bootstrap_indices(len(y), n_boot=n_boot, seed=seed, groups=groups):
        if not np.isin(needed, y[rows]).all():
            continue  # a degenerate resample: some class was not drawn
        samples.append(scalars(rows))
    used = len(samples)
    if used < n_boot:
        warnings.warn(f"{n_boot - used} of {n_boot} bootstrap resamples lacked a class and were skipped",
                      stacklevel=2)
    result: dict[str, tuple[float, float, float]] = {}
    for name, value in estimate.items():
        boot = np.array([sample[name] for sample in samples], dtype=np.float64)
        if used and np.isfinite(boot).any():
            low, high = np.nanpercentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        else:
            low = high = float("nan")
        result[name] = (float(value), float(low), float(high))
    return MetricsCI(result, used, n_boot)


def ci_table(results: dict[str, tuple[float, float, float]], digits: int = 3) -> pd.DataFrame:
    """``metrics_with_ci`` output as a table: one row per metric, ``estimate, low, high, text``."""
    rows = [{"metric": name, "estimate": est, "low": low, "high": high,
             "text": f"{est:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"}
            for name, (est, low, high) in results.items()]
    return pd.DataFrame(rows).set_index("metric")


# Fast exact metrics for the bootstrap loop (sklearn's input checks cost ~1 ms per call).


def rank_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative) + 0.5 P(tie), by mid-ranks."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    """sklearn's average precision: sum over distinct thresholds of (R_k - R_(k-1)) * P_k."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-score, kind="mergesort")
    score_sorted, hits = score[order], positive[order].astype(np.float64)
    last_of_tie = np.r_[np.flatnonzero(np.diff(score_sorted)), len(score_sorted) - 1]
    true_pos = np.cumsum(hits)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0.0, true_pos]) / n_pos
    return float(np.sum(recall_gain * precision))


def _binary_scalars(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """The :data:`BINARY_METRICS` of :func:`binary_metrics`, in NumPy."""
    positive = y == 1
    called = score >= threshold
    tp, fp = int(np.sum(called & positive)), int(np.sum(called & ~positive))
    fn, tn = int(np.sum(~called & positive)), int(np.sum(~called & ~positive))
    both = 0 < tp + fn < len(y)
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "auc_roc": rank_auc(positive, score),
        "pr_auc": _average_precision(positive, score),
        "sensitivity": sensitivity, "specificity": specificity,
        "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (sensitivity + specificity) / 2 if both else float("nan"),
        "accuracy": _ratio(tp + tn, len(y)),
    }


def _multiclass_scalars(y: np.ndarray, prob: np.ndarray, class_names: Sequence[str] | None) -> dict[str, float]:
    """The scalar entries of :func:`multiclass_metrics`, in NumPy."""
    num_classes = prob.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    pred = prob.argmax(axis=1)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    hits = np.bincount(y[pred == y], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(counts > 0, hits / counts, np.nan)
    aucs = [rank_auc(y == c, prob[:, c]) for c in range(num_classes)]
    result = {"macro_auc": float(np.mean(aucs)) if num_classes > 2 else aucs[1]}
    for index, name in enumerate(names):
        result[f"auc_{name}"] = aucs[index]
        result[f"sensitivity_{name}"] = float(recall[index])
    result["balanced_accuracy"] = float(np.nanmean(recall)) if (counts > 0).any() else float("nan")
    result["accuracy"] = float(np.mean(pred == y)) if len(y) else float("nan")
    return result


# --------------------------------------------------------------------------- calibration and curves


def _confidence_and_outcome(y: np.ndarray, prob: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Binary: (positive score, y == 1). Multiclass: (top-class probability, prediction correct)."""
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] > 2:
        return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    return positive_scores(p), (y == 1).astype(np.float64)


def reliability_curve(y_true: npt.ArrayLike, prob: npt.ArrayLike, n_bins: int = 10) -> pd.DataFrame:
    """Reliability diagram data over ``n_bins`` equal-width probability bins on [0, 1].

    Binary: positive-class probability vs the observed positive fraction. Multiclass
    ``(N, C)``: top-class confidence vs accuracy. Returns one row per bin with columns
    ``bin_low, bin_high, mean_predicted, fraction_positive, count`` (empty bins have
    count 0 and NaN means). The last bin includes 1.0.
    """
    y = _labels(y_true)
    score, outcome = _confidence_and_outcome(y, prob)
    _check_lengths(y, score)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(score, edges[1:-1], right=False), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(bins, weights=score, minlength=n_bins) / count
        fraction = np.bincount(bins, weights=outcome, minlength=n_bins) / count
    return pd.DataFrame({"bin_low": edges[:-1], "bin_high": edges[1:], "mean_predicted": mean_predicted,
                         "fraction_positive": fraction, "count": count})


def expected_calibration_error(y_true: npt.ArrayLike, prob: npt.ArrayLike, n_bins: int = 10) -> float:
    """ECE = sum over bins of ``count / N * |fraction_positive - mean_predicted|`` (0 = calibrated)."""
    curve = reliability_curve(y_true, prob, n_bins)
    filled = curve[curve["count"] > 0]
    if filled.empty:
        return float("nan")
    weights = filled["count"] / filled["count"].sum()
    return float((weights * (filled["fraction_positive"] - filled["mean_predicted"]).abs()).sum())


def roc_pr_curves(y_true: npt.ArrayLike, prob: npt.ArrayLike) -> dict[str, object]:
    """Curves for plotting a binary classifier.

    Returns ``{"roc": DataFrame(fpr, tpr, threshold), "pr": DataFrame(recall, precision,
    threshold), "auc_roc": float, "pr_auc": float, "prevalence": float}``; the
    prevalence is the PR curve of a classifier that guesses.
    """
    y = _labels(y_true)
    p = positive_scores(prob)
    _check_lengths(y, p)
    fpr, tpr, roc_thresholds = skm.roc_curve(y, p)
    precision, recall, pr_thresholds = skm.precision_recall_curve(y, p)
    return {
        "roc": pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": roc_thresholds}),
        # precision_recall_curve gives one threshold fewer than points (the last point has none).
        "pr": pd.DataFrame({"recall": recall, "precision": precision,
                            "threshold": np.append(pr_thresholds, np.nan)}),
        "auc_roc": float(skm.roc_auc_score(y, p)),
        "pr_auc": float(skm.average_precision_score(y, p)),
        "prevalence": float(np.mean(y == 1)),
    }
