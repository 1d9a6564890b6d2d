"""Trained classifiers of notebook 04 run on external cohorts (images they never saw).

:func:`predict_cell` loads one trained cell of notebook 04's grid (its folder
``<task>/<arch>/<condition>/<imbalance>/seed<k>/``: ``best.pt`` and ``cell.json``), predicts every image of
an external manifest whose label is one of the task's classes, and returns the cell's
prediction frame (:func:`cxrlib.stages.classifiers.predictions_frame`) with the model keys,
``evaluation_set`` and ``view``. The operating threshold is the cell's own validation
threshold (from ``cell.json``), never one chosen on the external images.
:func:`predict_cells` does it for every cell of a results table and every cohort and adds
the cells' internal test predictions as ``evaluation_set == "internal"``, which is the table
:mod:`cxrlib.evaluate.external` scores.

Predictions are cached beside the cell (``external/<cohort>.csv``) with the image ids,
labels and checkpoint they came from, so re-opening the notebook does not predict again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cxrlib import runs
from cxrlib.data import manifest as mf
from cxrlib.evaluate import external as ext
from cxrlib.evaluate.external import ALL_VIEWS, INTERNAL, with_columns
from cxrlib.stages.classifiers import predictions_frame
from cxrlib.train.classifier import load_classifier, predict_proba

#: Cell keys copied onto every prediction row (those present in ``cell.json``).
CELL_KEYS: tuple[str, ...] = ("task", "arch", "condition", "imbalance", "seed")


def _cell_info(cell_dir: Path) -> dict[str, Any]:
    cell_json = cell_dir / "cell.json"
    if not cell_json.is_file():
        raise FileNotFoundError(f"{cell_dir}: no cell.json; not a trained classifier cell of notebook 04")
    saved = runs.read_json(cell_json)
    row = saved.get("row") or {}
    classes = list(saved.get("classes") or [])
    if len(classes) < 2:
        raise ValueError(f"{cell_json}: no 'classes' recorded")
    return {"row": row, "classes": classes, "positive": saved.get("positive"),
            "threshold": row.get("threshold")}


def _digest(rows: pd.DataFrame, checkpoint: Path) -> str:
    stat = checkpoint.stat()
    payload = {"ids": sorted(zip(rows["image_id"].astype(str), rows["label"].astype(str), strict=True)),
               "paths": sorted(rows["path"].astype(str)),
               "checkpoint": [checkpoint.name, stat.st_size, stat.st_mtime_ns]}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def predict_cell(
    cell_dir: str | os.PathLike,
    manifest: pd.DataFrame,
    evaluation_set: str,
    *,
    device: str = "cpu",
    batch_size: int = 32,
    cache: bool = True,
    keys: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """One trained cell's predictions on the images of ``manifest`` of the cell's classes.

    ``manifest``: an external cohort (absolute paths, as in memory); rows of other labels
    are left out (e.g. the Normal images of a cohort scored by Pneumonia-vs-COVID-19
    models). Returns :func:`~cxrlib.stages.classifiers.predictions_frame` columns
    (``image_id, patient_id, label, y, prob_<class>, score, called, pred``) plus
    :data:`CELL_KEYS`, ``threshold``, ``evaluation_set`` and ``view``; empty when no row
    has the cell's classes. ``cache``: reuse ``external/<evaluation_set>.csv`` beside the
    cell when it was made from the same images and checkpoint. ``keys``: the cell keys to
    write (default: those of ``cell.json``; a ``synthetic_only`` cell serves every ratio).
    """
    cell_dir = Path(cell_dir)
    info = _cell_info(cell_dir)
    classes, positive = info["classes"], info["positive"]
    rows = manifest[mf._column(manifest, "label").isin(classes)].drop_duplicates("image_id")
    keys = dict(keys) if keys is not None else {k: info["row"][k] for k in CELL_KEYS if k in info["row"]}
    if not len(rows):
        return pd.DataFrame(columns=[*keys, "evaluation_set", "image_id", "patient_id", "label", "score",
                                     "called", "threshold", "view"])
    checkpoint = cell_dir / "best.pt" if (cell_dir / "best.pt").is_file() else cell_dir / "last.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{cell_dir}: no best.pt or last.pt checkpoint")
    digest = _digest(rows, checkpoint)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in evaluation_set)
    cached, stamp = cell_dir / "external" / f"{safe}.csv", cell_dir / "external" / f"{safe}.json"
    if cache and cached.is_file() and stamp.is_file() and runs.read_json(stamp).get("digest") == digest:
        frame = pd.read_csv(cached, dtype={"image_id": str, "patient_id": str})
    else:
        model = load_classifier(cell_dir, device=device)
        threshold = info["threshold"]
        threshold = float(threshold) if threshold is not None and threshold == threshold else 0.5
        prob = predict_proba(model, rows, batch_size=batch_size, device=device)
        frame = predictions_frame(rows, prob, classes, threshold, positive)
        frame["threshold"] = threshold
        frame["view"] = mf._column(rows, "view").to_numpy() if "view" in rows.columns else ""
        if cache:
            cached.parent.mkdir(parents=True, exist_ok=True)
            runs.atomic_write(cached, lambda stream: frame.to_csv(stream, index=False), mode="w")
            runs.write_json(stamp, {"digest": digest, "evaluation_set": evaluation_set, "n": len(frame)})
    for key, value in reversed(list(keys.items())):
        frame.insert(0, key, value)
    frame.insert(len(keys), "evaluation_set", evaluation_set)
    frame["view"] = frame["view"].fillna("").astype(str)
    return frame


def predict_cells(
    results: pd.DataFrame,
    cohorts: Mapping[str, pd.DataFrame],
    *,
    run_dir: str | os.PathLike | None = None,
    development: pd.DataFrame | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    cache: bool = True,
    progress: bool = False,
) -> pd.DataFrame:
    """Every cell of ``results`` (:func:`~cxrlib.stages.classifiers.run_grid` output, with
    ``cell_dir``) on the internal test split and on every cohort of ``cohorts``
    (``{name: external manifest}``), in one long table with ``evaluation_set``
    (``"internal"`` for the cells' stored test predictions).

    ``run_dir``: the grid's folder (default ``results.attrs["run_dir"]``).
    ``development``: the development manifest, to add the internal images' ``view``.
    """
    run_dir = Path(run_dir if run_dir is not None else results.attrs["run_dir"])
    if INTERNAL in cohorts:
        raise ValueError(f"an external cohort may not be called {INTERNAL!r}")
    parts = []
    records = results.to_dict("records")  # a synthetic_only cell is in the rows of every ratio
    iterator = records
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(records, desc="cells on external cohorts", unit="cell")
    for record in iterator:
        cell_dir = run_dir / record["cell_dir"]
        internal = pd.read_csv(cell_dir / "predictions.csv", dtype={"image_id": str, "patient_id": str})
        keys = {k: record[k] for k in CELL_KEYS if k in record}
        internal = internal.assign(**keys, evaluation_set=INTERNAL, threshold=record.get("threshold"))
        if development is not None:
            internal = with_columns(internal, [development], ("view",))
        parts.append(internal)
        for name, manifest in cohorts.items():
            parts.append(predict_cell(cell_dir, manifest, name, device=device, batch_size=batch_size, cache=cache,
                                      keys=keys))
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame()
    frame = pd.concat(parts, ignore_index=True)
    first = [*[k for k in CELL_KEYS if k in frame.columns], "evaluation_set"]
    return frame[first + [c for c in frame.columns if c not in first]]


# ----------------------------------------------------------------------------- notebook 04's external section


@dataclass
class ExternalEvaluation:
    """Every trained cell on the internal test split and on every external cohort, with the floor.

    ``predictions``: :func:`predict_cells` output (one row per model and image);
    ``per_model``: :func:`cxrlib.evaluate.external.score_models` (each seed, set and view);
    ``summary``: :func:`~cxrlib.evaluate.external.summarize_sets` (seed-means, two-level
    intervals, per view) with the floor's verdict on its AUC rows; ``drops``:
    :func:`~cxrlib.evaluate.external.internal_minus_external`; ``floor``:
    :func:`cxrlib.evaluate.shortcut.shortcut_floor`; ``table``:
    :func:`~cxrlib.evaluate.external.wide_table` (one row per condition and set, pooled
    views, with the floor and ``versus_floor``); ``sources``: how well image statistics tell
    the development cohort's sources (or sites) apart, and each external cohort from the
    development cohort (:func:`cxrlib.evaluate.shortcut.cohort_separability`).
    """

    predictions: pd.DataFrame
    per_model: pd.DataFrame
    summary: pd.DataFrame
    drops: pd.DataFrame
    floor: pd.DataFrame
    table: pd.DataFrame
    sources: dict[str, Any] = field(default_factory=dict)
    cohorts: tuple[str, ...] = ()
    seconds: float = 0.0

    def results_rows(self, results: pd.DataFrame) -> pd.DataFrame:
        """``results`` (one row per cell, internal test split) with an ``evaluation_set``
        column (``"internal"``), followed by one row per cell and external cohort: the cell's
        keys, ``cell_dir``, ``threshold`` and that cohort's ``n, n_pos, n_patients`` and AUC /
        sensitivity / specificity with intervals over patients (pooled views). What
        ``results.csv`` holds; readers that want the grid keep ``evaluation_set == "internal"``
        (:func:`internal_rows`)."""
        internal = results.assign(evaluation_set=INTERNAL)
        keys = [k for k in CELL_KEYS if k in results.columns and k in self.per_model.columns]
        if self.per_model.empty:
            return internal
        external = self.per_model[(self.per_model["evaluation_set"] != INTERNAL)
                                  & (self.per_model["view"].astype(str) == ALL_VIEWS)]
        external = external.drop(columns=["view"])
        cells = results[[*keys, *[c for c in ("cell_dir", "threshold", "status") if c in results.columns]]]
        external = cells.merge(external, on=keys, how="inner")
        return pd.concat([internal, external], ignore_index=True)

    def metrics(self) -> dict[str, Any]:
        """Plain data for notebook 04's ``metrics.json``: per condition and set the AUC,
        sensitivity and specificity with intervals, the floor and the verdict (``table``),
        the internal-minus-external differences with their intervals (``drops``), per-view
        rows, the floor itself and the source separability."""
        per_view = self.summary[self.summary["view"].astype(str) != ALL_VIEWS] if len(self.summary) else self.summary
        return {
            "cohorts": list(self.cohorts),
            "interval": ("seed-means; 95% interval over resamples of the training seeds, then the patients of "
                         "each set (differences: seeds paired, patients of both sets resampled independently)"),
            "table": self.table.to_dict("records"),
            "drops": self.drops.to_dict("records"),
            "per_view": per_view.to_dict("records"),
            "floor": self.floor.to_dict("records"),
            "sources": self.sources,
            "seconds": self.seconds,
        }


def internal_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The rows of a ``results.csv`` that describe the internal test split (all rows of one
    written before it had an ``evaluation_set`` column)."""
    if "evaluation_set" not in results.columns:
        return results
    return results[results["evaluation_set"].fillna(INTERNAL).astype(str) == INTERNAL].reset_index(drop=True)


def _separability(name: str, call) -> dict[str, Any]:
    try:
        return runs.to_plain(call())
    except ValueError as error:  # one source, or too few patients to cross-validate
        return {"status": "skipped", "reason": f"{name}: {error}"}


def evaluate_external(
    results: pd.DataFrame,
    cohorts: Mapping[str, pd.DataFrame],
    development: pd.DataFrame,
    *,
    run_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> ExternalEvaluation:
    """Notebook 04's external section in one call: every cell of ``results`` (the grid) on
    the internal test split and on every cohort of ``cohorts`` (``{name: external
    manifest}``, :func:`cxrlib.data.external.read_external`) at the cell's validation
    threshold, scored per model, per condition (seed-mean, two-level intervals), per view
    where the view is known, the internal-minus-external difference, and the shortcut floor
    of each binary task of the grid on every set, with the verdict next to each AUC.

    ``development``: the manifest the grid was trained on (its real rows give the floor's
    training data, the views of the internal images and the source separability). A
    cohort with positives only gets a sensitivity and NaN AUC / specificity.
    """
    from cxrlib.evaluate import shortcut
    from cxrlib.stages.classifiers import TASKS, real_rows

    started = time.perf_counter()
    real = real_rows(development)
    predictions = predict_cells(results, cohorts, run_dir=run_dir, development=real, device=device,
                                progress=progress)
    per_model = ext.score_models(predictions, n_boot=n_boot, seed=seed)
    summary = ext.summarize_sets(predictions, n_boot=n_boot, seed=seed)
    drops = ext.internal_minus_external(predictions, n_boot=n_boot, seed=seed)
    statistics = shortcut.statistics_table(real)
    external_stats = {name: (cohort, shortcut.statistics_table(cohort)) for name, cohort in cohorts.items()}
    tasks = {name: TASKS[name].classes for name in dict.fromkeys(results["task"].astype(str))
             if name in TASKS and TASKS[name].binary}
    floor = shortcut.shortcut_floor(real, statistics, tasks, external_stats, n_boot=n_boot, seed=seed)
    summary = shortcut.against_floor(summary, floor, estimate="estimate")
    table = ext.wide_table(summary, floor)
    sources = {"development": _separability("development", lambda: shortcut.source_separability(real, statistics,
                                                                                               n_boot=n_boot,
                                                                                               seed=seed))}
    for name, pair in external_stats.items():
        sources[name] = _separability(name, lambda pair=pair: shortcut.cohort_separability(
            {"development": (real, statistics), "external": pair}, n_boot=n_boot, seed=seed))
    return ExternalEvaluation(predictions=predictions, per_model=per_model, summary=summary, drops=drops,
                              floor=floor, table=table, sources=sources, cohorts=tuple(cohorts),
                              seconds=time.perf_counter() - started)
