"""Shortcut controls: can the grid's classifier predict the site, and what does it read
outside the lungs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cxrlib.data import manifest as mf
from cxrlib.stages.classifiers.design import POSITIVE, TASKS, GridConfig
from cxrlib.stages.classifiers.grid import Cell, run_cell, tidy_results
from cxrlib.stages.classifiers.training_sets import (
    as_frame,
    evaluation_rows,
    leakage_checked,
    lung_masks_available,
    passing_lung_qc,
    real_rows,
    task_problems,
    training_rows,
)


def site_target(manifest: pd.DataFrame, candidates: Sequence[str] = ("site", "source")) -> tuple[str | None, str]:
    """The column a site classifier can learn: ``(column, "")``, or ``(None, reason)``.

    A candidate needs at least two values among the real training images, and every
    value of the train split present in val and test (for the AUCs).
    """
    real = real_rows(manifest)
    reasons = []
    for column in candidates:
        if column not in manifest.columns:
            reasons.append(f"no {column!r} column")
            continue
        values = {split: set(real.loc[real["split"] == split, column].astype(str)) - {""} for split in mf.SPLITS}
        if len(values["train"]) < 2:
            reasons.append(f"{column!r} has {len(values['train'])} value(s) in the train split")
            continue
        missing = {split: sorted(values["train"] - values[split]) for split in ("val", "test")}
        if any(missing.values()):
            reasons.append(f"{column!r} values missing from val/test: {missing}")
            continue
        return column, ""
    return None, "no acquisition-site column to predict: " + "; ".join(reasons)


def site_control(manifest: pd.DataFrame | str | os.PathLike, config: GridConfig, run_dir: str | os.PathLike, *,
                 target: str = "site", arch: str | None = None, seed: int | None = None) -> pd.DataFrame:
    """Train the grid's classifier to predict ``target`` (acquisition site / source) from the same images.

    Every real image of every class is used (train / val / test splits as they are);
    one results row with the test ``auc`` (macro one-vs-rest for more than two sites)
    and ``balanced_accuracy`` (argmax), each with a 95 % bootstrap interval over test
    patients, ``chance_balanced_accuracy`` (1 / number of sites) and the per-site
    ``confusion_matrix``. The cell lives in ``run_dir/controls/site/<arch>/seed<k>/``.
    """
    manifest = leakage_checked(as_frame(manifest))
    arch = arch or config.archs[0]
    seed = config.seeds[0] if seed is None else int(seed)
    real = real_rows(manifest)
    real = real[real[target].astype(str) != ""].assign(label=lambda rows: rows[target].astype(str))
    classes = sorted(real.loc[real["split"] == "train", "label"].unique())
    real = real[real["label"].isin(classes)]
    train, val, test = (real[real["split"] == split] for split in mf.SPLITS)
    cell = Cell(key={"control": f"predict {target}", "arch": arch, "seed": seed},
                 folder=Path(run_dir) / "controls" / "site" / arch / f"seed{seed}", train=train, val=val, test=test,
                 train_config=config.classifier_config(arch, classes, seed), positive=None,
                 info={"target": target, "classes": ", ".join(classes), "n_train": int(len(train)),
                       "chance_balanced_accuracy": 1.0 / len(classes)})
    log = print if config.progress else None
    row = run_cell(cell, n_boot=config.n_boot, boot_seed=config.boot_seed, base=Path(run_dir), log=log)
    return tidy_results(pd.DataFrame([row]))


def _qc_mode(modes: Sequence[str]) -> str:
    return "lung_masked" if set(modes) - {"whole"} else "whole"


def lung_control_problem(manifest: pd.DataFrame, task: str,
                         modes: Sequence[str] = ("whole", "lung_masked", "lungs_removed"),
                         mask_column: str | None = None) -> str:
    """Why :func:`lung_control` cannot run on ``manifest`` (``""`` when it can): an unknown task,
    a mode without the lung masks it needs, or too few images for ``task`` once the images
    whose lung mask failed quality control are left out (their number is named)."""
    if task not in TASKS:
        return f"unknown task {task!r}; one of {sorted(TASKS)}"
    for mode in modes:
        ok, why = lung_masks_available(manifest, mode, mask_column)
        if not ok:
            return why
    rows, left_out = passing_lung_qc(manifest, _qc_mode(modes))
    problem = task_problems(rows, [task]).get(task)
    if problem:
        return problem + (f", after leaving out {left_out} image(s) whose lung mask failed quality control"
                          if left_out else "")
    return ""


def lung_control(manifest: pd.DataFrame | str | os.PathLike, config: GridConfig, run_dir: str | os.PathLike, *,
                 task: str = "normal_vs_covid", modes: Sequence[str] = ("whole", "lung_masked", "lungs_removed"),
                 arch: str | None = None, seed: int | None = None) -> pd.DataFrame:
    """The ``real``-condition disease classifier trained and tested on each input mode in ``modes``.

    ``lung_masked`` shows the lungs only, ``lungs_removed`` everything but the lungs
    (notebook 02's predicted masks); a ``lungs_removed`` model that still separates the
    classes reads non-lung cues (text, devices, site). Every real training image of the
    task is used (no subsampling: the control asks what the images carry, where the
    classifier is strongest). One row per mode with the grid's metrics; cells live in
    ``run_dir/controls/lungs/<task>/<arch>/<mode>/seed<k>/``.
    """
    manifest = leakage_checked(as_frame(manifest))
    problem = lung_control_problem(manifest, task, modes, config.mask_column)
    if problem:
        raise ValueError(f"lung control {task}: {problem}")
    # images whose lung mask failed quality control are left out of every mode (so that the
    # modes are compared on the same images), and counted
    manifest, left_out = passing_lung_qc(manifest, _qc_mode(modes))
    arch = arch or config.archs[0]
    seed = config.seeds[0] if seed is None else int(seed)
    task_spec = TASKS[task]
    train, info = training_rows(manifest, task_spec, "real", None, seed)
    rows = []
    log = print if config.progress else None
    for mode in modes:
        cell = Cell(key={"control": "lung input", "task": task, "arch": arch, "input_mode": mode, "seed": seed},
                     folder=Path(run_dir) / "controls" / "lungs" / task / arch / mode / f"seed{seed}",
                     train=train, val=evaluation_rows(manifest, task_spec, "val"),
                     test=evaluation_rows(manifest, task_spec, "test"),
                     train_config=config.classifier_config(arch, task_spec.classes, seed, input_mode=mode),
                     positive=POSITIVE, info={**info, "n_left_out_lung_qc": left_out})
        rows.append(run_cell(cell, n_boot=config.n_boot, boot_seed=config.boot_seed,
                              base=Path(run_dir), log=log))
    return tidy_results(pd.DataFrame(rows))
