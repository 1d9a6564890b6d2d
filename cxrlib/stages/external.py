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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cxrlib import runs
from cxrlib.data import manifest as mf
from cxrlib.evaluate.external import INTERNAL, with_columns
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
