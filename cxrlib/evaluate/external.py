"""Scoring classifiers on every evaluation set: the internal test split and external cohorts.

The input is a long prediction table, one row per model and image, as notebook 04 writes it
(:func:`cxrlib.stages.classifiers.predictions_frame` / ``read_predictions``) with an
``evaluation_set`` column added (``internal`` for the test split; an external cohort's
name for its images, :func:`cxrlib.stages.external.predict_cells`): the model keys
(:data:`MODEL_KEYS` that are present: ``task, arch, condition, imbalance, seed``),
``image_id, patient_id, label, score, called`` (``score >= threshold``, the model's
*validation* threshold: no threshold is ever chosen on an evaluation set) and, where known,
``view``.

- :func:`score_models`: each model (seed) on each set, AUC / sensitivity / specificity with
  95 % intervals over patients; per view where a ``view`` column exists.
- :func:`summarize_sets`: the seed-mean of each metric per condition and set, with the
  two-level interval (seeds, then patients; :func:`cxrlib.evaluate.stats.seed_patient_resamples`).
- :func:`internal_minus_external`: the drop from the internal test split to each external
  cohort, paired by seed, with an interval that resamples seeds and the patients of both sets.

A set of positives only (an external COVID-19 collection) has no AUC and no specificity: those
are NaN and only the sensitivity is reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from cxrlib.evaluate.stats import bootstrap_indices, seed_patient_resamples

#: Columns that name one trained model, in order (those present are used).
MODEL_KEYS: tuple[str, ...] = ("task", "arch", "condition", "imbalance", "control", "input_mode", "seed")
#: The internal test split's name in the ``evaluation_set`` column.
INTERNAL = "internal"
#: The class every task is about.
POSITIVE = "covid"
#: The ``view`` value of rows that pool every view.
ALL_VIEWS = "all"


def _rank_auc(positive: np.ndarray, score: np.ndarray) -> float:
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _rate(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


#: ``metric -> f(is_positive bool, score float, called bool) -> float`` (NaN when undefined).
METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "auc": lambda pos, score, called: _rank_auc(pos, score),
    "sensitivity": lambda pos, score, called: _rate(called[pos]),
    "specificity": lambda pos, score, called: _rate(~called[~pos]),
}


def _check(predictions: pd.DataFrame, metrics: Sequence[str]) -> None:
    missing = [c for c in ("evaluation_set", "image_id", "patient_id", "label", "score", "called")
               if c not in predictions.columns]
    if missing:
        raise ValueError(f"prediction table lacks column(s) {missing}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(METRICS)}")


def _interval(samples: Iterable[float], alpha: float = 0.05) -> tuple[float, float]:
    values = np.asarray(list(samples), dtype=np.float64)
    if not np.isfinite(values).any():
        return float("nan"), float("nan")
    low, high = np.nanpercentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _views(part: pd.DataFrame, by_view: bool) -> list[tuple[str, pd.DataFrame]]:
    """``[("all", part)]`` plus one entry per known view when ``by_view`` and a ``view`` column exist."""
    out = [(ALL_VIEWS, part)]
    if by_view and "view" in part.columns:
        views = part["view"].fillna("").astype(str)
        out += [(view, part[views == view]) for view in sorted(set(views) - {""})]
    return out


def _arrays(part: pd.DataFrame, positive: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return ((part["label"].astype(str) == positive).to_numpy(), part["score"].to_numpy(dtype=np.float64),
            part["called"].astype(bool).to_numpy(), part["patient_id"].astype(str).to_numpy())


def score_models(
    predictions: pd.DataFrame,
    metrics: Sequence[str] = ("auc", "sensitivity", "specificity"),
    *,
    by_view: bool = True,
    positive: str = POSITIVE,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Each model on each evaluation set (and view), with 95 % intervals over patients.

    One row per model (:data:`MODEL_KEYS` present), ``evaluation_set`` and ``view``
    (``"all"``, then each known view when ``by_view``): ``n, n_pos, n_patients`` and per
    metric ``<metric>, <metric>_low, <metric>_high`` at the model's validation threshold
    (the ``called`` column). Every model of a set is scored on the same patient resamples.
    """
    _check(predictions, metrics)
    keys = [k for k in MODEL_KEYS if k in predictions.columns]
    rows = []
    for (*key, name), part in predictions.groupby([*keys, "evaluation_set"], sort=False):
        for view, subset in _views(part, by_view):
            pos, score, called, groups = _arrays(subset, positive)
            row = {**dict(zip(keys, key, strict=True)), "evaluation_set": name, "view": view,
                   "n": int(len(pos)), "n_pos": int(pos.sum()), "n_patients": int(len(set(groups)))}
            boot = {m: [] for m in metrics}
            for draw in bootstrap_indices(len(pos), n_boot=n_boot, seed=seed, groups=groups):
                for m in metrics:
                    boot[m].append(METRICS[m](pos[draw], score[draw], called[draw]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                for m in metrics:
                    low, high = _interval(boot[m])
                    row.update({m: METRICS[m](pos, score, called), f"{m}_low": low, f"{m}_high": high})
            rows.append(row)
    return pd.DataFrame(rows)


def _per_seed(part: pd.DataFrame, positive: str) -> tuple[list, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One set's predictions as ``(seeds, is_positive (I,), groups (I,), score (S, I), called (S, I))``,
    images aligned across seeds (images some seed did not predict are left out)."""
    seed_column = "seed" if "seed" in part.columns else None
    part = part.assign(_seed=part[seed_column] if seed_column else 0)
    score = part.pivot_table(index="_seed", columns="image_id", values="score", aggfunc="first")
    called = part.pivot_table(index="_seed", columns="image_id", values="called", aggfunc="first")
    complete = score.columns[score.notna().all(axis=0)]
    reference = part.drop_duplicates("image_id").set_index("image_id").loc[complete]
    return (list(score.index), (reference["label"].astype(str) == positive).to_numpy(),
            reference["patient_id"].astype(str).to_numpy(), score[complete].to_numpy(dtype=np.float64),
            called[complete].to_numpy().astype(bool))


def _seed_values(metric: str, pos: np.ndarray, score: np.ndarray, called: np.ndarray,
                 rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    return np.array([METRICS[metric](pos[rows], s[rows], c[rows]) for s, c in zip(score, called, strict=True)])


def summarize_sets(
    predictions: pd.DataFrame,
    metrics: Sequence[str] = ("auc", "sensitivity", "specificity"),
    *,
    group_by: Sequence[str] = ("task", "arch", "condition", "imbalance"),
    by_view: bool = True,
    positive: str = POSITIVE,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """The seed-mean of each metric per group, evaluation set and view, with a two-level interval.

    Long format, one row per ``group_by`` group (those present), ``evaluation_set``,
    ``view`` and ``metric``: ``estimate`` (mean over seeds of each seed's metric at its own
    validation threshold), ``low`` / ``high`` (95 % interval over resamples of seeds and
    then patients), ``n_seeds``, ``seed_min``, ``seed_max`` (spread between training runs),
    ``n``, ``n_pos``, ``n_patients``. The format of
    :func:`cxrlib.stages.classifiers.summarize_over_seeds` plus the set and view columns,
    so :func:`cxrlib.evaluate.shortcut.against_floor` reads it (``estimate="estimate"``).
    """
    _check(predictions, metrics)
    group_by = [c for c in group_by if c in predictions.columns]
    rows = []
    for key, part in predictions.groupby([*group_by, "evaluation_set"], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for view, subset in _views(part, by_view):
            seeds, pos, groups, score, called = _per_seed(subset, positive)
            base = {**dict(zip([*group_by, "evaluation_set"], key, strict=True)), "view": view,
                    "n": int(len(pos)), "n_pos": int(pos.sum()), "n_patients": int(len(set(groups)))}
            boot = {m: [] for m in metrics}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                for draw, sample in seed_patient_resamples(len(seeds), len(pos), n_boot=n_boot, seed=seed,
                                                           groups=groups):
                    for m in metrics:
                        boot[m].append(np.nanmean(_seed_values(m, pos, score[draw], called[draw], sample)))
                for m in metrics:
                    per_seed = _seed_values(m, pos, score, called)
                    low, high = _interval(boot[m])
                    rows.append({**base, "metric": m, "estimate": float(np.nanmean(per_seed)), "low": low,
                                 "high": high, "n_seeds": len(seeds), "seed_min": float(np.nanmin(per_seed)),
                                 "seed_max": float(np.nanmax(per_seed))})
    return pd.DataFrame(rows)


def internal_minus_external(
    predictions: pd.DataFrame,
    metrics: Sequence[str] = ("auc", "sensitivity", "specificity"),
    *,
    internal: str = INTERNAL,
    group_by: Sequence[str] = ("task", "arch", "condition", "imbalance"),
    positive: str = POSITIVE,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Internal minus external seed-mean of each metric, per group and external set.

    Each replicate draws the seeds once (the same models on both sets: paired by seed),
    then the internal set's patients and, independently, the external set's patients
    (different people), and takes the difference of the two seed-means. One row per group,
    ``external`` set and ``metric``: ``internal``, ``external`` (seed-means),
    ``difference`` with ``low`` / ``high`` (95 %), ``n_seeds`` and ``shown``: whether the
    interval excludes zero (a drop is claimed only then). A metric undefined on a set (AUC
    or specificity of a positives-only cohort) gives NaN.
    """
    _check(predictions, metrics)
    group_by = [c for c in group_by if c in predictions.columns]
    rows = []
    grouped = predictions.groupby(group_by, sort=False) if group_by else [((), predictions)]
    for key, part in grouped:
        key = key if isinstance(key, tuple) else (key,)
        sets = part["evaluation_set"].astype(str)
        if internal not in set(sets):
            continue
        inner = _per_seed(part[sets == internal], positive)
        for name in [s for s in dict.fromkeys(sets) if s != internal]:
            outer = _per_seed(part[sets == name], positive)
            common = [s for s in inner[0] if s in outer[0]]
            if not common:
                continue
            a = [inner[0].index(s) for s in common]
            b = [outer[0].index(s) for s in common]
            i_pos, i_groups, i_score, i_called = inner[1], inner[2], inner[3][a], inner[4][a]
            e_pos, e_groups, e_score, e_called = outer[1], outer[2], outer[3][b], outer[4][b]
            external_rows = bootstrap_indices(len(e_pos), n_boot=n_boot, seed=seed + 7919, groups=e_groups)
            boot = {m: [] for m in metrics}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                for (draw, i_rows), e_rows in zip(
                        seed_patient_resamples(len(common), len(i_pos), n_boot=n_boot, seed=seed, groups=i_groups),
                        external_rows, strict=True):
                    for m in metrics:
                        i_value = np.nanmean(_seed_values(m, i_pos, i_score[draw], i_called[draw], i_rows))
                        e_value = np.nanmean(_seed_values(m, e_pos, e_score[draw], e_called[draw], e_rows))
                        boot[m].append(i_value - e_value)
                for m in metrics:
                    i_est = float(np.nanmean(_seed_values(m, i_pos, i_score, i_called)))
                    e_est = float(np.nanmean(_seed_values(m, e_pos, e_score, e_called)))
                    low, high = _interval(boot[m])
                    rows.append({**dict(zip(group_by, key, strict=True)), "external": name, "metric": m,
                                 "internal": i_est, "external_estimate": e_est, "difference": i_est - e_est,
                                 "low": low, "high": high, "n_seeds": len(common),
                                 "shown": bool(np.isfinite(low) and (low > 0 or high < 0))})
    return pd.DataFrame(rows)


def with_columns(predictions: pd.DataFrame, manifests: Iterable[pd.DataFrame],
                 columns: Sequence[str] = ("view",)) -> pd.DataFrame:
    """``predictions`` with ``columns`` (e.g. ``view``) looked up by ``image_id`` in the
    manifests (the first manifest that has an image wins); missing values are ``""``.
    Notebook 04's internal predictions carry no view; this adds it from the manifest."""
    lookup = pd.concat([m[["image_id", *[c for c in columns if c in m.columns]]] for m in manifests],
                       ignore_index=True).drop_duplicates("image_id")
    out = predictions.drop(columns=[c for c in columns if c in predictions.columns])
    out = out.merge(lookup.astype({"image_id": str}), on="image_id", how="left")
    for column in columns:
        out[column] = out[column].fillna("").astype(str) if column in out.columns else ""
    return out
