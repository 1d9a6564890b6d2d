"""The shortcut floor: what global image statistics, with no network, achieve on a task.

A COVID-19 classifier trained on images from several collections can score well by
learning the collection (exposure, burned-in text, borders, file format) instead of the
disease (DeGrave et al., Nat Mach Intell 2021; Roberts et al., Nat Mach Intell 2021).
The floor makes that visible next to every classifier number:

- :func:`image_statistics` / :func:`statistics_table`: per image, intensity percentiles,
  mean, standard deviation, contrast, the share of black and white pixels, the mean and
  standard deviation of a border frame and its difference from the centre (all from the
  8-bit grey image the classifier reads, ``path``), plus the original file's width,
  height, aspect ratio, format and bit depth (from the original file's header:
  ``raw_path`` when the cohort was resized, else ``path``; read by Pillow without
  decoding the pixels);
- :func:`shortcut_floor`: a logistic regression on those statistics (standardised),
  trained on a task's training split, its threshold chosen on the validation split
  (Youden), scored on the internal test split and on every external cohort: AUC,
  sensitivity and specificity with 95 % intervals over patients;
- :func:`source_separability`: how well the same statistics tell the cohort's sources (or
  acquisition sites) apart: cross-validated AUC, folds grouped by patient;
- :func:`against_floor`: marks a classifier result whose interval overlaps the floor's
  as "not shown to beat image statistics".
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlib.data import manifest as mf
from cxrlib.data.io import ImageReadError, read_image
from cxrlib.evaluate.classification import choose_threshold, metrics_with_ci

#: Statistics of the decoded 8-bit grey image (values 0..255 unless said otherwise).
PIXEL_FEATURES: tuple[str, ...] = (
    "p01", "p05", "p25", "p50", "p75", "p95", "p99", "mean", "std",
    "contrast",          # (p95 - p05), the spread of the central 90 % of grey levels
    "frac_black",        # share of pixels <= 5 (0..1): padding, collimation
    "frac_white",        # share of pixels >= 250 (0..1): burned-in text, markers
    "border_mean", "border_std",  # the frame of `border` x side around the image
    "border_minus_center",        # border mean minus the mean of the central half
)
#: Statistics of the original file's header.
FILE_FEATURES: tuple[str, ...] = (
    "width", "height", "aspect",   # original pixels; aspect = width / height
    "bit_depth",                   # bits per sample (8, 16, 32)
    "channels",                    # 1 grey, 3 colour, 4 colour + alpha, ...
    "format_png", "format_jpeg", "format_other",  # one-hot file format
)
#: Every column :func:`statistics_table` computes, in order.
FEATURES: tuple[str, ...] = (*PIXEL_FEATURES, *FILE_FEATURES)
#: Text next to a classifier result whose interval overlaps the floor's.
NOT_SHOWN = "not shown to beat image statistics"
#: Text next to a classifier result whose interval lies above the floor's.
ABOVE = "above the image-statistics floor"

_BITS = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "YCbCr": 8, "LA": 8, "PA": 8,
         "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


def image_statistics(image: np.ndarray, *, border: float = 0.05) -> dict[str, float]:
    """:data:`PIXEL_FEATURES` of one ``(H, W)`` ``uint8`` image.

    ``border``: width of the frame, as a fraction of each side (at least one pixel).
    """
    pixels = np.asarray(image)
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"image must be a non-empty (H, W) array, got shape {pixels.shape}")
    if not 0 < border < 0.5:
        raise ValueError(f"border must lie in (0, 0.5), got {border}")
    values = pixels.astype(np.float64)
    p01, p05, p25, p50, p75, p95, p99 = np.percentile(values, [1, 5, 25, 50, 75, 95, 99])
    height, width = values.shape
    bh, bw = max(1, int(round(border * height))), max(1, int(round(border * width)))
    frame = np.ones_like(values, dtype=bool)
    frame[bh:height - bh, bw:width - bw] = False
    if not frame.all():
        edge = values[frame]
    else:  # a tiny image is all border
        edge = values.ravel()
    center = values[height // 4:height - height // 4, width // 4:width - width // 4]
    center = center if center.size else values
    return {
        "p01": p01, "p05": p05, "p25": p25, "p50": p50, "p75": p75, "p95": p95, "p99": p99,
        "mean": float(values.mean()), "std": float(values.std()), "contrast": float(p95 - p05),
        "frac_black": float((pixels <= 5).mean()), "frac_white": float((pixels >= 250).mean()),
        "border_mean": float(edge.mean()), "border_std": float(edge.std()),
        "border_minus_center": float(edge.mean() - center.mean()),
    }


def file_statistics(path: str | os.PathLike) -> dict[str, float]:
    """:data:`FILE_FEATURES` of one image file, from its header (Pillow opens lazily: no
    pixel is decoded). DICOM and other files Pillow cannot open are decoded once for their
    size and count as ``format_other``, 8-bit, one channel. Raises
    :class:`~cxrlib.data.io.ImageReadError` for an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            mode, fmt = opened.mode, (opened.format or "").upper()
            bits = _BITS.get(mode, 8)
            channels = len(opened.getbands())
    except (UnidentifiedImageError, OSError, ValueError):
        pixels = read_image(path)  # raises ImageReadError naming the file when unreadable
        height, width = pixels.shape
        fmt, bits, channels = "", 8, 1
    if height <= 0 or width <= 0:
        raise ImageReadError(str(path), f"zero-size image ({width} x {height})")
    return {
        "width": float(width), "height": float(height), "aspect": width / height,
        "bit_depth": float(bits), "channels": float(channels),
        "format_png": float(fmt == "PNG"), "format_jpeg": float(fmt in ("JPEG", "MPO")),
        "format_other": float(fmt not in ("PNG", "JPEG", "MPO")),
    }


def statistics_table(
    manifest: pd.DataFrame,
    *,
    raw_column: str = "raw_path",
    raw_root: str | os.PathLike | None = None,
    border: float = 0.05,
    progress: bool = False,
) -> pd.DataFrame:
    """:data:`FEATURES` of every image of ``manifest``, one row per ``image_id`` (its index).

    Pixel statistics come from ``path`` (the image the classifier reads); file statistics
    from ``raw_column`` where it is filled (the original file of a resized cohort, resolved
    against ``raw_root`` when relative), else from ``path``. Also ``patient_id``, ``label``
    and, when present, ``split``, ``source``, ``site``, ``view``. A file that cannot be read
    gets NaN statistics (the floor leaves such rows out) and is listed in
    ``attrs["unreadable"]`` (``[(image_id, reason)]``).
    """
    rows = manifest.drop_duplicates("image_id")
    paths = mf._column(rows, "path")
    raws = mf._column(rows, raw_column) if raw_column in rows.columns else pd.Series("", index=rows.index)
    iterator = zip(mf._column(rows, "image_id"), paths, raws, strict=True)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(list(iterator), desc="image statistics", unit="img")
    records, unreadable = [], []
    for image_id, path, raw in iterator:
        try:
            record = image_statistics(read_image(mf.resolve_path(None, path)), border=border)
            original = mf.resolve_path(raw_root, raw) if raw else mf.resolve_path(None, path)
            record.update(file_statistics(original))
        except (ImageReadError, ValueError, OSError) as error:
            unreadable.append((image_id, getattr(error, "reason", str(error))))
            record = dict.fromkeys(FEATURES, np.nan)
        records.append(record)
    table = pd.DataFrame(records, columns=list(FEATURES), index=pd.Index(mf._column(rows, "image_id"),
                                                                          name="image_id"))
    for column in ("patient_id", "label", "split", "source", "site", "view"):
        if column in rows.columns:
            table[column] = mf._column(rows, column).to_numpy()
    table.attrs["unreadable"] = unreadable
    return table


def _model(seed: int = 0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Regularised: a floor should not overfit a few hundred images to a few dozen features.
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))


def _usable(frame: pd.DataFrame, features: Sequence[str]) -> pd.DataFrame:
    return frame[np.isfinite(frame[list(features)].to_numpy(dtype=np.float64)).all(axis=1)]


def _rows_with_stats(rows: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    ids = mf._column(rows, "image_id")
    missing = sorted(set(ids) - set(stats.index))
    if missing:
        raise ValueError(f"no statistics for {len(missing)} image(s), e.g. {missing[:3]}; "
                         "compute statistics_table() on the same manifest")
    picked = stats.loc[ids.to_numpy(), [c for c in stats.columns if c in FEATURES]].reset_index()
    picked["patient_id"] = mf._column(rows, "patient_id").to_numpy()
    picked["label"] = mf._column(rows, "label").to_numpy()
    if "view" in rows.columns:
        picked["view"] = mf._column(rows, "view").to_numpy()
    return picked


def floor_predictions(
    development: pd.DataFrame,
    statistics: pd.DataFrame,
    classes: Sequence[str],
    evaluation_sets: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]],
    *,
    positive: str = "covid",
    features: Sequence[str] = FEATURES,
    seed: int = 0,
) -> tuple[pd.DataFrame, float]:
    """Train the floor on one binary task and predict every evaluation set.

    ``development``: the split development manifest (``split``; only real rows, ``origin``
    ``real`` or empty, are used); ``statistics``: its :func:`statistics_table`.
    ``classes``: the task's two labels (the positive one is ``positive``).
    ``evaluation_sets``: ``{name: (rows, their statistics)}``, e.g. ``{"internal":
    (test rows, statistics), "cxnet": (external manifest, its statistics)}``; rows of other
    labels are left out. Returns the prediction frame (``evaluation_set, image_id,
    patient_id, label, y, score, called`` and ``view`` when known; the format of
    :func:`cxrlib.evaluate.external.score_frame`) and the validation threshold.
    """
    if positive not in classes or len(classes) != 2:
        raise ValueError(f"the floor needs a binary task whose classes include {positive!r}, got {list(classes)}")
    features = list(features)
    real = development[mf._column(development, "origin").isin([mf.REAL, ""])]
    task_rows = real[mf._column(real, "label").isin(classes)]
    fitted: dict[str, pd.DataFrame] = {}
    for split in ("train", "val"):
        rows = task_rows[mf._column(task_rows, "split") == split]
        fitted[split] = _usable(_rows_with_stats(rows, statistics), features)
        present = set(fitted[split]["label"])
        if present != set(classes):
            raise ValueError(f"the floor needs both classes {list(classes)} in the {split} split; "
                             f"it has {sorted(present)}")
    train, val = fitted["train"], fitted["val"]
    # a feature constant over the training images cannot help; leave it out (and keep the scaler finite)
    varying = [f for f in features if train[f].std() > 0]
    if not varying:
        raise ValueError("every image statistic is constant over the training images")
    model = _model(seed).fit(train[varying].to_numpy(), (train["label"] == positive).to_numpy().astype(int))
    val_score = model.predict_proba(val[varying].to_numpy())[:, 1]
    threshold = choose_threshold((val["label"] == positive).astype(int).to_numpy(), val_score, "youden")
    frames = []
    for name, (rows, stats) in evaluation_sets.items():
        rows = rows[mf._column(rows, "label").isin(classes)]
        if not len(rows):
            continue
        picked = _usable(_rows_with_stats(rows, stats), varying)
        score = model.predict_proba(picked[varying].to_numpy())[:, 1] if len(picked) else np.zeros(0)
        frame = pd.DataFrame({
            "evaluation_set": name, "image_id": picked["image_id"].astype(str),
            "patient_id": picked["patient_id"].astype(str), "label": picked["label"].astype(str),
            "y": (picked["label"] == positive).astype(int), "score": score, "called": score >= threshold,
        })
        if "view" in picked.columns:
            frame["view"] = picked["view"].to_numpy()
        frames.append(frame)
    columns = ["evaluation_set", "image_id", "patient_id", "label", "y", "score", "called"]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return out, float(threshold)


def score_binary(y: np.ndarray, score: np.ndarray, threshold: float, groups: np.ndarray, *,
                 n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """AUC, sensitivity and specificity at ``threshold`` with 95 % intervals over ``groups``
    (patients): ``{metric, metric_low, metric_high, n, n_pos, n_patients}``. With one class
    only (e.g. an external cohort of positives), AUC and the missing class's rate are NaN
    and the other rate gets a patient-level interval (:func:`cxrlib.evaluate.stats.bootstrap_ci`)."""
    from cxrlib.evaluate.stats import bootstrap_ci

    y = np.asarray(y, dtype=int)
    score = np.asarray(score, dtype=np.float64)
    groups = np.asarray(groups)
    out: dict[str, float] = {"n": int(len(y)), "n_pos": int(y.sum()), "n_patients": int(len(set(groups)))}
    nan3 = (float("nan"),) * 3
    if 0 < y.sum() < len(y):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*bootstrap resamples lacked a class.*")
            ci = metrics_with_ci(y, score, threshold, groups=groups, n_boot=n_boot, seed=seed)
        values = {"auc": ci["auc_roc"], "sensitivity": ci["sensitivity"], "specificity": ci["specificity"]}
    else:
        called = (score >= threshold).astype(np.float64)
        rate = bootstrap_ci(called if y.all() else 1.0 - called, groups=groups, n_boot=n_boot, seed=seed) \
            if len(y) else nan3
        values = {"auc": nan3, "sensitivity": rate if len(y) and y.all() else nan3,
                  "specificity": rate if len(y) and not y.any() else nan3}
    for name, (estimate, low, high) in values.items():
        out.update({name: estimate, f"{name}_low": low, f"{name}_high": high})
    return out


def shortcut_floor(
    development: pd.DataFrame,
    statistics: pd.DataFrame,
    tasks: Mapping[str, Sequence[str]],
    external: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]] | None = None,
    *,
    positive: str = "covid",
    features: Sequence[str] = FEATURES,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """The floor of every binary task on the internal test split and every external cohort.

    ``tasks``: ``{task name: (negative label, positive label)}``, e.g. ``{name: t.classes for
    name, t in cxrlib.stages.classifiers.TASKS.items() if t.binary}``. ``external``:
    ``{cohort name: (external manifest, its statistics_table)}``. One row per task and
    evaluation set (``internal`` first): ``task, evaluation_set, auc, auc_low, auc_high,
    sensitivity(_low/_high), specificity(_low/_high), n, n_pos, n_patients, threshold``
    (the validation threshold). A task the development cohort cannot train (a class
    missing from train or val) gets one row per set with NaN metrics and ``note`` saying why.
    """
    sets = {"internal": (development[mf._column(development, "split") == "test"], statistics)}
    sets.update(dict(external or {}))
    rows = []
    for task, classes in tasks.items():
        try:
            predictions, threshold = floor_predictions(development, statistics, classes, sets,
                                                       positive=positive, features=features, seed=seed)
        except ValueError as error:
            rows += [{"task": task, "evaluation_set": name, "note": str(error)} for name in sets]
            continue
        for name in sets:
            part = predictions[predictions["evaluation_set"] == name]
            if not len(part):
                rows.append({"task": task, "evaluation_set": name, "note": "no image of the task's classes"})
                continue
            rows.append({"task": task, "evaluation_set": name,
                         **score_binary(part["y"].to_numpy(), part["score"].to_numpy(), threshold,
                                        part["patient_id"].to_numpy(), n_boot=n_boot, seed=seed),
                         "threshold": threshold, "note": ""})
    columns = ["task", "evaluation_set", *[f"{m}{s}" for m in ("auc", "sensitivity", "specificity")
                                           for s in ("", "_low", "_high")],
               "n", "n_pos", "n_patients", "threshold", "note"]
    return pd.DataFrame(rows).reindex(columns=columns)


def source_column(manifest: pd.DataFrame, candidates: Sequence[str] = ("source", "site")) -> str | None:
    """The first of ``candidates`` with at least two distinct non-empty values, else ``None``."""
    for column in candidates:
        if column in manifest.columns and mf._column(manifest, column).replace("", np.nan).nunique() >= 2:
            return column
    return None


def source_separability(
    manifest: pd.DataFrame,
    statistics: pd.DataFrame,
    column: str | None = None,
    *,
    features: Sequence[str] = FEATURES,
    n_splits: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """How well image statistics tell the values of ``column`` (default: ``source``, else
    ``site``; :func:`source_column`) apart, over every row of ``manifest``.

    Out-of-fold scores of the same logistic regression, folds grouped by patient
    (``StratifiedGroupKFold``), so no patient is in training and scoring at once. Returns
    ``{"column", "values": {value: n images}, "auc", "auc_low", "auc_high", "n",
    "n_patients"}``: the AUC of telling two values apart, or the macro one-vs-rest AUC of
    more, with a 95 % interval over patients. 0.5: the statistics do not know the source;
    near 1: they do, and a classifier can learn the source instead of the disease.
    Raises ``ValueError`` when no column has two values.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    column = column or source_column(manifest)
    if column is None or column not in manifest.columns:
        raise ValueError("source_separability needs a 'source' or 'site' column with at least two values")
    rows = manifest.drop_duplicates("image_id")
    rows = rows[mf._column(rows, column) != ""]
    picked = _rows_with_stats(rows, statistics)
    picked["target"] = mf._column(rows, column).to_numpy()
    picked = _usable(picked, list(features))
    values = sorted(picked["target"].unique())
    if len(values) < 2:
        raise ValueError(f"column {column!r} has fewer than two values among readable images")
    varying = [f for f in features if picked[f].std() > 0]
    x = picked[varying].to_numpy()
    y = picked["target"].map({v: i for i, v in enumerate(values)}).to_numpy()
    groups = picked["patient_id"].to_numpy()
    n_folds = int(min(n_splits, pd.Series(groups).groupby(y).nunique().min()))
    if n_folds < 2:
        raise ValueError(f"column {column!r}: some value has fewer than two patients; cannot cross-validate")
    prob = np.zeros((len(y), len(values)))
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for train, test in folds.split(x, y, groups):
        model = _model(seed).fit(x[train], y[train])
        fold_prob = np.zeros((len(test), len(values)))
        fold_prob[:, model.classes_] = model.predict_proba(x[test])
        prob[test] = fold_prob
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*bootstrap resamples lacked a class.*")
        if len(values) == 2:
            ci = metrics_with_ci(y, prob[:, 1], 0.5, groups=groups, n_boot=n_boot, seed=seed)
            auc = ci["auc_roc"]
        else:
            ci = metrics_with_ci(y, prob, groups=groups, n_boot=n_boot, seed=seed, class_names=values)
            auc = ci["macro_auc"]
    counts = picked["target"].value_counts()
    return {"column": column, "values": {str(v): int(counts[v]) for v in values},
            "auc": auc[0], "auc_low": auc[1], "auc_high": auc[2], "n": int(len(y)),
            "n_patients": int(len(set(groups)))}


def beats_floor(low: float, floor_high: float) -> bool:
    """Whether a classifier interval with lower bound ``low`` lies wholly above a floor
    interval with upper bound ``floor_high`` (intervals that overlap, or a NaN, say no)."""
    return bool(np.isfinite(low) and np.isfinite(floor_high) and low > floor_high)


def against_floor(
    results: pd.DataFrame,
    floor: pd.DataFrame,
    *,
    metric: str = "auc",
    on: Sequence[str] = ("task", "evaluation_set"),
    estimate: str | None = None,
) -> pd.DataFrame:
    """``results`` with the floor's ``metric`` next to each row and a verdict.

    ``results``: rows with ``on`` columns and the classifier's ``<metric>``,
    ``<metric>_low``, ``<metric>_high`` (or, for a long table such as
    :func:`cxrlib.stages.classifiers.summarize_over_seeds` output, ``estimate="estimate"``
    with ``low`` / ``high`` and a ``metric`` column: only rows of ``metric`` get a verdict).
    ``floor``: :func:`shortcut_floor` output. Adds ``floor_<metric>``,
    ``floor_<metric>_low``, ``floor_<metric>_high``, ``beats_floor`` (bool: the
    classifier's interval lies wholly above the floor's) and ``versus_floor``
    (:data:`ABOVE`, :data:`NOT_SHOWN`, or ``""`` where either interval is unknown, and on
    per-view rows: the floor pools every view). A missing ``evaluation_set`` column in
    ``results`` counts as ``internal``.
    """
    out = results.copy()
    if "evaluation_set" in on and "evaluation_set" not in out.columns:
        out["evaluation_set"] = "internal"
    low_col = f"{metric}_low" if estimate is None else "low"  # the verdict needs only the lower bound
    names = {metric: f"floor_{metric}", f"{metric}_low": f"floor_{metric}_low",
             f"{metric}_high": f"floor_{metric}_high"}
    right = floor[[*on, *names]].rename(columns=names)
    out = out.merge(right, on=list(on), how="left")
    applies = out["metric"] == metric if estimate is not None and "metric" in out.columns \
        else pd.Series(True, index=out.index)
    if "view" in out.columns and "view" not in on:  # the floor pools every view
        applies &= out["view"].fillna("").astype(str).isin(["", "all"])
    low = pd.to_numeric(out[low_col], errors="coerce")
    floor_high = pd.to_numeric(out[f"floor_{metric}_high"], errors="coerce")
    known = applies & low.notna() & floor_high.notna()
    out["beats_floor"] = [beats_floor(lo, hi) if ok else False for lo, hi, ok in zip(low, floor_high, known,
                                                                                       strict=True)]
    out["versus_floor"] = np.where(~known, "", np.where(out["beats_floor"], ABOVE, NOT_SHOWN))
    for column in names.values():
        out.loc[~applies, column] = np.nan
    return out


def cohort_separability(
    cohorts: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]],
    *,
    label: str | None = None,
    features: Sequence[str] = FEATURES,
    n_splits: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """How well image statistics tell the cohorts apart: :func:`source_separability` over
    ``{name: (manifest, its statistics_table)}`` with the cohort as the target.

    ``label``: compare only images of this label (e.g. ``"covid"``: development COVID-19
    vs external COVID-19, where the disease is the same and only the acquisition differs).
    Image and patient ids are prefixed with the cohort name, so ids may repeat across
    cohorts. Returns the :func:`source_separability` dict with ``column == "cohort"``.
    """
    frames, tables = [], []
    for name, (rows, stats) in cohorts.items():
        if label is not None:
            rows = rows[mf._column(rows, "label") == label]
        rows = rows.drop_duplicates("image_id")
        ids = mf._column(rows, "image_id")
        frames.append(pd.DataFrame({"image_id": f"{name}|" + ids, "label": mf._column(rows, "label"),
                                    "patient_id": f"{name}|" + mf._column(rows, "patient_id"),
                                    "cohort": name}))
        picked = stats.loc[ids.to_numpy(), [c for c in stats.columns if c in FEATURES]]
        picked.index = f"{name}|" + ids.to_numpy()
        tables.append(picked)
    if len(frames) < 2:
        raise ValueError("cohort_separability needs at least two cohorts")
    return source_separability(pd.concat(frames, ignore_index=True), pd.concat(tables), "cohort",
                               features=features, n_splits=n_splits, n_boot=n_boot, seed=seed)
