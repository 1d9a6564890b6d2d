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
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from cxrlib.evaluate.claims import Claim, difference_claim
from cxrlib.evaluate.stats import seed_patient_resamples

#: Columns that name one trained model, in order (those present are used).
MODEL_KEYS: tuple[str, ...] = ("task", "arch", "condition", "imbalance", "control", "input_mode", "seed")
#: The internal test split's name in the ``evaluation_set`` column.
INTERNAL = "internal"
#: The class every task is about.
POSITIVE = "covid"
#: The ``view`` value of rows that pool every view.
ALL_VIEWS = "all"


#: Metrics these functions compute, at each model's validation threshold (NaN when undefined).
METRICS: tuple[str, ...] = ("auc", "sensitivity", "specificity")


def _check(predictions: pd.DataFrame, metrics: Sequence[str]) -> None:
    missing = [c for c in ("evaluation_set", "image_id", "patient_id", "label", "score", "called")
               if c not in predictions.columns]
    if missing:
        raise ValueError(f"prediction table lacks column(s) {missing}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")


def weighted_metrics(is_positive: np.ndarray, score: np.ndarray, called: np.ndarray,
                     weights: np.ndarray) -> dict[str, np.ndarray]:
    """AUC, sensitivity and specificity of ``S`` models under ``B`` weightings of ``I`` images.

    ``is_positive``: ``(I,)`` bool; ``score``: ``(S, I)`` float; ``called``: ``(S, I)`` bool;
    ``weights``: ``(B, I)`` non-negative (a bootstrap resample as how often each image was
    drawn; ones for the sample itself). Returns ``metric -> (B, S)`` float64, NaN where a
    class has no weight. The AUC is the Mann-Whitney statistic with ties counted one half,
    on the sample the weights describe (equal to the rank AUC of the expanded sample).
    """
    pos = np.asarray(is_positive, dtype=bool)
    weights = np.asarray(weights, dtype=np.float64)
    w_pos, w_neg = weights * pos, weights * ~pos
    n_pos, n_neg = w_pos.sum(axis=1), w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = (w_pos @ np.asarray(called, dtype=np.float64).T) / n_pos[:, None]
        specificity = (w_neg @ (~np.asarray(called, dtype=bool)).astype(np.float64).T) / n_neg[:, None]
        auc = np.empty((weights.shape[0], score.shape[0]))
        for s, model_score in enumerate(np.asarray(score, dtype=np.float64)):
            order = np.argsort(model_score, kind="mergesort")
            ordered = model_score[order]
            new_group = np.r_[True, ordered[1:] != ordered[:-1]]
            group = np.cumsum(new_group) - 1
            starts = np.flatnonzero(new_group)
            ends = np.r_[starts[1:], len(ordered)]
            cumulative = np.cumsum(w_neg[:, order], axis=1)
            before = np.where(starts > 0, cumulative[:, np.maximum(starts - 1, 0)], 0.0)  # (B, G)
            tied = cumulative[:, ends - 1] - before
            wins = (w_pos[:, order] * (before[:, group] + 0.5 * tied[:, group])).sum(axis=1)
            auc[:, s] = wins / (n_pos * n_neg)
    return {"auc": auc, "sensitivity": sensitivity, "specificity": specificity}


def _draw_weights(rows: Iterable[np.ndarray], n_values: int) -> np.ndarray:
    return np.stack([np.bincount(r, minlength=n_values) for r in rows]).astype(np.float64) \
        if n_values else np.zeros((0, 0))


_WEIGHTS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _patient_weights(groups: np.ndarray, n_boot: int, seed: int, n_seeds: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Seed counts ``(B, S)`` and image weights ``(B, I)`` of :func:`seed_patient_resamples`
    (with one seed: :func:`bootstrap_indices`), remembered for the last few image sets."""
    key = (n_seeds, n_boot, seed, tuple(groups))
    if key not in _WEIGHTS:
        draws, rows = [], []
        for draw, sample in seed_patient_resamples(n_seeds, len(groups), n_boot=n_boot, seed=seed, groups=groups):
            draws.append(np.bincount(draw, minlength=n_seeds))
            rows.append(sample)
        if len(_WEIGHTS) > 32:
            _WEIGHTS.clear()
        _WEIGHTS[key] = (np.asarray(draws, dtype=np.float64).reshape(n_boot, n_seeds),
                         _draw_weights(rows, len(groups)))
    return _WEIGHTS[key]


def _interval(samples: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    values = np.asarray(samples, dtype=np.float64)
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


def _per_seed(part: pd.DataFrame, positive: str) -> tuple[list, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One set's predictions as ``(seeds, is_positive (I,), groups (I,), score (S, I), called (S, I))``,
    images aligned across seeds (images some seed did not predict are left out)."""
    part = part.assign(_seed=part["seed"] if "seed" in part.columns else 0,
                       _called=part["called"].astype(bool).astype(float))
    score = part.pivot_table(index="_seed", columns="image_id", values="score", aggfunc="first")
    called = part.pivot_table(index="_seed", columns="image_id", values="_called", aggfunc="first")
    complete = score.columns[score.notna().all(axis=0)]
    reference = part.drop_duplicates("image_id").set_index("image_id").loc[complete]
    return (list(score.index), (reference["label"].astype(str) == positive).to_numpy(),
            reference["patient_id"].astype(str).to_numpy(), score[complete].to_numpy(dtype=np.float64),
            called[complete].to_numpy() > 0.5)


def _seed_mean(values: np.ndarray, seed_counts: np.ndarray) -> np.ndarray:
    """``(B, S)`` per-seed values averaged with ``(B, S)`` draw counts, NaN values left out."""
    finite = np.isfinite(values)
    weights = seed_counts * finite
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(finite, values, 0.0) * weights).sum(axis=1) / weights.sum(axis=1)


def score_models(
    predictions: pd.DataFrame,
    metrics: Sequence[str] = METRICS,
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
    batch = [k for k in ("task",) if k in keys]  # models of one task see the same images
    rows = []
    for _, part in predictions.groupby([*batch, "evaluation_set"], sort=False):
        name = part["evaluation_set"].iloc[0]
        model_id = part[keys].astype(str).agg("\x1f".join, axis=1) if keys else pd.Series("", index=part.index)
        key_of = dict(zip(model_id, part[keys].to_dict("records"), strict=True))
        for view, subset in _views(part, by_view):
            table = subset.assign(_model=model_id.loc[subset.index], _called=subset["called"].astype(float))
            score = table.pivot_table(index="_model", columns="image_id", values="score", aggfunc="first")
            called = table.pivot_table(index="_model", columns="image_id", values="_called", aggfunc="first")
            reference = table.drop_duplicates("image_id").set_index("image_id").loc[score.columns]
            pos = (reference["label"].astype(str) == positive).to_numpy()
            groups = reference["patient_id"].astype(str).to_numpy()
            _, weights = _patient_weights(groups, n_boot, seed)
            score_matrix = score.to_numpy(dtype=np.float64)
            called_matrix = called.to_numpy() > 0.5
            complete = np.isfinite(score_matrix).all(axis=1)  # models that predicted every image: one batch
            batch_boot = weighted_metrics(pos, score_matrix[complete], called_matrix[complete], weights)
            batch_point = weighted_metrics(pos, score_matrix[complete], called_matrix[complete], np.ones((1, len(pos))))
            position = np.cumsum(complete) - 1
            for m_index, model in enumerate(score.index):
                has = np.isfinite(score_matrix[m_index])  # the images this model predicted
                if complete[m_index]:
                    column = slice(position[m_index], position[m_index] + 1)
                    boot = {m: v[:, column] for m, v in batch_boot.items()}
                    point = {m: v[:, column] for m, v in batch_point.items()}
                else:
                    one = (score_matrix[m_index:m_index + 1, has], called_matrix[m_index:m_index + 1, has])
                    boot = weighted_metrics(pos[has], *one, _patient_weights(groups[has], n_boot, seed)[1])
                    point = weighted_metrics(pos[has], *one, np.ones((1, int(has.sum()))))
                row = {**key_of[model], "evaluation_set": name, "view": view, "n": int(has.sum()),
                       "n_pos": int(pos[has].sum()), "n_patients": int(len(set(groups[has])))}
                for m in metrics:
                    low, high = _interval(boot[m][:, 0])
                    row.update({m: float(point[m][0, 0]), f"{m}_low": low, f"{m}_high": high})
                rows.append(row)
    return pd.DataFrame(rows)


def summarize_sets(
    predictions: pd.DataFrame,
    metrics: Sequence[str] = METRICS,
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
            seed_counts, weights = _patient_weights(groups, n_boot, seed, len(seeds))
            boot = weighted_metrics(pos, score, called, weights)
            point = weighted_metrics(pos, score, called, np.ones((1, len(pos))))
            base = {**dict(zip([*group_by, "evaluation_set"], key, strict=True)), "view": view,
                    "n": int(len(pos)), "n_pos": int(pos.sum()), "n_patients": int(len(set(groups)))}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                for m in metrics:
                    per_seed = point[m][0]
                    low, high = _interval(_seed_mean(boot[m], seed_counts))
                    rows.append({**base, "metric": m, "estimate": float(np.nanmean(per_seed)), "low": low,
                                 "high": high, "n_seeds": len(seeds), "seed_min": float(np.nanmin(per_seed)),
                                 "seed_max": float(np.nanmax(per_seed))})
    return pd.DataFrame(rows)


def internal_minus_external(
    predictions: pd.DataFrame,
    metrics: Sequence[str] = METRICS,
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
    ``external`` set and ``metric``: ``internal``, ``external_estimate`` (seed-means),
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
            seed_counts, i_weights = _patient_weights(inner[2], n_boot, seed, len(common))
            _, e_weights = _patient_weights(outer[2], n_boot, seed + 7919)
            i_boot = weighted_metrics(inner[1], inner[3][a], inner[4][a], i_weights)
            e_boot = weighted_metrics(outer[1], outer[3][b], outer[4][b], e_weights)
            i_point = weighted_metrics(inner[1], inner[3][a], inner[4][a], np.ones((1, len(inner[1]))))
            e_point = weighted_metrics(outer[1], outer[3][b], outer[4][b], np.ones((1, len(outer[1]))))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                for m in metrics:
                    i_est, e_est = float(np.nanmean(i_point[m][0])), float(np.nanmean(e_point[m][0]))
                    low, high = _interval(_seed_mean(i_boot[m], seed_counts) - _seed_mean(e_boot[m], seed_counts))
                    rows.append({**dict(zip(group_by, key, strict=True)), "external": name, "metric": m,
                                 "internal": i_est, "external_estimate": e_est, "difference": i_est - e_est,
                                 "low": low, "high": high, "n_seeds": len(common),
                                 "shown": bool(np.isfinite(low) and (low > 0 or high < 0))})
    return pd.DataFrame(rows)


def drop_claim(row) -> Claim:
    """The claim of one :func:`internal_minus_external` row (a mapping with ``task``, ``arch``,
    ``imbalance``, ``condition``, ``metric``, ``external``, ``difference``, ``low``, ``high``):
    "drops externally" only when the interval excludes zero."""
    return difference_claim(f"{row['task']} {row['arch']} {row['imbalance']} {row['condition']}, "
                            f"{row['metric']}: internal minus {row['external']}", row.get("difference"),
                            row.get("low"), row.get("high"), up="drops externally", down="higher externally")


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


def wide_table(summary: pd.DataFrame, floor: pd.DataFrame | None = None, *,
               group_by: Sequence[str] = ("task", "arch", "condition", "imbalance")) -> pd.DataFrame:
    """:func:`summarize_sets` output (pooled views only) as one row per group and evaluation set.

    Columns: the groups, ``evaluation_set``, ``n``, ``n_patients``, and per metric
    ``<metric>``, ``<metric>_low``, ``<metric>_high``; with a ``floor``
    (:func:`cxrlib.evaluate.shortcut.shortcut_floor` output) also ``floor_auc`` and
    ``floor_sensitivity`` with their bounds and ``versus_floor``
    (:func:`cxrlib.evaluate.shortcut.against_floor`: on AUC, or on sensitivity where a
    cohort of positives only has no AUC). The table
    for ``results.csv``-style reports and the README's internal / external / floor table.
    """
    from cxrlib.evaluate.shortcut import against_floor

    pooled = summary[summary["view"].astype(str) == ALL_VIEWS] if "view" in summary.columns else summary
    keys = [c for c in (*group_by, "evaluation_set") if c in pooled.columns]
    values = pooled.pivot_table(index=keys, columns="metric", values=["estimate", "low", "high"],
                                aggfunc="first", dropna=False)
    out = pd.DataFrame(index=values.index)
    for metric in [m for m in METRICS if m in set(pooled["metric"])]:
        out[metric] = values[("estimate", metric)]
        out[f"{metric}_low"] = values[("low", metric)]
        out[f"{metric}_high"] = values[("high", metric)]
    counts = pooled.drop_duplicates(keys).set_index(keys)[["n", "n_patients"]]
    out = counts.join(out).reset_index()
    if floor is not None:
        out = against_floor(out, floor)
        if {"sensitivity", "sensitivity_low"} <= set(out.columns) and "sensitivity" in floor.columns:
            # a cohort of positives only has no AUC: there the floor is read on sensitivity
            by_sensitivity = against_floor(out.drop(columns=["beats_floor", "versus_floor"]), floor,
                                           metric="sensitivity")
            for column in ("floor_sensitivity", "floor_sensitivity_low", "floor_sensitivity_high"):
                out[column] = by_sensitivity[column].to_numpy()
            no_auc = (out["auc"].isna() if "auc" in out.columns else pd.Series(True, index=out.index)).to_numpy()
            for column in ("beats_floor", "versus_floor"):
                out.loc[no_auc, column] = by_sensitivity.loc[no_auc, column].to_numpy()
    return out
