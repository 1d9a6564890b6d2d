"""Segmentation metrics: Dice, IoU and the 95th-percentile Hausdorff distance, per image.

Per-image values are the unit of analysis: their mean with a bootstrap interval
(:func:`summarize_metrics`) says how well the model does and how sure we are of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from cxrlib.evaluate.stats import bootstrap_ci, seed_patient_resamples, widened

DEFAULT_LUNG_LABELS: Mapping[str, int] = {"left": 1, "right": 2}

# 4-connected erosion: boundary pixels are those with a background 4-neighbour.
_CROSS = ndimage.generate_binary_structure(2, 1)


def _pair(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred, dtype=bool), np.asarray(true, dtype=bool)
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and reference {true.shape} differ in shape")
    return pred, true


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice ``2|P & T| / (|P| + |T|)`` of two bool masks of one shape, in [0, 1]; 1.0 when both are empty."""
    pred, true = _pair(pred, true)
    total = int(pred.sum()) + int(true.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, true).sum()) / total


def iou(pred: np.ndarray, true: np.ndarray) -> float:
    """Intersection over union (Jaccard) of two bool masks, in [0, 1]; 1.0 when both are empty."""
    pred, true = _pair(pred, true)
    union = int(np.logical_or(pred, true).sum())
    return 1.0 if union == 0 else int(np.logical_and(pred, true).sum()) / union


def _boundary(mask: np.ndarray) -> np.ndarray:
    # Pixels on the image edge count as boundary (erosion treats outside as background).
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def hd95(pred: np.ndarray, true: np.ndarray, spacing: float | Sequence[float] = 1.0) -> float:
    """95th-percentile symmetric Hausdorff distance between two bool masks.

    Distances from every boundary pixel of ``pred`` to the nearest boundary pixel of
    ``true`` and vice versa are pooled and their 95th percentile taken (the MedPy
    definition), in pixels, or in the units of ``spacing`` (row, column pixel size).
    Both masks empty gives 0.0; exactly one empty gives NaN, since no distance exists;
    :func:`summarize_metrics` then leaves that image out of the hd95 mean, so report the
    count of such cases (or the Dice, which is 0 there) beside it.
    """
    pred, true = _pair(pred, true)
    pred_any, true_any = bool(pred.any()), bool(true.any())
    if not pred_any and not true_any:
        return 0.0
    if pred_any != true_any:
        return float("nan")
    pred_edge, true_edge = _boundary(pred), _boundary(true)
    to_true = ndimage.distance_transform_edt(~true_edge, sampling=spacing)[pred_edge]
    to_pred = ndimage.distance_transform_edt(~pred_edge, sampling=spacing)[true_edge]
    return float(np.percentile(np.concatenate([to_true, to_pred]), 95))


def per_image_metrics(
    pred_labels: np.ndarray | Sequence[np.ndarray],
    true_labels: np.ndarray | Sequence[np.ndarray],
    image_ids: Sequence[object] | None = None,
    lung_labels: Mapping[str, int] = DEFAULT_LUNG_LABELS,
) -> pd.DataFrame:
    """Dice, IoU and HD95 per image for each lung and for both lungs as one foreground.

    ``pred_labels`` / ``true_labels``: ``(N, H, W)`` integer label maps, or sequences of
    ``(H, W)`` maps (sizes may differ between images, not within a pair).
    ``image_ids``: N ids (default ``0..N-1``). ``lung_labels``: name -> label value.
    Returns one row per image with columns ``image_id``, then ``dice_<name>``,
    ``dice_lungs``, ``iou_<name>``, ``iou_lungs``, ``hd95_<name>``, ``hd95_lungs``
    (hd95 in pixels; NaN where exactly one of the two masks is empty).
    """
    if len(pred_labels) != len(true_labels):
        raise ValueError(f"{len(pred_labels)} predictions for {len(true_labels)} references")
    ids = list(range(len(pred_labels))) if image_ids is None else list(image_ids)
    if len(ids) != len(pred_labels):
        raise ValueError(f"{len(ids)} image ids for {len(pred_labels)} images")
    regions = dict(lung_labels)
    all_lung_values = list(regions.values())
    metrics = {"dice": dice, "iou": iou, "hd95": hd95}
    rows = []
    for image_id, pred, true in zip(ids, pred_labels, true_labels, strict=True):
        pred, true = np.asarray(pred), np.asarray(true)
        masks = {name: (pred == value, true == value) for name, value in regions.items()}
        masks["lungs"] = (np.isin(pred, all_lung_values), np.isin(true, all_lung_values))
        row: dict[str, object] = {"image_id": image_id}
        for metric_name, metric in metrics.items():
            for region, (pred_mask, true_mask) in masks.items():
                row[f"{metric_name}_{region}"] = metric(pred_mask, true_mask)
        rows.append(row)
    columns = ["image_id"] + [f"{m}_{r}" for m in metrics for r in [*regions, "lungs"]]
    return pd.DataFrame(rows, columns=columns)


def summarize_metrics(
    table: pd.DataFrame, seed: int = 0, groups: str | None = None, n_boot: int = 2000
) -> dict[str, object]:
    """Mean and bootstrap 95% CI of every metric column of :func:`per_image_metrics`.

    Returns ``{"n_images": N, "<metric>_mean": float, "<metric>_ci95": [low, high], ...}``
    (plain Python floats, ready for ``metrics.json``). NaN values are left out of a
    metric's mean and interval. ``groups`` names a column (e.g. ``"patient_id"``) whose
    groups are resampled whole, for test sets with several images per patient.
    """
    group_labels = table[groups].to_numpy() if groups is not None else None
    metric_columns = [
        column
        for column in table.columns
        if column not in ("image_id", groups) and pd.api.types.is_numeric_dtype(table[column])
    ]
    summary: dict[str, object] = {"n_images": int(len(table))}
    for column in metric_columns:
        estimate, low, high = bootstrap_ci(
            table[column].to_numpy(dtype=float), seed=seed, groups=group_labels, n_boot=n_boot
        )
        summary[f"{column}_mean"] = estimate
        summary[f"{column}_ci95"] = [low, high]
    return summary


# ----------------------------------------------------------------------------- lung conventions


def per_image_metrics_by_convention(
    pred_labels: Sequence[np.ndarray],
    true_labels: Sequence[np.ndarray],
    *,
    reference_conventions: Sequence[str],
    cardiomediastinum: Sequence[np.ndarray | None] | None = None,
    image_ids: Sequence[object] | None = None,
    lung_labels: Mapping[str, int] = DEFAULT_LUNG_LABELS,
) -> pd.DataFrame:
    """:func:`per_image_metrics` under every lung convention the reference allows, saying which.

    ``reference_conventions[i]``: ``"anatomical"`` or ``"visible"``, how the reference of
    image i draws the lungs (:func:`cxrlib.data.masks.lung_convention_of`). An anatomical
    reference with a ``cardiomediastinum[i]`` mask (``(H, W)`` bool) is scored twice:
    ``anatomical`` (prediction against the reference as drawn) and ``visible`` (the
    cardiomediastinum removed from both prediction and reference,
    :func:`cxrlib.data.masks.convert_lung_convention`). Any other reference is scored once,
    under its own convention. Returns the :func:`per_image_metrics` columns with a
    ``convention`` column after ``image_id`` (one row per image and convention).
    """
    from cxrlib.data.masks import convert_lung_convention

    count = len(pred_labels)
    if len(true_labels) != count or len(reference_conventions) != count:
        raise ValueError(f"{count} predictions, {len(true_labels)} references and "
                         f"{len(reference_conventions)} conventions")
    hearts = list(cardiomediastinum) if cardiomediastinum is not None else [None] * count
    if len(hearts) != count:
        raise ValueError(f"{len(hearts)} cardiomediastinum masks for {count} images")
    ids = list(range(count)) if image_ids is None else list(image_ids)
    tables = []
    for index, (pred, true, convention, heart) in enumerate(
            zip(pred_labels, true_labels, reference_conventions, hearts, strict=True)):
        pairs = {convention: (pred, true)}
        if convention == "anatomical" and heart is not None:
            pairs["visible"] = (convert_lung_convention(pred, "anatomical", "visible", heart),
                                convert_lung_convention(true, "anatomical", "visible", heart))
        for name, (p, t) in pairs.items():
            table = per_image_metrics([p], [t], image_ids=[ids[index]], lung_labels=lung_labels)
            table.insert(1, "convention", name)
            tables.append(table)
    return pd.concat(tables, ignore_index=True)


def summarize_by_convention(
    table: pd.DataFrame, seed: int = 0, groups: str | None = None, n_boot: int = 2000,
    worst_fraction: float = 0.1,
) -> dict[str, dict[str, object]]:
    """:func:`summarize_metrics` per convention of a :func:`per_image_metrics_by_convention` table.

    Returns ``{"anatomical": {...}, "visible": {...}}`` (only the conventions present), each
    also holding ``dice_lungs_worst_decile``: the mean Dice (both lungs) of the worst
    ``worst_fraction`` of its images (at least one), and ``convention``: its name.
    """
    summaries: dict[str, dict[str, object]] = {}
    for convention, rows in table.groupby("convention", sort=True):
        rows = rows.drop(columns=["convention"])
        summary = summarize_metrics(rows, seed=seed, groups=groups, n_boot=n_boot)
        summary["dice_lungs_worst_decile"] = worst_share_mean(rows["dice_lungs"].to_numpy(dtype=float),
                                                              worst_fraction)
        summary["convention"] = str(convention)
        summaries[str(convention)] = summary
    return summaries


def worst_share_mean(values: np.ndarray, fraction: float = 0.1) -> float:
    """Mean of the worst (lowest) ``fraction`` of ``values``, at least one value; NaN dropped
    (NaN when none is left). With 48 images and 0.1: the mean of the 5 worst."""
    data = np.asarray(values, dtype=float)
    data = np.sort(data[~np.isnan(data)])
    if len(data) == 0:
        return float("nan")
    return float(data[:max(1, int(np.ceil(fraction * len(data))))].mean())


#: What :func:`summarize_reruns` reports: ``name: (per-image column, statistic over the images)``.
RERUN_STATISTICS = {
    "dice_mean": ("dice_lungs", np.nanmean),
    "dice_left_mean": ("dice_left", np.nanmean),
    "dice_right_mean": ("dice_right", np.nanmean),
    "dice_worst_decile": ("dice_lungs", worst_share_mean),
    "dice_p10": ("dice_lungs", lambda values: float(np.nanpercentile(values, 10))),
}


def summarize_reruns(
    tables: Sequence[pd.DataFrame], *, groups: str = "patient_id", n_boot: int = 2000, seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, dict[str, dict[str, object]]]:
    """One test set scored by several training runs (seeds): what holds when the experiment is rerun.

    ``tables``: one :func:`per_image_metrics_by_convention` table per run (columns
    ``image_id, convention, <groups>, dice_lungs, dice_left, dice_right``), all holding the
    same images and conventions. Returns ``{convention: {statistic: {"estimate", "ci95",
    "per_run"}}}`` for the :data:`RERUN_STATISTICS` (mean Dice of both lungs and of each lung,
    the worst decile as :func:`worst_share_mean`, the 10th percentile): ``per_run`` the
    statistic of each run, ``estimate`` their mean, ``ci95`` the two-level interval over runs
    and test patients (:func:`cxrlib.evaluate.stats.seed_patient_resamples`, whole
    ``groups`` resampled) widened to the runs' small-sample t interval
    (:func:`cxrlib.evaluate.stats.widened`).
    """
    if not tables:
        raise ValueError("no per-image tables to summarize")
    keys = ["convention", "image_id"]
    ordered = [table.sort_values(keys).reset_index(drop=True) for table in tables]
    first = ordered[0][keys + [groups]]
    for index, table in enumerate(ordered[1:], start=1):
        if not table[keys + [groups]].equals(first):
            raise ValueError(f"run {index} scores other images (or patients) than run 0: "
                             "rerun summaries need one test set")
    if first.duplicated(keys).any():
        raise ValueError("an image is scored twice under one convention")
    summaries: dict[str, dict[str, dict[str, object]]] = {}
    for convention in sorted(first["convention"].unique()):
        rows = np.flatnonzero((first["convention"] == convention).to_numpy())
        patients = first[groups].to_numpy()[rows]
        # one set of resamples for every statistic: their intervals share the draws
        resamples = list(seed_patient_resamples(len(ordered), len(rows), n_boot=n_boot, seed=seed, groups=patients))
        summary: dict[str, dict[str, object]] = {}
        for name, (column, statistic) in RERUN_STATISTICS.items():
            values = np.stack([table[column].to_numpy(dtype=float)[rows] for table in ordered])
            per_run = [float(statistic(run)) for run in values]
            boot = np.array([np.mean([statistic(values[run, sample]) for run in draw]) for draw, sample in resamples])
            low, high = np.nanpercentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            summary[name] = {"estimate": float(np.mean(per_run)), "per_run": per_run,
                             "ci95": list(widened((float(low), float(high)), per_run, alpha=alpha))}
        summaries[str(convention)] = summary
    return summaries


# ----------------------------------------------------------------------------- lesion burden


def lesion_burden(lung_mask: np.ndarray, lesion_masks: Sequence[np.ndarray | None]) -> float:
    """Share of the lung covered by lesions, in [0, 1].

    ``lung_mask``: ``(H, W)`` bool, the reference lungs (anatomical: the lesions lie inside
    them); ``lesion_masks``: ``(H, W)`` bool masks (ground glass, consolidation, ...), ``None``
    for a kind the experts did not draw. Their union is counted once; lesion pixels outside
    the lung are ignored. An empty lung gives NaN.
    """
    lungs = np.asarray(lung_mask, dtype=bool)
    covered = np.zeros_like(lungs)
    for lesion in lesion_masks:
        if lesion is not None:
            lesion = np.asarray(lesion, dtype=bool)
            if lesion.shape != lungs.shape:
                raise ValueError(f"lesion mask {lesion.shape} and lung mask {lungs.shape} differ in shape")
            covered |= lesion
    area = int(lungs.sum())
    return float("nan") if area == 0 else float((covered & lungs).sum()) / area


#: Default bins of lesion burden (share of the lung covered), left-closed.
BURDEN_BINS: tuple[float, ...] = (0.0, 0.05, 0.25, 0.5, 1.0001)


def metrics_by_burden(
    table: pd.DataFrame,
    *,
    burden_column: str = "lesion_burden",
    bins: Sequence[float] = BURDEN_BINS,
    metrics: Sequence[str] = ("dice_lungs", "hd95_lungs"),
    seed: int = 0,
    groups: str | None = None,
    n_boot: int = 2000,
) -> pd.DataFrame:
    """Dice / HD95 per lesion-burden bin, with bootstrap 95% intervals.

    ``table``: one row per image (and ``convention``, when present) with ``burden_column``
    (:func:`lesion_burden`) and the ``metrics`` columns. Returns one row per convention and
    bin: ``convention`` (``""`` when the table has none), ``burden_bin`` (e.g.
    ``"5-25%"``), ``burden_low``, ``burden_high``, ``n_images``, then ``<metric>_mean``,
    ``<metric>_low``, ``<metric>_high`` (NaN for an empty bin's interval). ``groups``:
    column resampled whole (``patient_id``).
    """
    if burden_column not in table.columns:
        raise ValueError(f"table has no {burden_column!r} column")
    edges = np.asarray(bins, dtype=float)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bins must be increasing edges, got {list(bins)}")
    conventions = table["convention"] if "convention" in table.columns else pd.Series("", index=table.index)
    burden = table[burden_column].to_numpy(dtype=float)
    records = []
    for convention in sorted(conventions.unique()):
        for low, high in zip(edges[:-1], edges[1:], strict=True):
            chosen = (conventions == convention).to_numpy() & (burden >= low) & (burden < high)
            rows = table[chosen]
            label = f"{low * 100:.0f}-{min(high, 1.0) * 100:.0f}%"
            record: dict[str, object] = {"convention": convention, "burden_bin": label,
                                         "burden_low": float(low), "burden_high": float(min(high, 1.0)),
                                         "n_images": int(len(rows))}
            for metric in metrics:
                values = rows[metric].to_numpy(dtype=float)
                if np.isfinite(values).any():
                    group_labels = rows[groups].to_numpy() if groups else None
                    mean, ci_low, ci_high = bootstrap_ci(values, seed=seed, groups=group_labels, n_boot=n_boot)
                else:
                    mean = ci_low = ci_high = float("nan")
                record.update({f"{metric}_mean": mean, f"{metric}_low": ci_low, f"{metric}_high": ci_high})
            records.append(record)
    return pd.DataFrame(records)
