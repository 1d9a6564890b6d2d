"""Summaries over training seeds: seed-means of test metrics with two-level bootstrap intervals
(training seeds, then test patients), and intervals as text for display."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cxrlib.evaluate.classification import rank_auc
from cxrlib.evaluate.stats import seed_patient_resamples, widened
from cxrlib.stages.classifiers.design import POSITIVE


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


#: Seed-pooled metrics: ``f(is_positive bool, score, called bool) -> float``.
SEED_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "sensitivity": lambda pos, score, called: _mean(called[pos]),
    "specificity": lambda pos, score, called: _mean(~called[~pos]),
    "auc": lambda pos, score, called: rank_auc(pos, score),
    "balanced_accuracy": lambda pos, score, called: (_mean(called[pos]) + _mean(~called[~pos])) / 2,
    "ppv": lambda pos, score, called: _mean(pos[called]),
}


#: How the intervals of :func:`summarize_over_seeds` and ``compare_conditions`` are formed.
INTERVAL_METHOD = ("95% percentile interval of the seed-mean over bootstrap replicates that draw the training seeds "
                   "with replacement and then the test patients (two levels; differences paired by seed and patient), "
                   "widened where needed to contain the Student-t interval of the per-seed values (a bootstrap over a "
                   "few seeds alone is too narrow)")


def seed_pooled(predictions: pd.DataFrame, group_by: Sequence[str], metrics: Sequence[str], n_boot: int,
                 seed: int) -> dict[tuple, dict[str, Any]]:
    """Per group: per-seed estimates and the bootstrap distribution of the seed-mean, per metric.

    Each replicate draws the task's training seeds with replacement and then its test
    patients (:func:`cxrlib.evaluate.stats.seed_patient_resamples`), so the distribution
    covers a rerun with other training runs as well as another test sample. All groups of
    one task share the replicates: two conditions are compared on the same seeds (the same
    real minority patients, weights and batches) and the same patients.
    """
    unknown = [m for m in metrics if m not in SEED_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {sorted(SEED_METRICS)}")
    out: dict[tuple, dict[str, Any]] = {}
    for task, task_rows in predictions.groupby("task", sort=False):
        ids = sorted(task_rows["image_id"].unique())
        reference = task_rows.drop_duplicates("image_id").set_index("image_id").loc[ids]
        is_positive = (reference["label"] == POSITIVE).to_numpy()
        groups = reference["patient_id"].to_numpy()
        models = []  # (group key, seed, score, called) aligned to ids
        for group_key, group_rows in task_rows.groupby(list(group_by), sort=False):
            group_key = group_key if isinstance(group_key, tuple) else (group_key,)
            for model_seed, seed_rows in group_rows.groupby("seed", sort=True):
                seed_rows = seed_rows.set_index("image_id")
                if set(seed_rows.index) != set(ids):
                    raise ValueError(f"task {task}: cells were tested on different images")
                seed_rows = seed_rows.loc[ids]
                models.append((group_key, int(model_seed), seed_rows["score"].to_numpy(),
                               seed_rows["called"].astype(bool).to_numpy()))
        estimates = {(g, s): {m: SEED_METRICS[m](is_positive, score, called) for m in metrics}
                     for g, s, score, called in models}
        task_seeds = sorted({s for _, s, *_ in models})
        position = {s: k for k, s in enumerate(task_seeds)}
        boot: dict[tuple, dict[str, list[float]]] = {}
        for draw, rows in seed_patient_resamples(len(task_seeds), len(ids), n_boot=n_boot, seed=seed, groups=groups):
            pos = is_positive[rows]
            if pos.all() or not pos.any():
                continue
            weight = np.bincount(draw, minlength=len(task_seeds))  # how often each seed was drawn
            per_group: dict[tuple, dict[str, list[tuple[float, int]]]] = {}
            for g, model_seed, score, called in models:
                count = int(weight[position[model_seed]])
                if not count:
                    continue
                values = per_group.setdefault(g, {m: [] for m in metrics})
                for m in metrics:
                    values[m].append((SEED_METRICS[m](pos, score[rows], called[rows]), count))
            for g in dict.fromkeys(key for key, *_ in models):
                target = boot.setdefault(g, {m: [] for m in metrics})
                for m in metrics:
                    pairs = [(v, c) for v, c in per_group.get(g, {}).get(m, []) if np.isfinite(v)]
                    target[m].append(float(np.average([v for v, _ in pairs], weights=[c for _, c in pairs]))
                                     if pairs else float("nan"))
        for g in dict.fromkeys(key for key, *_ in models):
            seeds = sorted(s for key, s, *_ in models if key == g)
            out[(task, *g)] = {
                "seeds": seeds,
                "per_seed": {m: [estimates[(g, s)][m] for s in seeds] for m in metrics},
                "boot": {m: np.asarray(boot.get(g, {}).get(m, []), dtype=np.float64) for m in metrics},
            }
    return out


def percentile_interval(samples: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The 95 % percentile interval of the finite ``samples`` (``nan`` bounds when there are none)."""
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def summarize_over_seeds(predictions: pd.DataFrame, metrics: Sequence[str] = ("sensitivity", "specificity", "auc"),
                         *, group_by: Sequence[str] = ("arch", "condition", "imbalance"), n_boot: int = 1000,
                         seed: int = 0) -> pd.DataFrame:
    """Seed-mean of each metric per task and ``group_by`` group, with a two-level 95 % interval.

    ``predictions``: :func:`read_predictions` output (disease tasks: ``score``, ``called``).
    ``estimate``: the mean over seeds of each seed's test metric (at its own validation
    threshold). ``low`` / ``high``: percentiles of the same seed-mean over ``n_boot``
    replicates that resample training seeds and then test patients (:data:`INTERVAL_METHOD`;
    the same replicates for every group of a task). Also ``n_seeds``, ``seed_min`` /
    ``seed_max`` / ``seed_sd`` (spread between training runs).
    """
    pooled = seed_pooled(predictions, group_by, metrics, n_boot, seed)
    rows = []
    for key, entry in pooled.items():
        for metric in metrics:
            per_seed = np.asarray(entry["per_seed"][metric], dtype=np.float64)
            low, high = widened(percentile_interval(entry["boot"][metric]), per_seed)
            rows.append({"task": key[0], **dict(zip(group_by, key[1:], strict=True)), "metric": metric,
                         "estimate": float(np.nanmean(per_seed)), "low": low, "high": high,
                         "n_seeds": len(per_seed), "seed_min": float(np.nanmin(per_seed)),
                         "seed_max": float(np.nanmax(per_seed)),
                         "seed_sd": float(np.nanstd(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan")})
    return pd.DataFrame(rows)


def ci_text(frame: pd.DataFrame, metrics: Sequence[str], columns: Sequence[str] | None = None,
            digits: int = 2) -> pd.DataFrame:
    """``metrics`` columns as ``"est [low, high]"`` strings, their bound columns dropped (for display).

    ``columns``: the columns to keep, in order (default: all).
    """
    out = frame.copy() if columns is None else frame[list(columns) + [
        f"{m}_{side}" for m in metrics for side in ("low", "high") if f"{m}_{side}" in frame.columns]].copy()
    for metric in metrics:
        if metric in out.columns:
            out[metric] = [f"{e:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
                           for e, lo, hi in zip(out[metric], out[f"{metric}_low"], out[f"{metric}_high"], strict=True)]
    return out.drop(columns=[c for m in metrics for c in (f"{m}_low", f"{m}_high") if c in out.columns])
