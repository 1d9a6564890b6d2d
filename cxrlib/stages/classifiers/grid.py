"""The grid runner: images decoded once, one cell trained (or loaded) and scored, every cell of
the grid, and the test predictions of all cells."""

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
from torch.utils.data import Dataset

from cxrlib import runs
from cxrlib.data import manifest as mf
from cxrlib.data.classification import (
    ClassificationDataset,
    make_augment,
    make_label_map,
)
from cxrlib.evaluate.classification import (
    choose_threshold,
    expected_calibration_error,
    metrics_with_ci,
    multiclass_metrics,
)
from cxrlib.settings import from_mapping
from cxrlib.stages.classifiers.design import (
    CONDITIONS,
    POSITIVE,
    TASKS,
    GridConfig,
    imbalance_folder,
    imbalance_name,
)
from cxrlib.stages.classifiers.training_sets import (
    as_frame,
    available_conditions,
    evaluation_rows,
    generator_of,
    leakage_checked,
    passing_lung_qc,
    task_problems,
    training_rows,
)
from cxrlib.train.classifier import ClassifierTrainConfig, predict_proba, train_classifier


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

    def __init__(self, rows: pd.DataFrame, *, image_size: int, input_mode: str,
                 mask_column: str | None = None) -> None:
        self.rows = rows.drop_duplicates("image_id")
        self.settings = dict(image_size=image_size, input_mode=input_mode, mask_column=mask_column)
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
class Cell:
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


def run_cell(cell: Cell, *, n_boot: int, boot_seed: int,
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
    result = train_classifier(cell.data("train"), val_data, cell.folder, cell.train_config, resume=resume)
    train_seconds = time.perf_counter() - started
    threshold = result.threshold
    if cell.positive is not None and len(classes) > 2:
        # the 3-class task: the COVID-19-vs-rest threshold, chosen on validation like the binary ones
        val_prob = predict_proba(result, val_data)
        is_positive = (cell.val["label"] == cell.positive).astype(int).to_numpy()
        threshold = choose_threshold(is_positive, val_prob[:, classes.index(cell.positive)], "youden")
    test_prob = predict_proba(result, cell.data("test"))
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
             run_dir: str | os.PathLike) -> pd.DataFrame:
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
    manifest = leakage_checked(as_frame(manifest))
    manifest, left_out = passing_lung_qc(manifest, config.input_mode)  # failed lung masks, counted
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
        made_by = manifest["origin"].map(generator_of)
        generators = {g for name in config.conditions for g in CONDITIONS[name].generators}
        labels = {c for name in config.tasks for c in TASKS[name].classes}
        needed = manifest[((made_by == mf.REAL) & manifest["label"].isin(labels))
                          | (made_by.isin(generators) & (manifest["split"] == "train"))]
        shared = SharedImages(needed, image_size=config.image_size, input_mode=config.input_mode,
                              mask_column=config.mask_column)
    rows = []
    for number, (key, _) in enumerate(cells, start=1):
        task = TASKS[key["task"]]
        condition = CONDITIONS[key["condition"]]
        ratio = key["ratio"] if condition.real_covid else None
        train, info = training_rows(manifest, task, condition, ratio, key["seed"])
        folder = (run_dir / task.name / key["arch"] / condition.name / imbalance_folder(ratio)
                  / f"seed{key['seed']}")
        cell = Cell(
            key={k: key[k] for k in ("task", "arch", "condition", "imbalance", "seed")},
            folder=folder, train=train, val=evaluation_rows(manifest, task, "val"),
            test=evaluation_rows(manifest, task, "test"),
            train_config=config.classifier_config(key["arch"], task.classes, key["seed"],
                                                  oversample=condition.oversample),
            positive=POSITIVE, info=info, shared=shared,
        )
        cell_log = (lambda text, n=number: log(f"[{n}/{len(cells)}] {text}")) if log else None
        row = run_cell(cell, n_boot=config.n_boot, boot_seed=config.boot_seed, base=run_dir,
                        log=cell_log)
        row.update(imbalance=key["imbalance"], ratio=key["ratio"])
        if config.input_mode != "whole":
            row["n_left_out_lung_qc"] = left_out
        rows.append(row)
    results = tidy_results(pd.DataFrame(rows))
    results.attrs["run_dir"] = str(run_dir)
    return results


_FIRST_COLUMNS = ("task", "arch", "condition", "imbalance", "ratio", "seed", "input_mode", "image_size",
                  "n_train_normal", "n_train_pneumonia", "n_train_covid_real", "n_train_covid_patients",
                  "n_synthetic", "n_synthetic_g_nc", "n_synthetic_g_pc", "n_synthetic_diffusion", "n_train_covid", "covid_target",
                  "n_majority", "ratio_achieved", "n_val_covid", "n_val_other", "n_val_patients", "n_test_covid",
                  "n_test_other", "n_test_patients")


def tidy_results(frame: pd.DataFrame) -> pd.DataFrame:
    """The results table with the grid's key columns first."""
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
