"""The training sets of the grid: real and synthetic rows, COVID-19 patients subsampled to an
imbalance, and what a manifest can support (conditions, tasks, lung masks)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cxrlib.data import manifest as mf
from cxrlib.data.classification import (
    GROUND_TRUTH,
    PRECOMPUTED_COLUMNS,
    PRED_MASK_COLUMNS,
)
from cxrlib.data.datasets import mask_layout
from cxrlib.data.masks import failed_lung_qc
from cxrlib.stages.classifiers.design import (
    CONDITIONS,
    DEFAULT_CONDITIONS,
    POSITIVE,
    SOURCELESS_GENERATORS,
    TASKS,
    Condition,
    GridConfig,
    Task,
    imbalance_name,
)

#: Notebook that makes each generator's images (for the messages of :func:`available_conditions`).
_MADE_IN = {"G_NC": "notebook 03", "G_PC": "notebook 03", "diffusion": "notebook 06"}


def as_frame(manifest: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """``manifest`` itself, or the manifest read from that path."""
    return manifest if isinstance(manifest, pd.DataFrame) else mf.read_manifest(manifest)


def leakage_checked(manifest: pd.DataFrame) -> pd.DataFrame:
    """``manifest``, after :func:`cxrlib.data.manifest.check_leakage` (raises on a leak)."""
    mf.check_leakage(manifest, raise_on_leak=True)
    return manifest


def generator_of(origin: str) -> str:
    """The generator named in ``origin`` (``"real"`` for a real image)."""
    parsed = mf.parse_origin(origin)
    return parsed[0] if parsed else mf.REAL


def real_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows of real images (``origin == "real"``)."""
    return manifest[manifest["origin"] == mf.REAL]


def evaluation_rows(manifest: pd.DataFrame, task: Task | str, split: str) -> pd.DataFrame:
    """The real images of ``task``'s classes in ``split`` (``"val"`` / ``"test"``): never subsampled, never synthetic."""
    task = TASKS[task] if isinstance(task, str) else task
    real = real_rows(manifest)
    return real[(real["split"] == split) & real["label"].isin(task.classes)]


def synthetic_rows(manifest: pd.DataFrame, generators: Sequence[str]) -> pd.DataFrame:
    """Train-split synthetic COVID-19 rows made by ``generators`` whose source image is a train image.

    Rows of :data:`SOURCELESS_GENERATORS` (made from noise) need no source image; their
    train split is all that is checked. Raises ``ValueError`` when a synthetic row of the
    other generators names no source image in the manifest's train split (it could have
    been made from a val / test image).
    """
    if not generators:
        return manifest.iloc[:0]
    made_by = manifest["origin"].map(generator_of)
    rows = manifest[made_by.isin(generators) & (manifest["label"] == POSITIVE) & (manifest["split"] == "train")]
    sources = rows["origin"].map(lambda origin: mf.parse_origin(origin)[2])
    real = real_rows(manifest)
    train_ids = set(real.loc[real["split"] == "train", "image_id"])
    sourceless = rows["origin"].map(generator_of).isin(SOURCELESS_GENERATORS) & sources.eq("")
    unsourced = rows[~sources.isin(train_ids) & ~sourceless]["image_id"].tolist()
    if unsourced:
        raise ValueError(f"{len(unsourced)} synthetic image(s) name no real source image in the train split, so "
                         f"they could come from a val / test image: {unsourced[:10]}")
    return rows


def covid_patient_order(train_rows: pd.DataFrame, seed: int) -> list[str]:
    """Real COVID-19 training patients in a seeded random order (the same for every task and ratio)."""
    patients = sorted(set(train_rows.loc[(train_rows["label"] == POSITIVE)
                                         & (train_rows["origin"] == mf.REAL), "patient_id"]))
    rng = np.random.default_rng([int(seed), 4242])
    return [patients[i] for i in rng.permutation(len(patients))]


def subsample_covid(train_rows: pd.DataFrame, task: Task | str, ratio: int | None,
                    seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The task's real training rows with COVID-19 patients subsampled to 1:``ratio``.

    ``train_rows``: real train-split rows. The target is ``round(n_majority / ratio)``
    COVID-19 images (at least 1), ``n_majority`` the image count of the task's largest
    other class. Whole patients are taken in :func:`covid_patient_order` until the image
    count is closest to the target (at least one patient). ``ratio=None`` keeps every
    COVID-19 patient. Returns the rows and ``{"covid_target", "n_majority",
    "n_train_covid_patients", "ratio_achieved"}``.
    """
    task = TASKS[task] if isinstance(task, str) else task
    rows = train_rows[train_rows["label"].isin(task.classes) & (train_rows["origin"] == mf.REAL)]
    others = rows[rows["label"] != POSITIVE]
    covid = rows[rows["label"] == POSITIVE]
    n_majority = int(others["label"].value_counts().max()) if len(others) else 0
    order = covid_patient_order(rows, seed)
    images_per_patient = covid.groupby("patient_id").size()
    if ratio is None:
        chosen, target = order, len(covid)
    else:
        target = max(1, int(round(n_majority / ratio)))
        cumulative = np.cumsum([images_per_patient[p] for p in order])
        if len(cumulative) == 0:
            chosen = []
        else:
            k = int(np.searchsorted(cumulative, target))  # first prefix reaching the target
            k = min(k, len(cumulative) - 1)
            if k > 0 and abs(cumulative[k - 1] - target) <= abs(cumulative[k] - target):
                k -= 1
            chosen = order[: k + 1]
    kept = covid[covid["patient_id"].isin(chosen)]
    n_covid = len(kept)
    info = {"covid_target": int(target), "n_majority": n_majority, "n_train_covid_patients": len(chosen),
            "ratio_achieved": float(n_majority / n_covid) if n_covid else float("inf")}
    return pd.concat([others, kept]), info


def training_rows(manifest: pd.DataFrame, task: Task | str, condition: Condition | str, ratio: int | None,
                  seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The training set of one cell and its counts (``n_train_<class>``, ``n_synthetic``, ...)."""
    task = TASKS[task] if isinstance(task, str) else task
    condition = CONDITIONS[condition] if isinstance(condition, str) else condition
    real_train = real_rows(manifest)
    real_train = real_train[real_train["split"] == "train"]
    rows, info = subsample_covid(real_train, task, ratio, seed)
    if not condition.real_covid:
        rows = rows[rows["label"] != POSITIVE]
        info.update(covid_target=0, n_train_covid_patients=0, ratio_achieved=float("inf"))
    synthetic = synthetic_rows(manifest, condition.generators)
    train = pd.concat([rows, synthetic])
    counts = rows["label"].value_counts()
    info.update({
        "n_train_normal": int(counts.get("normal", 0)),
        "n_train_pneumonia": int(counts.get("pneumonia", 0)),
        "n_train_covid_real": int(counts.get(POSITIVE, 0)),
        "n_synthetic": int(len(synthetic)),
        **{f"n_synthetic_{g.lower()}": int((synthetic["origin"].map(generator_of) == g).sum())
           for g in ("G_NC", "G_PC", *SOURCELESS_GENERATORS)},
    })
    info["n_train_covid"] = info["n_train_covid_real"] + info["n_synthetic"]
    return train, info


def passing_lung_qc(manifest: pd.DataFrame, input_mode: str) -> tuple[pd.DataFrame, int]:
    """``(rows, n_left_out)``: for a lung input mode, the manifest without the images whose
    predicted lung mask failed notebook 02's quality control (``lung_qc_pass`` "False": an
    arm taken for a lung, one lung missing, ...); their lungs-only or lungs-removed image
    would show the wrong region. ``"whole"`` keeps every row."""
    if input_mode == "whole":
        return manifest, 0
    failed = failed_lung_qc(manifest)
    return manifest[~failed], int(failed.sum())


def lung_masks_available(manifest: pd.DataFrame, input_mode: str = "lung_masked",
                         mask_column: str | None = None) -> tuple[bool, str]:
    """``(True, "")`` when every real row has what ``input_mode`` needs (notebook 02's predicted
    lung mask, or its ready-made lung image), else ``(False, reason)``; ``"whole"`` needs nothing.

    ``mask_column="ground_truth"`` asks for the manifest's reference masks instead (phantom).
    """
    if input_mode == "whole":
        return True, ""
    real = real_rows(manifest)
    if mask_column == GROUND_TRUTH:
        missing = sum(mask_layout(row) is None for row in real.to_dict("records"))
        return (True, "") if not missing else (False, f"{missing} real image(s) have no reference lung mask")
    if mask_column is not None:
        if mask_column not in manifest.columns:
            return False, f"mask_column {mask_column!r} is not a manifest column"
        missing = int(real[mask_column].astype(str).str.strip().eq("").sum())
        return (True, "") if not missing else (False, f"{missing} real image(s) have no mask in {mask_column!r}")
    columns = [c for c in (PRECOMPUTED_COLUMNS.get(input_mode), *PRED_MASK_COLUMNS) if c and c in manifest.columns]
    if not columns:
        return False, (f"input mode {input_mode!r} needs notebook 02's predicted lung masks "
                       f"({PRED_MASK_COLUMNS[0]!r}); the manifest has none - run notebook 02 first")
    has = np.zeros(len(real), dtype=bool)
    for column in columns:
        has |= real[column].astype(str).str.strip().ne("").to_numpy()
    if not has.all():
        return False, f"{int((~has).sum())} real image(s) have no predicted lung mask for input mode {input_mode!r}"
    return True, ""


def available_conditions(manifest: pd.DataFrame, conditions: Sequence[str] = DEFAULT_CONDITIONS, *,
                         input_mode: str = "whole", mask_column: str | None = None) -> dict[str, str]:
    """Why each condition cannot run on ``manifest`` (``{name: reason}``; runnable ones are absent)."""
    reasons: dict[str, str] = {}
    masks_ok, masks_reason = lung_masks_available(manifest, input_mode, mask_column)
    made_by = manifest["origin"].map(generator_of)
    in_train = manifest["split"] == "train"
    for name in conditions:
        condition = CONDITIONS[name]
        if not masks_ok:
            reasons[name] = masks_reason
            continue
        missing = [g for g in condition.generators if not ((made_by == g) & in_train).any()]
        if missing:
            makers = " and ".join(sorted({_MADE_IN.get(g, "the notebook that makes them") for g in missing}))
            reasons[name] = (f"needs synthetic COVID-19 images from {' and '.join(missing)} in the train split; "
                             f"the manifest has none (run {makers} first)")
            continue
        if condition.generators and input_mode != "whole":
            synthetic = manifest[made_by.isin(condition.generators) & in_train]
            ok, why = lung_masks_available(synthetic.assign(origin=mf.REAL), input_mode, mask_column)
            if not ok:
                reasons[name] = f"synthetic images: {why}"
    return reasons


def task_problems(manifest: pd.DataFrame, tasks: Sequence[str] = tuple(TASKS)) -> dict[str, str]:
    """Why each task cannot be trained and tested on ``manifest`` (``{task: reason}``; runnable ones absent).

    A task needs real images of every class in the train, val (model selection,
    threshold) and test splits.
    """
    real = real_rows(manifest)
    problems = {}
    for name in tasks:
        missing = []
        for split in mf.SPLITS:
            present = set(real.loc[real["split"] == split, "label"])
            absent = [c for c in TASKS[name].classes if c not in present]
            if absent:
                missing.append(f"no {', '.join(absent)} image in {split}")
        if missing:
            problems[name] = "; ".join(missing) + " (too few patients; use a larger cohort)"
    return problems


def training_set_table(manifest: pd.DataFrame, config: GridConfig, seed: int | None = None) -> pd.DataFrame:
    """Training-set sizes of every task x condition x imbalance for one seed (default: the first).

    Columns: ``task, condition, imbalance``, the ``n_train_*`` / ``n_synthetic`` counts of
    :func:`training_rows`, ``covid_target`` and ``ratio_achieved``. Conditions the
    manifest cannot support are left out.
    """
    seed = config.seeds[0] if seed is None else int(seed)
    blocked = available_conditions(manifest, config.conditions, input_mode=config.input_mode,
                                   mask_column=config.mask_column)
    rows = []
    for task in config.tasks:
        for ratio in config.ratios:
            for condition in config.conditions:
                if condition in blocked:
                    continue
                real_covid = CONDITIONS[condition].real_covid
                _, info = training_rows(manifest, task, condition, ratio if real_covid else None, seed)
                rows.append({"task": task, "condition": condition, "imbalance": imbalance_name(ratio), **info})
    columns = ["task", "condition", "imbalance", "n_train_normal", "n_train_pneumonia", "n_train_covid_real",
               "n_train_covid_patients", "n_synthetic", "n_train_covid", "covid_target", "ratio_achieved"]
    return pd.DataFrame(rows, columns=columns)
