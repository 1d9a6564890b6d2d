"""Classifier experiments (notebook 04): the imbalance x synthetic-data grid and shortcut controls.

Zunair & Hamza (2021) ask whether CycleGAN-made COVID-19 images help a classifier that has
few real COVID-19 images. :func:`run_grid` answers it for every cell of
``task x architecture x condition x imbalance x seed``:

- tasks (:data:`TASKS`): Normal vs COVID-19, Pneumonia vs COVID-19, and the 3-class task
  Normal / Pneumonia / COVID-19;
- conditions (:data:`CONDITIONS`): ``real`` (real images only), ``real_oversample`` (real
  images, balanced oversampling and heavy augmentation, as Minaee et al. 2020),
  ``real_gnc`` (+ G_NC synthetic COVID-19), ``real_gnc_gpc`` (+ G_NC + G_PC),
  ``synthetic_only`` (synthetic COVID-19, no real COVID-19 image in training) and
  ``real_diffusion`` (+ COVID-19-conditioned samples of notebook 06's diffusion model; not in
  the default grid, since notebook 06 runs after notebook 04: asking for it makes notebook 04
  read notebook 06's manifest, the optional edge declared in :data:`cxrlib.stages.STAGES`);
- imbalance: ``ratios`` r give 1 real COVID-19 training image per r images of the largest
  other class of the task; whole COVID-19 *patients* are drawn in a seeded order (the same
  order for every ratio, task and condition of a seed, so smaller sets are nested in
  larger ones and conditions are compared on the same real images). Validation and test
  splits are never subsampled;
- seeds: each seed draws its own COVID-19 patients, initial weights, batches and augmentation.

Synthetic images only ever enter TRAINING sets, and only when their source image is in the
train split (the manifest leakage check runs first); generators without a source image
(:data:`SOURCELESS_GENERATORS`, the diffusion model) contribute their train-split rows. Every cell trains with
:func:`cxrlib.train.classifier.train_classifier`: the validation split chooses the epoch and
the operating threshold (Youden's J on the COVID-19 probability, also for the 3-class task);
the test split is predicted once and scored with 95 % bootstrap intervals over test
*patients*. A cell lives in ``run_dir/<task>/<arch>/<condition>/<imbalance>/seed<k>/``
(checkpoints, ``predictions.csv``, ``cell.json``); a cell whose ``cell.json`` matches the
current settings and data is loaded instead of retrained, so a re-opened notebook does not
retrain and a killed grid resumes.

Across seeds, :func:`summarize_over_seeds` and :func:`compare_conditions` report the
seed-mean of a metric with a bootstrap interval over test patients: every resample draws
test patients with replacement, scores each seed's model on that same resample at its own
validation threshold and averages over seeds. The interval covers test-set sampling, not
the spread between training runs, which is reported next to it (per-seed values).

Shortcut controls: :func:`site_control` trains the same classifier to predict the
acquisition site (or source) from the same images; :func:`lung_control` trains the disease
classifier on lungs-only and lungs-removed images (Maguolo & Nanni 2021; DeGrave et al.
2021).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from torch.utils.data import Dataset

from cxrlib import runs
from cxrlib.data import manifest as mf
from cxrlib.data.classification import (
    GROUND_TRUTH,
    INPUT_MODES,
    PRECOMPUTED_COLUMNS,
    PRED_MASK_COLUMNS,
    ClassificationDataset,
    make_augment,
    make_label_map,
)
from cxrlib.data.datasets import mask_layout
from cxrlib.evaluate.classification import (
    choose_threshold,
    expected_calibration_error,
    metrics_with_ci,
    multiclass_metrics,
)
from cxrlib.evaluate.stats import bootstrap_indices
from cxrlib.models.classifiers import ARCHITECTURES
from cxrlib.settings import from_mapping
from cxrlib.train.classifier import ClassifierTrainConfig, predict_proba, train_classifier

#: The class every task is about (the binary tasks' positive class).
POSITIVE = "covid"
#: Stages whose manifest notebook 04 can read, latest first.
#: Generators that make images from noise, not from a source image (``origin`` ``<generator>:<checkpoint>``).
SOURCELESS_GENERATORS: tuple[str, ...] = ("diffusion",)
#: Notebook that makes each generator's images (for the messages of :func:`available_conditions`).
_MADE_IN = {"G_NC": "notebook 03", "G_PC": "notebook 03", "diffusion": "notebook 06"}


@dataclass(frozen=True)
class Task:
    """A classification task: ``classes`` in index order (binary: the last is positive)."""

    name: str
    classes: tuple[str, ...]
    title: str

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2


TASKS: dict[str, Task] = {
    "normal_vs_covid": Task("normal_vs_covid", ("normal", "covid"), "Normal vs COVID-19"),
    "pneumonia_vs_covid": Task("pneumonia_vs_covid", ("pneumonia", "covid"), "Pneumonia vs COVID-19"),
    "three_class": Task("three_class", ("normal", "pneumonia", "covid"), "Normal / Pneumonia / COVID-19"),
}


@dataclass(frozen=True)
class Condition:
    """What a training set holds besides the task's real non-COVID-19 images.

    ``real_covid``: the (subsampled) real COVID-19 images; ``generators``: synthetic
    COVID-19 images of these generators (origin ``<generator>:...``); ``oversample``:
    balanced sampling + the heavy augmentation instead of a class-weighted loss.
    """

    name: str
    title: str
    real_covid: bool = True
    generators: tuple[str, ...] = ()
    oversample: bool = False


CONDITIONS: dict[str, Condition] = {
    "real": Condition("real", "real only"),
    "real_oversample": Condition("real_oversample", "real + oversampling", oversample=True),
    "real_gnc": Condition("real_gnc", "real + G_NC", generators=("G_NC",)),
    "real_gnc_gpc": Condition("real_gnc_gpc", "real + G_NC + G_PC", generators=("G_NC", "G_PC")),
    "synthetic_only": Condition("synthetic_only", "synthetic only", real_covid=False,
                                generators=("G_NC", "G_PC")),
    "real_diffusion": Condition("real_diffusion", "real + diffusion", generators=("diffusion",)),
}
#: The grid's conditions unless chosen otherwise (``real_diffusion`` needs notebook 06, which runs later).
DEFAULT_CONDITIONS: tuple[str, ...] = ("real", "real_oversample", "real_gnc", "real_gnc_gpc", "synthetic_only")


def imbalance_name(ratio: int | None) -> str:
    """``20`` -> ``"1:20"``; ``None`` (every real COVID-19 training image) -> ``"all"``."""
    return "all" if ratio is None else f"1:{int(ratio)}"


def _imbalance_folder(ratio: int | None) -> str:
    return imbalance_name(ratio).replace(":", "-")


@dataclass
class GridConfig:
    """Settings of :func:`run_grid` (the grid's axes, then one training recipe for every cell).

    Axes: ``tasks`` (keys of :data:`TASKS`), ``archs`` (keys of
    :data:`~cxrlib.models.classifiers.ARCHITECTURES`), ``conditions`` (keys of
    :data:`CONDITIONS`), ``ratios`` (1:r real COVID-19 to the largest other class),
    ``seeds``.

    Training (see :class:`~cxrlib.train.classifier.ClassifierTrainConfig`): ``image_size``,
    ``input_mode``, ``mask_column``, ``epochs``, ``steps_per_epoch`` (a cap on optimizer
    steps per epoch, the same for every condition, so that conditions with more images do
    not also get more training; ``None``: whole passes), ``batch_size``, ``lr``,
    ``weight_decay``, ``patience`` (``None``: train every epoch, keep the best validation
    one), ``augment`` (every condition but ``real_oversample``), ``oversample_augment``,
    ``loss_imbalance`` (``"none"``: plain cross-entropy, the validation threshold absorbs
    the imbalance, as in the reproduced works; ``"weighted_loss"``: inverse class
    frequency, which on the phantom at 1:20 over-fits the few COVID-19 images;
    ``real_oversample`` uses the balanced sampler instead), ``weights`` (``None`` or
    ``"imagenet"``), ``device``, ``num_workers`` (DataLoader processes that decode and
    augment while the network trains).

    Evaluation: ``n_boot`` bootstrap resamples of test patients, drawn from ``boot_seed``
    (the same resamples for every cell). ``progress``: print one line per cell.
    """

    tasks: tuple[str, ...] = ("normal_vs_covid", "pneumonia_vs_covid")
    archs: tuple[str, ...] = ("small_cnn",)
    conditions: tuple[str, ...] = DEFAULT_CONDITIONS
    ratios: tuple[int, ...] = (20,)
    seeds: tuple[int, ...] = (0, 1, 2)
    image_size: int = 48
    input_mode: str = "whole"
    mask_column: str | None = None
    epochs: int = 20
    steps_per_epoch: int | None = 16
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int | None = None
    augment: str = "light"
    oversample_augment: str = "heavy"
    loss_imbalance: str = "none"
    weights: str | None = None
    device: str = "auto"
    num_workers: int = 0
    n_boot: int = 1000
    boot_seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("tasks", "archs", "conditions", "ratios", "seeds"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str | int) else tuple(value)
            if not value:
                raise ValueError(f"GridConfig.{name} is empty")
            setattr(self, name, value)
        for name, known in (("tasks", TASKS), ("archs", ARCHITECTURES), ("conditions", CONDITIONS)):
            unknown = [v for v in getattr(self, name) if v not in known]
            if unknown:
                raise ValueError(f"unknown {name} {unknown}; choose from {sorted(known)}")
        self.ratios = tuple(int(r) for r in self.ratios)
        self.seeds = tuple(int(s) for s in self.seeds)
        if min(self.ratios) < 1:
            raise ValueError(f"ratios must be >= 1 (1:r), got {self.ratios}")
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}")
        if self.loss_imbalance not in ("weighted_loss", "none"):
            raise ValueError(f"loss_imbalance must be 'weighted_loss' or 'none', got {self.loss_imbalance!r}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            self.steps_per_epoch = None

    def classifier_config(self, arch: str, classes: Sequence[str], seed: int, *, oversample: bool = False,
                          input_mode: str | None = None) -> ClassifierTrainConfig:
        """The :class:`ClassifierTrainConfig` of one cell."""
        return ClassifierTrainConfig(
            arch=arch, classes=list(classes), weights=self.weights, image_size=self.image_size,
            input_mode=input_mode or self.input_mode, mask_column=self.mask_column,
            augment=self.oversample_augment if oversample else self.augment, epochs=self.epochs,
            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            imbalance="balanced_sampler" if oversample else self.loss_imbalance, patience=self.patience,
            select_metric="auc", seed=seed, device=self.device, num_workers=self.num_workers,
            max_steps_per_epoch=self.steps_per_epoch, progress=False,
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GridConfig:
        """:func:`cxrlib.settings.from_mapping`, ignoring keys that are not fields (notebook 06 calls it)."""
        return from_mapping(cls, values, strict=False)


# --------------------------------------------------------------------------- input


def grid_config_from_params(params: Mapping[str, Any], **overrides: Any) -> GridConfig:
    """Notebook 04's parameters (its UPPER_CASE names) -> :class:`GridConfig`, the one mapping.

    ``params`` holds at least ``SEED, DEVICE, TASKS, ARCHS, CONDITIONS, RATIOS, N_SEEDS,
    IMAGE_SIZE, INPUT_MODE, EPOCHS, STEPS_PER_EPOCH, BATCH_SIZE, LEARNING_RATE,
    LOSS_IMBALANCE, N_BOOT`` (notebook 04's globals, or
    ``cxrlib.stages.runtime.stage_parameters("04", profile)`` from another notebook).
    Seeds are ``SEED, SEED + 1, ...``; ``STEPS_PER_EPOCH = 0`` means whole passes.
    ``overrides`` replace fields afterwards (e.g. the tasks and conditions that can run).
    """
    seed = int(params["SEED"])
    values: dict[str, Any] = dict(
        tasks=params["TASKS"], archs=params["ARCHS"], conditions=params["CONDITIONS"], ratios=params["RATIOS"],
        seeds=[seed + k for k in range(int(params["N_SEEDS"]))], image_size=params["IMAGE_SIZE"],
        input_mode=params["INPUT_MODE"], epochs=params["EPOCHS"], steps_per_epoch=params["STEPS_PER_EPOCH"] or None,
        batch_size=params["BATCH_SIZE"], lr=params["LEARNING_RATE"], loss_imbalance=params["LOSS_IMBALANCE"],
        device=params["DEVICE"], n_boot=params["N_BOOT"], boot_seed=seed)
    values.update(overrides)
    return GridConfig(**values)


def _read(manifest: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    return manifest if isinstance(manifest, pd.DataFrame) else mf.read_manifest(manifest)


def _generator(origin: str) -> str:
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
    made_by = manifest["origin"].map(_generator)
    rows = manifest[made_by.isin(generators) & (manifest["label"] == POSITIVE) & (manifest["split"] == "train")]
    sources = rows["origin"].map(lambda origin: mf.parse_origin(origin)[2])
    real = real_rows(manifest)
    train_ids = set(real.loc[real["split"] == "train", "image_id"])
    sourceless = rows["origin"].map(_generator).isin(SOURCELESS_GENERATORS) & sources.eq("")
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
    train.attrs = dict(manifest.attrs)
    counts = rows["label"].value_counts()
    info.update({
        "n_train_normal": int(counts.get("normal", 0)),
        "n_train_pneumonia": int(counts.get("pneumonia", 0)),
        "n_train_covid_real": int(counts.get(POSITIVE, 0)),
        "n_synthetic": int(len(synthetic)),
        **{f"n_synthetic_{g.lower()}": int((synthetic["origin"].map(_generator) == g).sum())
           for g in ("G_NC", "G_PC", *SOURCELESS_GENERATORS)},
    })
    info["n_train_covid"] = info["n_train_covid_real"] + info["n_synthetic"]
    return train, info


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
    made_by = manifest["origin"].map(_generator)
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


# --------------------------------------------------------------------------- decoded once


class _CellDataset(Dataset):
    """Some images of a shared :class:`ClassificationDataset`, with a cell's labels, augmentation and seed.

    Items are ``(image (1, S, S) float32 in [0, 1], label int)`` as from the shared dataset;
    ``labels`` (what ``train_classifier`` reads) are the cell's class indices.
    """

    def __init__(self, shared: ClassificationDataset, positions: Sequence[int], labels: Sequence[int], *,
                 augment: str | None, seed: int) -> None:
        self.source = copy.copy(shared)  # a shallow copy: the decoded images stay shared
        self.source.augment = make_augment(augment)
        self.source.seed = int(seed)
        self.positions = np.asarray(positions, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, _ = self.source[int(self.positions[index])]
        return image, int(self.labels[index])


class SharedImages:
    """Images decoded and resized once for one input mode, shared by every cell of a grid.

    Decoding a PNG and resizing it costs several milliseconds; the grid's cells reuse the
    same few hundred images dozens of times. ``rows``: every manifest row any cell needs;
    they are decoded when the first subset is asked for (a grid whose cells are all
    trained already decodes nothing).
    """

    def __init__(self, rows: pd.DataFrame, *, root: str | os.PathLike | None, image_size: int, input_mode: str,
                 mask_column: str | None = None) -> None:
        self.rows = rows.drop_duplicates("image_id")
        self.settings = dict(root=root, image_size=image_size, input_mode=input_mode, mask_column=mask_column)
        self._dataset: ClassificationDataset | None = None
        self.position: dict[str, int] = {}

    @property
    def dataset(self) -> ClassificationDataset:
        """The shared dataset (labels unused), decoded on first use."""
        if self._dataset is None:
            self._dataset = ClassificationDataset(self.rows, label_map={}, strict_labels=False, **self.settings)
            self.position = {image_id: i for i, image_id in enumerate(self._dataset.image_ids)}
        return self._dataset

    def subset(self, rows: pd.DataFrame, classes: Sequence[str], *, augment: str | None = None,
               seed: int = 0) -> _CellDataset:
        """``rows`` (in order) as a dataset with ``classes`` as label indices; augmented when ``augment``."""
        label_map = make_label_map(classes)
        labels = rows["label"].astype(str).map(label_map)
        if labels.isna().any():
            raise ValueError(f"labels outside {list(classes)}: {sorted(set(rows['label'][labels.isna()]))}")
        dataset = self.dataset
        positions = [self.position[str(image_id)] for image_id in rows["image_id"]]
        return _CellDataset(dataset, positions, labels.astype(int).tolist(), augment=augment, seed=seed)


# --------------------------------------------------------------------------- one cell


_IGNORED_FOR_FINGERPRINT = ("device", "progress", "num_workers")


def _ids(rows: pd.DataFrame) -> list[list[str]]:
    return sorted([str(i), str(label)] for i, label in zip(rows["image_id"], rows["label"], strict=True))


def _fingerprint(train_config: ClassifierTrainConfig, train: pd.DataFrame, val: pd.DataFrame,
                 test: pd.DataFrame, extra: Mapping[str, Any]) -> str:
    """What a cell's results depend on: training settings and the image ids of every split."""
    settings = {k: v for k, v in runs.to_plain(asdict(train_config)).items() if k not in _IGNORED_FOR_FINGERPRINT}
    payload = {"config": settings, "train": _ids(train), "val": _ids(val), "test": _ids(test),
               "extra": runs.to_plain(dict(extra))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class _Cell:
    """One training run and its evaluation."""

    key: dict[str, Any]
    folder: Path
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    train_config: ClassifierTrainConfig
    positive: str | None
    info: dict[str, Any] = field(default_factory=dict)
    shared: SharedImages | None = None

    def data(self, split: str) -> pd.DataFrame | Dataset:
        """The rows of ``split`` (``train``, ``val``, ``test``), as a shared-image dataset when there is one."""
        rows = getattr(self, split)
        if self.shared is None:
            return rows
        return self.shared.subset(rows, self.train_config.classes or [],
                                  augment=self.train_config.augment if split == "train" else None,
                                  seed=self.train_config.seed)


def predictions_frame(rows: pd.DataFrame, prob: np.ndarray, classes: Sequence[str], threshold: float,
                      positive: str | None) -> pd.DataFrame:
    """Test predictions of one model: ids, ``y`` (class index), ``prob_<class>``, and the calls.

    With a ``positive`` class: ``score`` (its probability), ``called`` (``score >=
    threshold``, the validation threshold) and ``pred`` (binary: the class the threshold
    gives; more classes: the argmax class). Without: ``pred`` is the argmax class.
    """
    label_index = {name: i for i, name in enumerate(classes)}
    frame = pd.DataFrame({
        "image_id": rows["image_id"].astype(str).to_numpy(),
        "patient_id": rows["patient_id"].astype(str).to_numpy(),
        "label": rows["label"].astype(str).to_numpy(),
        "y": rows["label"].map(label_index).astype(int).to_numpy(),
    })
    for index, name in enumerate(classes):
        frame[f"prob_{name}"] = prob[:, index]
    argmax = np.asarray(classes, dtype=object)[prob.argmax(axis=1)]
    if positive is None and len(classes) == 2:
        frame["pred"] = np.where(prob[:, 1] >= threshold, classes[1], classes[0])
    elif positive is not None:
        frame["score"] = prob[:, label_index[positive]]
        frame["called"] = frame["score"] >= threshold
        if len(classes) == 2:
            negative = [c for c in classes if c != positive][0]
            frame["pred"] = np.where(frame["called"], positive, negative)
        else:
            frame["pred"] = argmax
    else:
        frame["pred"] = argmax
    return frame


_BINARY_COLUMNS = {"auc_roc": "auc", "pr_auc": "pr_auc", "sensitivity": "sensitivity",
                   "specificity": "specificity", "ppv": "ppv", "npv": "npv", "f1": "f1",
                   "balanced_accuracy": "balanced_accuracy"}


def _with_ci(values: Mapping[str, tuple[float, float, float]], names: Mapping[str, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for source, target in names.items():
        estimate, low, high = values[source]
        out.update({target: estimate, f"{target}_low": low, f"{target}_high": high})
    return out


def score_predictions(predictions: pd.DataFrame, classes: Sequence[str], threshold: float | None,
                      positive: str | None, *, n_boot: int = 1000, boot_seed: int = 0) -> dict[str, Any]:
    """Test metrics with 95 % bootstrap intervals over patients (``<metric>``, ``<metric>_low/_high``).

    With a ``positive`` class (the disease tasks): ``positive``-vs-rest metrics at the
    validation ``threshold`` on its probability (AUC, PR-AUC, sensitivity, specificity,
    PPV, NPV, F1, balanced accuracy) and the ECE of that probability; for more than two
    classes also ``mc_macro_auc`` and ``mc_balanced_accuracy`` (argmax). Without (e.g.
    the site control): ``auc`` (macro one-vs-rest for more than two classes) and
    ``balanced_accuracy`` (argmax); binary ones use ``threshold`` on the second class.
    """
    y = predictions["y"].to_numpy()
    groups = predictions["patient_id"].to_numpy()
    prob = predictions[[f"prob_{c}" for c in classes]].to_numpy()
    result: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*bootstrap resamples lacked a class.*")
        if positive is not None:
            is_positive = (y == list(classes).index(positive)).astype(int)
            score = predictions["score"].to_numpy()
            ci = metrics_with_ci(is_positive, score, threshold, groups=groups, n_boot=n_boot, seed=boot_seed)
            result.update(_with_ci(ci, _BINARY_COLUMNS))
            result["ece"] = expected_calibration_error(is_positive, score)
            result["n_boot_used"] = ci.n_boot_used
            if len(classes) > 2:
                mc = metrics_with_ci(y, prob, groups=groups, n_boot=n_boot, seed=boot_seed, class_names=classes)
                result.update(_with_ci(mc, {"macro_auc": "mc_macro_auc", "balanced_accuracy": "mc_balanced_accuracy"}))
        elif len(classes) == 2:
            ci = metrics_with_ci(y, prob, threshold, groups=groups, n_boot=n_boot, seed=boot_seed)
            result.update(_with_ci(ci, {"auc_roc": "auc", "balanced_accuracy": "balanced_accuracy"}))
            result["n_boot_used"] = ci.n_boot_used
        else:
            ci = metrics_with_ci(y, prob, groups=groups, n_boot=n_boot, seed=boot_seed, class_names=classes)
            result.update(_with_ci(ci, {"macro_auc": "auc", "balanced_accuracy": "balanced_accuracy"}))
            result["n_boot_used"] = ci.n_boot_used
    if len(classes) > 2 or positive is None:
        result["confusion_matrix"] = multiclass_metrics(y, prob, classes)["confusion_matrix"]
    return result


def _count_columns(rows: pd.DataFrame, split: str, positive: str | None) -> dict[str, int]:
    if positive is None:
        return {f"n_{split}": int(len(rows)), f"n_{split}_patients": int(rows["patient_id"].nunique())}
    is_positive = rows["label"] == positive
    return {f"n_{split}_covid": int(is_positive.sum()), f"n_{split}_other": int((~is_positive).sum()),
            f"n_{split}_patients": int(rows["patient_id"].nunique())}


def _run_cell(cell: _Cell, *, root: str | Path | None, n_boot: int, boot_seed: int,
              base: Path, log: Callable[[str], None] | None) -> dict[str, Any]:
    """Train (or load) one cell and score it; returns its results row."""
    classes = list(cell.train_config.classes or [])
    fingerprint = _fingerprint(cell.train_config, cell.train, cell.val, cell.test, {"positive": cell.positive})
    cell_json = cell.folder / "cell.json"
    label = " ".join(f"seed{v}" if k == "seed" else str(v) for k, v in cell.key.items())
    evaluation = {"n_boot": int(n_boot), "boot_seed": int(boot_seed)}
    if cell_json.is_file():
        saved = runs.read_json(cell_json)
        if saved.get("fingerprint") == fingerprint:
            row = dict(saved["row"])
            if saved.get("evaluation") != evaluation:  # rescore the stored predictions
                predictions = pd.read_csv(cell.folder / "predictions.csv", dtype={"image_id": str, "patient_id": str})
                row.update(score_predictions(predictions, classes, row.get("threshold"), cell.positive,
                                             n_boot=n_boot, boot_seed=boot_seed))
                runs.write_json(cell_json, {**saved, "row": row, "evaluation": evaluation})
            row["status"] = "loaded"
            if log:
                log(f"{label}: loaded ({_headline(row)})")
            return row
        warnings.warn(f"{cell.folder}: settings or data changed since this cell was trained; retraining", stacklevel=3)
    cell.folder.mkdir(parents=True, exist_ok=True)
    fingerprint_file = cell.folder / "fingerprint.txt"
    resume = fingerprint_file.is_file() and fingerprint_file.read_text().strip() == fingerprint
    fingerprint_file.write_text(fingerprint + "\n")
    started = time.perf_counter()
    val_data = cell.data("val")
    result = train_classifier(cell.data("train"), val_data, cell.folder, cell.train_config, root=root, resume=resume)
    train_seconds = time.perf_counter() - started
    threshold = result.threshold
    if cell.positive is not None and len(classes) > 2:
        # the 3-class task: the COVID-19-vs-rest threshold, chosen on validation like the binary ones
        val_prob = predict_proba(result, val_data, root=root)
        is_positive = (cell.val["label"] == cell.positive).astype(int).to_numpy()
        threshold = choose_threshold(is_positive, val_prob[:, classes.index(cell.positive)], "youden")
    test_prob = predict_proba(result, cell.data("test"), root=root)
    predictions = predictions_frame(cell.test, test_prob, classes, threshold if threshold is not None else 0.5,
                                    cell.positive)
    predictions.to_csv(cell.folder / "predictions.csv", index=False)
    history = result.history
    row: dict[str, Any] = {
        **cell.key,
        "input_mode": cell.train_config.input_mode,
        "image_size": cell.train_config.image_size,
        **cell.info,
        **_count_columns(cell.val, "val", cell.positive),
        **_count_columns(cell.test, "test", cell.positive),
        **score_predictions(predictions, classes, threshold, cell.positive, n_boot=n_boot, boot_seed=boot_seed),
        "threshold": float(threshold) if threshold is not None else float("nan"),
        "best_epoch": int(result.best_epoch),
        "best_val_auc": float(result.best_val_metric),
        "epochs_run": int(len(history)),
        "train_seconds": round(train_seconds, 2),
        "cell_dir": cell.folder.relative_to(base).as_posix(),
    }
    runs.write_json(cell_json, {"fingerprint": fingerprint, "evaluation": evaluation, "row": row,
                                "classes": classes, "positive": cell.positive})
    row["status"] = "trained"
    if log:
        log(f"{label}: trained in {train_seconds:.0f} s ({_headline(row)})")
    return row


def _headline(row: Mapping[str, Any]) -> str:
    parts = [f"test AUC {row.get('auc', float('nan')):.3f}"]
    if "sensitivity" in row:
        parts.append(f"sensitivity {row['sensitivity']:.2f}")
    if "balanced_accuracy" in row and "sensitivity" not in row:
        parts.append(f"balanced accuracy {row['balanced_accuracy']:.2f}")
    parts.append(f"best epoch {row.get('best_epoch')}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- the grid


def _leakage_checked(manifest: pd.DataFrame) -> pd.DataFrame:
    mf.check_leakage(manifest, raise_on_leak=True)
    return manifest


def grid_cells(manifest: pd.DataFrame, config: GridConfig) -> list[tuple[dict[str, Any], str | None]]:
    """Every ``(cell key, reason it cannot run or None)`` of the grid, in run order."""
    reasons = available_conditions(manifest, config.conditions, input_mode=config.input_mode,
                                   mask_column=config.mask_column)
    cells = []
    for task in config.tasks:
        for arch in config.archs:
            for ratio in config.ratios:
                for condition in config.conditions:
                    for seed in config.seeds:
                        key = {"task": task, "arch": arch, "condition": condition,
                               "imbalance": imbalance_name(ratio), "ratio": ratio, "seed": seed}
                        cells.append((key, reasons.get(condition)))
    return cells


def run_grid(manifest: pd.DataFrame | str | os.PathLike, config: GridConfig | Mapping[str, Any],
             run_dir: str | os.PathLike, *, root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Train (or load) every cell of the grid; one tidy results row per cell.

    ``manifest``: a split manifest (or its path) with real rows and, for the synthetic
    conditions, synthetic COVID-19 rows (``origin`` ``G_NC:...`` / ``G_PC:...``) in the
    train split; the leakage check runs first. A condition the manifest cannot support
    raises (use :func:`available_conditions` to choose the runnable ones).

    Rows: ``task, arch, condition, imbalance, ratio, seed``; the training set
    (``n_train_normal, n_train_pneumonia, n_train_covid_real, n_train_covid_patients,
    n_synthetic, n_train_covid, covid_target, n_majority, ratio_achieved``); val / test
    counts (``n_val_covid, n_val_other, n_test_covid, n_test_other, n_test_patients``);
    COVID-19(-vs-rest) test metrics at the validation threshold, each with ``_low`` /
    ``_high`` bootstrap bounds over test patients (``auc, pr_auc, sensitivity,
    specificity, ppv, npv, f1, balanced_accuracy``; 3-class also ``mc_macro_auc,
    mc_balanced_accuracy``), ``ece``, ``threshold``, ``best_epoch``, ``best_val_auc``,
    ``epochs_run``, ``train_seconds``, ``cell_dir`` (relative to ``run_dir``) and
    ``status`` (``trained`` / ``loaded``). ``attrs["run_dir"]`` is ``run_dir``.

    ``synthetic_only`` cells do not depend on the ratio (no real COVID-19 image is used):
    they are trained once per seed (folder ``synthetic_only/all/``) and repeated in the
    rows of every ratio.
    """
    config = config if isinstance(config, GridConfig) else from_mapping(GridConfig, config, strict=False)
    manifest = _leakage_checked(_read(manifest))
    root = root if root is not None else manifest.attrs.get("root")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cells = grid_cells(manifest, config)
    blocked = {key["condition"]: reason for key, reason in cells if reason}
    blocked.update(task_problems(manifest, config.tasks))
    if blocked:
        raise ValueError("conditions / tasks that cannot run on this manifest: "
                         + "; ".join(f"{name}: {why}" for name, why in blocked.items()))
    log = print if config.progress else None
    shared = None
    if config.input_mode != "patch":  # patch mode draws patches from larger images: no sharing
        made_by = manifest["origin"].map(_generator)
        generators = {g for name in config.conditions for g in CONDITIONS[name].generators}
        labels = {c for name in config.tasks for c in TASKS[name].classes}
        needed = manifest[((made_by == mf.REAL) & manifest["label"].isin(labels))
                          | (made_by.isin(generators) & (manifest["split"] == "train"))]
        shared = SharedImages(needed, root=root, image_size=config.image_size, input_mode=config.input_mode,
                              mask_column=config.mask_column)
    rows = []
    for number, (key, _) in enumerate(cells, start=1):
        task = TASKS[key["task"]]
        condition = CONDITIONS[key["condition"]]
        ratio = key["ratio"] if condition.real_covid else None
        train, info = training_rows(manifest, task, condition, ratio, key["seed"])
        folder = (run_dir / task.name / key["arch"] / condition.name / _imbalance_folder(ratio)
                  / f"seed{key['seed']}")
        cell = _Cell(
            key={k: key[k] for k in ("task", "arch", "condition", "imbalance", "seed")},
            folder=folder, train=train, val=evaluation_rows(manifest, task, "val"),
            test=evaluation_rows(manifest, task, "test"),
            train_config=config.classifier_config(key["arch"], task.classes, key["seed"],
                                                  oversample=condition.oversample),
            positive=POSITIVE, info=info, shared=shared,
        )
        cell_log = (lambda text, n=number: log(f"[{n}/{len(cells)}] {text}")) if log else None
        row = _run_cell(cell, root=root, n_boot=config.n_boot, boot_seed=config.boot_seed, base=run_dir,
                        log=cell_log)
        row.update(imbalance=key["imbalance"], ratio=key["ratio"])
        rows.append(row)
    results = _tidy(pd.DataFrame(rows))
    results.attrs["run_dir"] = str(run_dir)
    return results


_FIRST_COLUMNS = ("task", "arch", "condition", "imbalance", "ratio", "seed", "input_mode", "image_size",
                  "n_train_normal", "n_train_pneumonia", "n_train_covid_real", "n_train_covid_patients",
                  "n_synthetic", "n_synthetic_g_nc", "n_synthetic_g_pc", "n_synthetic_diffusion", "n_train_covid", "covid_target",
                  "n_majority", "ratio_achieved", "n_val_covid", "n_val_other", "n_val_patients", "n_test_covid",
                  "n_test_other", "n_test_patients")


def _tidy(frame: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in _FIRST_COLUMNS if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def read_predictions(results: pd.DataFrame, run_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Every cell's test predictions in one long table, keyed by the results' grid columns."""
    run_dir = Path(run_dir if run_dir is not None else results.attrs["run_dir"])
    keys = [c for c in ("task", "arch", "condition", "imbalance", "seed", "control", "input_mode")
            if c in results.columns]
    parts = []
    for row in results.to_dict("records"):
        part = pd.read_csv(run_dir / row["cell_dir"] / "predictions.csv", dtype={"image_id": str, "patient_id": str})
        for key in keys:
            part[key] = row[key]
        part["threshold"] = row.get("threshold")
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=[*keys, "image_id", "patient_id", "label", "y"])
    frame = pd.concat(parts, ignore_index=True)
    return frame[keys + [c for c in frame.columns if c not in keys]]


# --------------------------------------------------------------------------- over seeds


def _rank_auc(positive: np.ndarray, score: np.ndarray) -> float:
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


#: Seed-pooled metrics: ``f(is_positive bool, score, called bool) -> float``.
SEED_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "sensitivity": lambda pos, score, called: _mean(called[pos]),
    "specificity": lambda pos, score, called: _mean(~called[~pos]),
    "auc": lambda pos, score, called: _rank_auc(pos, score),
    "balanced_accuracy": lambda pos, score, called: (_mean(called[pos]) + _mean(~called[~pos])) / 2,
    "ppv": lambda pos, score, called: _mean(pos[called]),
}


def _seed_pooled(predictions: pd.DataFrame, group_by: Sequence[str], metrics: Sequence[str], n_boot: int,
                 seed: int) -> dict[tuple, dict[str, Any]]:
    """Per group: per-seed estimates and the bootstrap distribution of the seed-mean, per metric.

    All groups of one task are scored on the same resamples of that task's test patients.
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
        boot: dict[tuple, dict[str, list[float]]] = {}
        for rows in bootstrap_indices(len(ids), n_boot=n_boot, seed=seed, groups=groups):
            pos = is_positive[rows]
            if pos.all() or not pos.any():
                continue
            per_group: dict[tuple, dict[str, list[float]]] = {}
            for g, _, score, called in models:
                values = per_group.setdefault(g, {m: [] for m in metrics})
                for m in metrics:
                    values[m].append(SEED_METRICS[m](pos, score[rows], called[rows]))
            for g, values in per_group.items():
                target = boot.setdefault(g, {m: [] for m in metrics})
                for m in metrics:
                    target[m].append(float(np.nanmean(values[m])))
        for g in dict.fromkeys(key for key, *_ in models):
            seeds = sorted(s for key, s, *_ in models if key == g)
            out[(task, *g)] = {
                "seeds": seeds,
                "per_seed": {m: [estimates[(g, s)][m] for s in seeds] for m in metrics},
                "boot": {m: np.asarray(boot.get(g, {}).get(m, []), dtype=np.float64) for m in metrics},
            }
    return out


def _interval(samples: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def summarize_over_seeds(predictions: pd.DataFrame, metrics: Sequence[str] = ("sensitivity", "specificity", "auc"),
                         *, group_by: Sequence[str] = ("arch", "condition", "imbalance"), n_boot: int = 1000,
                         seed: int = 0) -> pd.DataFrame:
    """Seed-mean of each metric per task and ``group_by`` group, with a 95 % interval over test patients.

    ``predictions``: :func:`read_predictions` output (disease tasks: ``score``, ``called``).
    ``estimate``: the mean over seeds of each seed's test metric (at its own validation
    threshold). ``low`` / ``high``: percentiles of the same seed-mean over ``n_boot``
    resamples of test patients (the same resamples for every group of a task). Also
    ``n_seeds``, ``seed_min`` / ``seed_max`` / ``seed_sd`` (spread between training runs).
    """
    pooled = _seed_pooled(predictions, group_by, metrics, n_boot, seed)
    rows = []
    for key, entry in pooled.items():
        for metric in metrics:
            per_seed = np.asarray(entry["per_seed"][metric], dtype=np.float64)
            low, high = _interval(entry["boot"][metric])
            rows.append({"task": key[0], **dict(zip(group_by, key[1:], strict=True)), "metric": metric,
                         "estimate": float(np.nanmean(per_seed)), "low": low, "high": high,
                         "n_seeds": len(per_seed), "seed_min": float(np.nanmin(per_seed)),
                         "seed_max": float(np.nanmax(per_seed)),
                         "seed_sd": float(np.nanstd(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan")})
    return pd.DataFrame(rows)


def compare_conditions(predictions: pd.DataFrame, baseline: str = "real", treatment: str = "real_gnc_gpc",
                       metrics: Sequence[str] = ("sensitivity", "auc"), *, n_boot: int = 1000,
                       seed: int = 0) -> pd.DataFrame:
    """``treatment`` minus ``baseline`` per task, architecture and imbalance (seed-means, paired bootstrap).

    One row per ``(task, arch, imbalance, metric)``: ``baseline`` and ``treatment``
    seed-means with their 95 % intervals and the ``difference`` with its interval, all
    from the same resamples of test patients (so the difference interval accounts for
    both models seeing the same patients). Per-seed values are in ``baseline_per_seed``
    / ``treatment_per_seed``.
    """
    chosen = predictions[predictions["condition"].isin([baseline, treatment])]
    pooled = _seed_pooled(chosen, ("arch", "imbalance", "condition"), metrics, n_boot, seed)
    rows = []
    pairs = sorted({key[:3] for key in pooled})
    for task, arch, imbalance in pairs:
        base, treat = pooled.get((task, arch, imbalance, baseline)), pooled.get((task, arch, imbalance, treatment))
        if base is None or treat is None:
            continue
        for metric in metrics:
            b_seed = np.asarray(base["per_seed"][metric], dtype=np.float64)
            t_seed = np.asarray(treat["per_seed"][metric], dtype=np.float64)
            b_boot, t_boot = base["boot"][metric], treat["boot"][metric]
            n = min(len(b_boot), len(t_boot))
            rows.append({
                "task": task, "arch": arch, "imbalance": imbalance, "metric": metric,
                "baseline": baseline, "treatment": treatment,
                "baseline_estimate": float(np.nanmean(b_seed)), **_named_interval("baseline", b_boot),
                "treatment_estimate": float(np.nanmean(t_seed)), **_named_interval("treatment", t_boot),
                "difference": float(np.nanmean(t_seed) - np.nanmean(b_seed)),
                **_named_interval("difference", t_boot[:n] - b_boot[:n]),
                "baseline_per_seed": [round(v, 4) for v in b_seed.tolist()],
                "treatment_per_seed": [round(v, 4) for v in t_seed.tolist()],
                "n_seeds": int(min(len(b_seed), len(t_seed))),
            })
    return pd.DataFrame(rows)


def _named_interval(name: str, samples: np.ndarray) -> dict[str, float]:
    low, high = _interval(samples)
    return {f"{name}_low": low, f"{name}_high": high}


# --------------------------------------------------------------------------- shortcut controls


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
                 target: str = "site", arch: str | None = None, seed: int | None = None,
                 root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Train the grid's classifier to predict ``target`` (acquisition site / source) from the same images.

    Every real image of every class is used (train / val / test splits as they are);
    one results row with the test ``auc`` (macro one-vs-rest for more than two sites)
    and ``balanced_accuracy`` (argmax), each with a 95 % bootstrap interval over test
    patients, ``chance_balanced_accuracy`` (1 / number of sites) and the per-site
    ``confusion_matrix``. The cell lives in ``run_dir/controls/site/<arch>/seed<k>/``.
    """
    manifest = _leakage_checked(_read(manifest))
    root = root if root is not None else manifest.attrs.get("root")
    arch = arch or config.archs[0]
    seed = config.seeds[0] if seed is None else int(seed)
    real = real_rows(manifest)
    real = real[real[target].astype(str) != ""].assign(label=lambda rows: rows[target].astype(str))
    classes = sorted(real.loc[real["split"] == "train", "label"].unique())
    real = real[real["label"].isin(classes)]
    train, val, test = (real[real["split"] == split] for split in mf.SPLITS)
    cell = _Cell(key={"control": f"predict {target}", "arch": arch, "seed": seed},
                 folder=Path(run_dir) / "controls" / "site" / arch / f"seed{seed}", train=train, val=val, test=test,
                 train_config=config.classifier_config(arch, classes, seed), positive=None,
                 info={"target": target, "classes": ", ".join(classes), "n_train": int(len(train)),
                       "chance_balanced_accuracy": 1.0 / len(classes)})
    log = print if config.progress else None
    row = _run_cell(cell, root=root, n_boot=config.n_boot, boot_seed=config.boot_seed, base=Path(run_dir), log=log)
    return _tidy(pd.DataFrame([row]))


def lung_control(manifest: pd.DataFrame | str | os.PathLike, config: GridConfig, run_dir: str | os.PathLike, *,
                 task: str = "normal_vs_covid", modes: Sequence[str] = ("whole", "lung_masked", "lungs_removed"),
                 arch: str | None = None, seed: int | None = None,
                 root: str | os.PathLike | None = None) -> pd.DataFrame:
    """The ``real``-condition disease classifier trained and tested on each input mode in ``modes``.

    ``lung_masked`` shows the lungs only, ``lungs_removed`` everything but the lungs
    (notebook 02's predicted masks); a ``lungs_removed`` model that still separates the
    classes reads non-lung cues (text, devices, site). Every real training image of the
    task is used (no subsampling: the control asks what the images carry, where the
    classifier is strongest). One row per mode with the grid's metrics; cells live in
    ``run_dir/controls/lungs/<task>/<arch>/<mode>/seed<k>/``.
    """
    manifest = _leakage_checked(_read(manifest))
    root = root if root is not None else manifest.attrs.get("root")
    arch = arch or config.archs[0]
    seed = config.seeds[0] if seed is None else int(seed)
    task_spec = TASKS[task]
    for mode in modes:
        ok, why = lung_masks_available(manifest, mode, config.mask_column)
        if not ok:
            raise ValueError(why)
    train, info = training_rows(manifest, task_spec, "real", None, seed)
    rows = []
    log = print if config.progress else None
    for mode in modes:
        cell = _Cell(key={"control": "lung input", "task": task, "arch": arch, "input_mode": mode, "seed": seed},
                     folder=Path(run_dir) / "controls" / "lungs" / task / arch / mode / f"seed{seed}",
                     train=train, val=evaluation_rows(manifest, task_spec, "val"),
                     test=evaluation_rows(manifest, task_spec, "test"),
                     train_config=config.classifier_config(arch, task_spec.classes, seed, input_mode=mode),
                     positive=POSITIVE, info=dict(info))
        rows.append(_run_cell(cell, root=root, n_boot=config.n_boot, boot_seed=config.boot_seed,
                              base=Path(run_dir), log=log))
    return _tidy(pd.DataFrame(rows))
