"""The CycleGAN synthesis stage (notebook 03): translate, register, and measure what came out.

Zunair & Hamza (2021) translate every training Normal image with ``G_NC`` (Normal ->
COVID-19) and every training Pneumonia image with ``G_PC`` (Pneumonia -> COVID-19), and
add the results to the COVID-19 class. This module does the parts of that stage that are
more than a few lines:

- :func:`generate_synthetic`: translate the training images of one class, write the PNGs
  under ``RUN_DIR/03_cyclegan/synthetic/<generator>/`` and return manifest rows whose
  ``origin`` names generator, checkpoint and source image, with the source's patient and
  split (so a synthetic image can never land in another split than its source);
- :func:`train_feature_network`: the chest X-ray feature space the project trains itself
  (a 3-class classifier on *real* training images; its global-average-pooling features
  serve FD, KID, memorisation and detectability);
- :func:`train_oracle`: an independent COVID vs non-COVID classifier on real images (other
  seed, other task), its threshold chosen on validation;
- :func:`judge_generator`: the measures every generator gets, translator or not (FD / KID
  with the real-vs-real floor, oracle rates, detectability), and :func:`memorisation`
  (nearest training images in pixels and in the feature space); notebook 06 judges its
  diffusion model with the same two functions;
- :func:`evaluate_translator`: every number notebook 03 reports for one translator.

Everything is compared at the CycleGAN's training resolution: real images are resized to
it (:func:`load_images`) exactly as the generator's inputs were.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from cxrlib.data import manifest as mf
from cxrlib.data.io import pixel_hash, read_mask, write_png
from cxrlib.data.transforms import resize_mask
from cxrlib.evaluate import synthesis as synth
from cxrlib.train.classifier import (
    ClassifierTrainConfig,
    ClassifierTrainResult,
    predict_proba,
    train_classifier,
)
from cxrlib.train.cyclegan import DomainImageDataset, translate

#: Folder of this stage inside a run.
STAGE = "03_cyclegan"
#: Translator name -> source class (the target class is :data:`TARGET_LABEL`).
TRANSLATORS: dict[str, str] = {"G_NC": "normal", "G_PC": "pneumonia"}
TARGET_LABEL = "covid"
#: Classes of the feature network, in index order.
FEATURE_CLASSES: tuple[str, ...] = ("normal", "pneumonia", "covid")
#: Classes of the oracle (index 1 is the positive class).
ORACLE_CLASSES: tuple[str, str] = ("non_covid", "covid")
#: Lung mask columns of the phantom manifest (the reference masks of the source image).
LUNG_MASK_COLUMNS: tuple[str, ...] = ("mask_lung_left", "mask_lung_right")
#: Earlier stages whose manifest this stage reads, latest first.
INPUT_STAGES: tuple[str, ...] = ("02_segmentation", "01_data")
#: Source columns that describe the source image itself, not its patient or anatomy:
#: blanked in synthetic rows (a crop or lesion mask of the source is wrong for its translation).
_SOURCE_ONLY_PREFIXES: tuple[str, ...] = ("path_", "mask_pred", "pred_")
_SOURCE_ONLY_COLUMNS: tuple[str, ...] = ("mask_lesion", "severity", "content_hash")


# ----------------------------------------------------------------------------- inputs


def input_manifest_path(run_dir: str | os.PathLike) -> Path:
    """The latest earlier stage manifest of a run: ``02_segmentation/manifest.csv`` when it
    exists, else ``01_data/manifest.csv`` (FileNotFoundError naming both when neither does)."""
    candidates = [Path(run_dir) / stage / "manifest.csv" for stage in INPUT_STAGES]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no earlier stage manifest in {run_dir}: looked for {[str(p) for p in candidates]}; "
                            "run notebook 01 first")


def real_rows(manifest: pd.DataFrame, split: str | Sequence[str], labels: Sequence[str] | None = None
              ) -> pd.DataFrame:
    """Real (``origin == "real"``) rows of ``split`` (one name or several), optionally of ``labels``."""
    splits = [split] if isinstance(split, str) else list(split)
    keep = manifest["split"].astype(str).isin(splits)
    if "origin" in manifest.columns:
        keep &= manifest["origin"].astype(str).isin([mf.REAL, ""])
    if labels is not None:
        keep &= manifest["label"].astype(str).isin(list(labels))
    rows = manifest[keep]
    rows.attrs = dict(manifest.attrs)
    return rows


def load_images(rows: pd.DataFrame, image_size: int, *, root: str | Path | None = None) -> np.ndarray:
    """Images of manifest rows as ``(N, image_size, image_size)`` uint8, resized as the CycleGAN's inputs."""
    if len(rows) == 0:
        return np.zeros((0, image_size, image_size), dtype=np.uint8)
    return DomainImageDataset(rows, root=root, image_size=image_size).images.numpy()


def load_masks(rows: pd.DataFrame, columns: Sequence[str], image_size: int, *,
               root: str | Path | None = None) -> np.ndarray:
    """Union of the mask files in ``columns`` per row: ``(N, image_size, image_size)`` bool.

    An empty cell adds nothing (e.g. a normal image's lesion mask)."""
    where = root if root is not None else rows
    masks = np.zeros((len(rows), image_size, image_size), dtype=bool)
    for slot, (_, row) in enumerate(rows.iterrows()):
        for column in columns:
            value = str(row.get(column, "") or "")
            if value:
                masks[slot] |= resize_mask(read_mask(mf.resolve_path(where, value)), image_size).astype(bool)
    return masks


class ArrayDataset(Dataset):
    """In-memory images for a classifier: items ``((1, H, W) float32 in [0, 1], label int)``.

    ``images``: ``(N, H, W)`` uint8; ``labels``: ``(N,)`` int (``-1`` for unlabelled, e.g.
    synthetic images being scored). ``hflip``: random horizontal flips (training only).
    """

    def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray | None = None, *,
                 hflip: bool = False, seed: int = 0) -> None:
        images = np.asarray(images)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W) uint8, got {images.shape} {images.dtype}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = (np.full(len(images), -1, dtype=np.int64) if labels is None
                       else np.asarray(labels, dtype=np.int64))
        if len(self.labels) != len(images):
            raise ValueError(f"{len(self.labels)} labels for {len(images)} images")
        self.hflip = hflip
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index][None].float().div_(255.0)
        if self.hflip and torch.rand((), generator=self.generator) < 0.5:
            image = image.flip(-1)
        return image, int(self.labels[index])


# ----------------------------------------------------------------------------- generation


def generate_synthetic(
    generator: nn.Module,
    manifest: pd.DataFrame,
    source_label: str,
    generator_name: str,
    checkpoint_name: str,
    out_dir: str | os.PathLike,
    image_size: int,
    *,
    split: str = "train",
    target_label: str = TARGET_LABEL,
    root: str | Path | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Translate every real ``split`` image of ``source_label`` and return the new manifest rows.

    ``generator``: the A -> B generator (e.g. ``load_generator(run, "G_AB")``); images are
    resized to ``image_size`` (the CycleGAN's training side) and the translations written
    as ``image_size`` PNGs, atomically, to ``out_dir/<source image_id>.png``. Rows: copies of
    the source rows (patient, view, site, split, lung and heart masks: the anatomy is the
    source's) with ``image_id = "<generator_name>_<source id>"``, ``label = target_label``,
    ``source = "synthetic"``, ``origin = make_origin(generator_name, checkpoint_name, source
    id)``, a fresh ``content_hash`` (when the manifest has that column) and the columns
    that describe the source image itself (derived crops, predicted masks, lesion mask,
    severity) emptied. Paths are relative to ``manifest.attrs["root"]``, so
    ``mf.write_manifest(pd.concat([manifest, rows]), ...)`` keeps them valid.
    """
    out_dir = Path(out_dir)
    sources = real_rows(manifest, split, [source_label])
    base = Path(root) if root is not None else Path(manifest.attrs.get("root") or out_dir)
    columns = list(manifest.columns)
    if len(sources) == 0:
        return pd.DataFrame(columns=columns)
    translated = translate(generator, load_images(sources, image_size, root=root), batch_size=batch_size,
                           device=device)
    rows = []
    for (_, source), image in zip(sources.iterrows(), translated, strict=True):
        source_id = str(source["image_id"])
        path = write_png(out_dir / f"{source_id}.png", image)
        row = {column: source[column] for column in columns}
        for column in columns:
            if column.startswith(_SOURCE_ONLY_PREFIXES) or column in _SOURCE_ONLY_COLUMNS:
                row[column] = ""
        row.update(
            image_id=f"{generator_name}_{source_id}",
            path=Path(os.path.relpath(path.resolve(), base.resolve())).as_posix(),
            label=target_label,
            source="synthetic",
            origin=mf.make_origin(generator_name, checkpoint_name, source_id),
        )
        if "content_hash" in columns:
            row["content_hash"] = pixel_hash(image)
        rows.append(row)
    result = pd.DataFrame(rows, columns=columns)
    result.attrs = dict(manifest.attrs)
    return result


def add_synthetic(manifest: pd.DataFrame, synthetic: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """``manifest`` + the synthetic rows (earlier rows of the same images replaced), leakage-checked.

    Raises :class:`cxrlib.data.manifest.LeakageError` when a synthetic image sits in another
    split than its source (or any other leak).
    """
    new = [rows for rows in synthetic if len(rows)]
    new_ids = set().union(*(set(rows["image_id"].astype(str)) for rows in new)) if new else set()
    kept = manifest[~manifest["image_id"].astype(str).isin(new_ids)]
    combined = pd.concat([kept, *new], ignore_index=True).fillna("")
    combined.attrs = dict(manifest.attrs)
    mf.check_leakage(combined)
    return combined


def synthetic_rows(manifest: pd.DataFrame, generator_name: str) -> pd.DataFrame:
    """Rows made by ``generator_name`` (parsed from ``origin``), in manifest order."""
    def made_by(origin: str) -> bool:
        parsed = mf.parse_origin(str(origin)) if origin else None
        return parsed is not None and parsed[0] == generator_name

    rows = manifest[manifest["origin"].astype(str).map(made_by)]
    rows.attrs = dict(manifest.attrs)
    return rows


def source_rows(manifest: pd.DataFrame, synthetic: pd.DataFrame) -> pd.DataFrame:
    """The source image row of each synthetic row, in the same order."""
    ids = [mf.parse_origin(str(origin))[2] for origin in synthetic["origin"]]
    indexed = manifest.set_index(manifest["image_id"].astype(str), drop=False)
    rows = indexed.loc[ids].reset_index(drop=True)
    rows.attrs = dict(manifest.attrs)
    return rows


# ----------------------------------------------------------------------------- judges


def _labelled_images(rows: pd.DataFrame, classes: Sequence[str], image_size: int,
                     label_of: Mapping[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    labels = rows["label"].astype(str).map(lambda name: (label_of or {}).get(name, name))
    index = {name: i for i, name in enumerate(classes)}
    return load_images(rows, image_size), np.array([index[name] for name in labels], dtype=np.int64)


def _train_judge(manifest: pd.DataFrame, run_dir: str | Path, config: ClassifierTrainConfig,
                 label_of: Mapping[str, str] | None) -> ClassifierTrainResult:
    classes = list(config.classes or [])
    wanted = [name for name in manifest["label"].astype(str).unique()
              if (label_of or {}).get(name, name) in classes]
    train_images, train_labels = _labelled_images(real_rows(manifest, "train", wanted), classes,
                                                  config.image_size, label_of)
    val_images, val_labels = _labelled_images(real_rows(manifest, "val", wanted), classes,
                                              config.image_size, label_of)
    if len(np.unique(val_labels)) < len(classes) and config.select_metric != "loss":
        # a tiny cohort's validation split may miss a class: AUC is then undefined, the loss is not
        warnings.warn(f"the validation split has {len(np.unique(val_labels))} of {len(classes)} classes; "
                      "the epoch is chosen by validation loss instead of AUC", stacklevel=3)
        config = replace(config, select_metric="loss")
    return train_classifier(ArrayDataset(train_images, train_labels, hflip=config.augment != "none",
                                         seed=config.seed),
                            ArrayDataset(val_images, val_labels), run_dir, config)


def train_feature_network(manifest: pd.DataFrame, run_dir: str | Path, *, image_size: int, arch: str = "small_cnn",
                          epochs: int = 10, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                          device: str = "auto", progress: bool = False) -> ClassifierTrainResult:
    """The project's own chest X-ray feature space: a 3-class classifier (normal / pneumonia /
    covid) trained on *real* training images only, chosen by validation macro AUC.

    Images are resized to ``image_size`` (the CycleGAN's side). Its GAP features
    (:func:`features`) are the space for FD, KID, memorisation and detectability: a network
    that never saw a synthetic image is an unbiased judge of them. Resumes / loads from
    ``run_dir`` like :func:`cxrlib.train.classifier.train_classifier`.
    """
    config = ClassifierTrainConfig(arch=arch, classes=list(FEATURE_CLASSES), image_size=image_size, epochs=epochs,
                                   batch_size=batch_size, lr=lr, seed=seed, device=device, augment="light",
                                   patience=None, progress=progress)
    return _train_judge(manifest, run_dir, config, None)


def train_oracle(manifest: pd.DataFrame, run_dir: str | Path, *, image_size: int, arch: str = "small_cnn",
                 epochs: int = 10, batch_size: int = 32, lr: float = 1e-3, seed: int = 1,
                 device: str = "auto", progress: bool = False) -> ClassifierTrainResult:
    """An independent COVID vs non-COVID classifier ("oracle") trained on real training images only.

    Another task and seed than :func:`train_feature_network`; normal and pneumonia images
    are the negatives. Its threshold (``result.threshold``, Youden's J) is chosen on the
    validation split, never on test images or synthetic ones.
    """
    config = ClassifierTrainConfig(arch=arch, classes=list(ORACLE_CLASSES), image_size=image_size, epochs=epochs,
                                   batch_size=batch_size, lr=lr, seed=seed, device=device, augment="light",
                                   patience=None, progress=progress)
    label_of = {name: ("covid" if name == TARGET_LABEL else "non_covid") for name in manifest["label"].astype(str)}
    return _train_judge(manifest, run_dir, config, label_of)


def features(model: ClassifierTrainResult | nn.Module, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """GAP features ``(N, D)`` float64 of uint8 images ``(N, H, W)``."""
    from cxrlib.models.classifiers import penultimate_features

    net = model.model if isinstance(model, ClassifierTrainResult) else model
    chunks = [penultimate_features(net, torch.from_numpy(images[start:start + batch_size])[:, None].float() / 255.0)
              .cpu().numpy() for start in range(0, len(images), batch_size)]
    return np.concatenate(chunks).astype(np.float64) if chunks else np.zeros((0, net.feature_dim))


def oracle_threshold(oracle: ClassifierTrainResult) -> float:
    """The oracle's validation-chosen threshold (Youden's J), or 0.5 when validation could not set one."""
    return float(oracle.threshold) if oracle.threshold is not None else 0.5


def covid_probability(oracle: ClassifierTrainResult, images: np.ndarray) -> np.ndarray:
    """The oracle's COVID probability ``(N,)`` of uint8 images ``(N, H, W)``."""
    return predict_proba(oracle, ArrayDataset(images))[:, ORACLE_CLASSES.index("covid")]


# ----------------------------------------------------------------------------- evaluation


#: Keys of metrics.json per translator (the phantom adds :data:`PHANTOM_KEYS`).
HEADLINE_KEYS: tuple[str, ...] = (
    "n_generated", "fd_cxr", "fd_cxr_floor", "fd_cxr_untranslated", "kid", "kid_std", "fid_inception",
    "fid_inception_note",
    "oracle_covid_rate_before", "oracle_covid_rate_before_ci95", "oracle_covid_rate_after",
    "oracle_covid_rate_after_ci95", "oracle_threshold", "detectability_auc", "detectability_auc_ci95",
    "memorisation_possible_copy_fraction", "memorisation_median_distance_ratio",
    "memorisation_pixel_possible_copy_fraction",
)
PHANTOM_KEYS: tuple[str, ...] = (
    "lesion_added_inside_lungs", "lesion_added_outside_lungs", "lesion_added_inside_lungs_fraction",
    "lesion_added_inside_lungs_fraction_ci95", "anatomy_ssim", "anatomy_l1",
)


def judge_generator(
    *,
    synthetic_images: np.ndarray,
    real_covid_train: np.ndarray,
    real_covid_test: np.ndarray,
    real_covid_heldout: np.ndarray,
    real_covid_heldout_groups: Sequence[str],
    feature_net: ClassifierTrainResult,
    oracle: ClassifierTrainResult,
    source_images: np.ndarray | None = None,
    synthetic_groups: Sequence[str] | None = None,
    inception: bool = True,
    seed: int = 0,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """The measures every COVID-19 generator gets, with :mod:`cxrlib.evaluate.synthesis`.

    Images are ``(N, S, S)`` uint8 at one side ``S``: ``synthetic_images`` (all meant to be
    COVID-19), real COVID-19 images of the train split, of the test split and held out from
    the judges' training (val + test) with their patient groups. ``source_images``: a
    translator's inputs, row for row (``None`` for a generator that starts from noise);
    ``synthetic_groups``: the patient each synthetic image comes from (``None``: each image
    its own group). Returns:

    - ``n_generated``; ``fd_cxr`` (synthetic vs real COVID-19 test), ``fd_cxr_floor`` (real
      COVID-19 train vs test at the synthetic set's size), ``fd_cxr_untranslated`` (sources vs
      real COVID-19 test; ``None`` without sources), ``kid`` / ``kid_std``, all in the
      feature network's space (``None`` when a set has fewer than two images);
    - ``fid_inception`` (synthetic vs real COVID-19 test in Inception-v3 features) when the
      weights are on this machine and ``inception`` is true, else ``None``;
      ``fid_inception_note`` says which (nothing is downloaded);
    - ``oracle_covid_rate_before`` (sources; ``None`` without) / ``_after`` with Wilson
      ``_ci95``, at ``oracle_threshold``;
    - ``detectability_auc`` (+ ``_ci95``): a linear probe telling real held-out COVID-19 from
      synthetic images, folds grouped by patient (``None`` with fewer than two groups a side).
    """
    synthetic_feats = features(feature_net, synthetic_images)
    train_feats = features(feature_net, real_covid_train)
    test_feats = features(feature_net, real_covid_test)
    source_feats = features(feature_net, source_images) if source_images is not None else None
    report: dict[str, Any] = {"n_generated": int(len(synthetic_images))}
    # tiny cohorts (the smoke-test profile) may lack the two images per set a covariance needs
    if min(len(synthetic_feats), len(train_feats), len(test_feats)) >= 2:
        fd = synth.fd_report(synthetic_feats, test_feats, train_feats, reference=source_feats, seed=seed)
        report.update(fd_cxr=fd["fd"], fd_cxr_floor=fd["fd_floor"], fd_cxr_untranslated=fd["fd_reference"],
                      kid=fd["kid"], kid_std=fd["kid_std"])
    else:
        report.update(fd_cxr=None, fd_cxr_floor=None, fd_cxr_untranslated=None, kid=None, kid_std=None)
    fid, fid_note = quiet_inception_fid(synthetic_images, real_covid_test) if inception else (None, "not asked for")
    report.update(fid_inception=fid, fid_inception_note=fid_note)
    threshold = oracle_threshold(oracle)
    rates = synth.oracle_rates(covid_probability(oracle, source_images) if source_images is not None else None,
                               covid_probability(oracle, synthetic_images), threshold)
    report.update({key: rates[key] for key in (
        "oracle_covid_rate_before", "oracle_covid_rate_before_ci95", "oracle_covid_rate_after",
        "oracle_covid_rate_after_ci95")}, oracle_threshold=rates["threshold"])
    groups = ([str(g) for g in synthetic_groups] if synthetic_groups is not None
              else [f"sample{i}" for i in range(len(synthetic_images))])
    if len(groups) != len(synthetic_images):
        raise ValueError(f"{len(groups)} synthetic_groups for {len(synthetic_images)} images")
    n_splits = min(5, len(set(map(str, real_covid_heldout_groups))), len(set(groups)))
    if n_splits >= 2:
        detect = synth.detectability_auc(features(feature_net, real_covid_heldout), synthetic_feats,
                                         groups_real=list(real_covid_heldout_groups), groups_synthetic=groups,
                                         n_splits=n_splits, seed=seed, n_boot=n_boot)
        report.update(detectability_auc=detect["auc"], detectability_auc_ci95=tuple(detect["auc_ci95"]))
    else:
        report.update(detectability_auc=None, detectability_auc_ci95=None)
    return report


def memorisation(feature_net: ClassifierTrainResult, synthetic_images: np.ndarray,
                 train_images: np.ndarray) -> dict[str, dict[str, Any]] | None:
    """Nearest training images of every synthetic image, ``{"pixels": ..., "features": ...}``.

    Each value is :func:`cxrlib.evaluate.synthesis.memorisation_report` of the synthetic
    images against ``train_images`` (the real images the generator may have copied), in
    pixels (:func:`~cxrlib.evaluate.synthesis.pixel_features`, 32 x 32) and in the feature
    network's space. ``None`` with fewer than two training images or no synthetic image.
    """
    if len(train_images) < 2 or not len(synthetic_images):
        return None
    return {"pixels": synth.memorisation_report(synth.pixel_features(synthetic_images),
                                                synth.pixel_features(train_images)),
            "features": synth.memorisation_report(features(feature_net, synthetic_images),
                                                  features(feature_net, train_images))}


def evaluate_translator(
    *,
    source_images: np.ndarray,
    synthetic_images: np.ndarray,
    synthetic_groups: Sequence[str],
    real_covid_train: np.ndarray,
    real_covid_test: np.ndarray,
    real_covid_heldout: np.ndarray,
    real_covid_heldout_groups: Sequence[str],
    feature_net: ClassifierTrainResult,
    oracle: ClassifierTrainResult,
    lung_masks: np.ndarray | None = None,
    source_lesion_masks: np.ndarray | None = None,
    inception: bool = True,
    seed: int = 0,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Every number notebook 03 reports for one translator, as a flat JSON-friendly dict.

    All images are ``(N, S, S)`` uint8 at the CycleGAN's side ``S``: ``source_images`` and
    ``synthetic_images`` (row i is the translation of source row i), real COVID-19 images of
    the training split (the generator's target domain), of the test split, and held out from
    the feature network's training (val + test, with their ``patient_id`` groups).
    ``synthetic_groups``: the source images' ``patient_id``. Returns:

    - ``fd_cxr`` (synthetic vs real COVID test), ``fd_cxr_floor`` (real COVID train vs test
      at the synthetic set's size), ``fd_cxr_untranslated`` (source images vs real COVID
      test), ``kid`` / ``kid_std`` in the feature network's GAP space; ``fid_inception`` when
      local Inception weights exist (else ``None``; ``fid_inception_note`` says why);
    - ``oracle_covid_rate_before`` / ``_after`` (with Wilson ``_ci95``) at ``oracle_threshold``;
    - ``detectability_auc`` (+ ``_ci95``): linear probe, real COVID held-out vs synthetic,
      folds grouped by patient;
    - ``memorisation_*``: near-copies of the real COVID training images in feature space and
      in pixels (:func:`cxrlib.evaluate.synthesis.memorisation_report`);
    - with ``lung_masks`` (phantom): ``lesion_added_inside_lungs`` / ``_outside_lungs`` (mean
      added intensity per region pixel), ``lesion_added_inside_lungs_fraction`` and
      ``anatomy_ssim`` / ``anatomy_l1`` outside the lungs and the source's own lesion;
    - ``n_generated``.
    """
    report = judge_generator(synthetic_images=synthetic_images, real_covid_train=real_covid_train,
                             real_covid_test=real_covid_test, real_covid_heldout=real_covid_heldout,
                             real_covid_heldout_groups=real_covid_heldout_groups, feature_net=feature_net,
                             oracle=oracle, source_images=source_images, synthetic_groups=synthetic_groups,
                             inception=inception, seed=seed, n_boot=n_boot)
    # a translation sits next to its own source by design: look for copies among the target domain's images
    memo = memorisation(feature_net, synthetic_images, real_covid_train)
    if memo is not None:
        report.update(memorisation_possible_copy_fraction=memo["features"]["possible_copy_fraction"],
                      memorisation_median_distance_ratio=memo["features"]["median_distance_ratio"],
                      memorisation_pixel_possible_copy_fraction=memo["pixels"]["possible_copy_fraction"])
    if lung_masks is not None:
        lesion = synth.lesion_change(source_images, synthetic_images, lung_masks, seed=seed)
        excluded = lung_masks if source_lesion_masks is None else (lung_masks | source_lesion_masks)
        anatomy = synth.anatomy_change(source_images, synthetic_images, excluded, seed=seed)
        report.update({key: lesion[key] for key in PHANTOM_KEYS if key in lesion})
        report.update(anatomy_ssim=anatomy["anatomy_ssim"], anatomy_l1=anatomy["anatomy_l1"])
    return report


def headline_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`HEADLINE_KEYS` and :data:`PHANTOM_KEYS` present in a report (what metrics.json keeps)."""
    return {key: report[key] for key in (*HEADLINE_KEYS, *PHANTOM_KEYS) if key in report}


def blend(before: np.ndarray, after: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * before + alpha * after`` of two uint8 images, as uint8 (the before/after slider)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    mixed = (1.0 - alpha) * before.astype(np.float64) + alpha * after.astype(np.float64)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def quiet_inception_fid(images_a: np.ndarray, images_b: np.ndarray) -> tuple[float | None, str]:
    """Inception FID and a message: the value, or why it was skipped (weights not on this machine)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = synth.inception_fid(images_a, images_b)
    message = str(caught[0].message) if caught else f"Inception FID = {value:.2f}"
    return value, message
