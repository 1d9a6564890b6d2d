"""The CycleGAN synthesis stage (notebook 03): translate, register, and measure what came out.

Zunair & Hamza (2021) translate every training Normal image with ``G_NC`` (Normal ->
COVID-19) and every training Pneumonia image with ``G_PC`` (Pneumonia -> COVID-19), and
add the results to the COVID-19 class. This module does the parts of that stage that are
more than a few lines:

- :func:`generate_synthetic`: translate the training images of one class, write the PNGs
  under the stage folder's ``synthetic/<generator>/`` and return manifest rows whose
  ``origin`` names generator, checkpoint and source image, with the source's patient and
  split (so a synthetic image can never land in another split than its source);
- :func:`evaluate_translator`: every number notebook 03 reports for one translator, from
  the judges every generator gets (:mod:`cxrlib.judges`: feature network, oracle,
  :func:`~cxrlib.judges.judge_generator`, :func:`~cxrlib.judges.memorisation`).

Everything is compared at the CycleGAN's training resolution: real images are resized to
it (:func:`cxrlib.data.arrays.load_images`) exactly as the generator's inputs were.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrlib.data import manifest as mf
from cxrlib.data.arrays import load_images, load_masks, real_rows  # noqa: F401 (syn.<name>)
from cxrlib.data.io import pixel_hash, write_png
from cxrlib.evaluate import synthesis as synth
from cxrlib.judges import (  # noqa: F401 (notebooks 03 and 06 call them as syn.<name>)
    FEATURE_CLASSES,
    ORACLE_CLASSES,
    TARGET_LABEL,
    covid_probability,
    features,
    judge_generator,
    memorisation,
    oracle_threshold,
    train_feature_network,
    train_oracle,
)
from cxrlib.train.classifier import ClassifierTrainResult
from cxrlib.train.cyclegan_inference import translate

#: Translator name -> source class (the target class is :data:`TARGET_LABEL`).
TRANSLATORS: dict[str, str] = {"G_NC": "normal", "G_PC": "pneumonia"}
#: Lung mask columns of the phantom manifest (the reference masks of the source image).
LUNG_MASK_COLUMNS: tuple[str, ...] = ("mask_lung_left", "mask_lung_right")
#: Source columns that describe the source image itself, not its patient or anatomy:
#: blanked in synthetic rows (a crop or lesion mask of the source is wrong for its translation).
_SOURCE_ONLY_PREFIXES: tuple[str, ...] = ("path_", "mask_pred", "pred_")
_SOURCE_ONLY_COLUMNS: tuple[str, ...] = ("mask_lesion", "severity", "content_hash")


# ----------------------------------------------------------------------------- inputs


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
    severity) emptied. Paths are absolute, like the manifest's, so
    ``mf.write_manifest(pd.concat([manifest, rows]), ...)`` keeps them valid.
    """
    out_dir = Path(out_dir)
    sources = real_rows(manifest, split, [source_label])
    columns = list(manifest.columns)
    if len(sources) == 0:
        return pd.DataFrame(columns=columns)
    translated = translate(generator, load_images(sources, image_size), batch_size=batch_size,
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
            path=str(path.resolve()),
            label=target_label,
            source="synthetic",
            origin=mf.make_origin(generator_name, checkpoint_name, source_id),
        )
        if "content_hash" in columns:
            row["content_hash"] = pixel_hash(image)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def add_synthetic(manifest: pd.DataFrame, synthetic: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """``manifest`` + the synthetic rows (earlier rows of the same images replaced), leakage-checked.

    Raises :class:`cxrlib.data.manifest.LeakageError` when a synthetic image sits in another
    split than its source (or any other leak).
    """
    new = [rows for rows in synthetic if len(rows)]
    new_ids = set().union(*(set(rows["image_id"].astype(str)) for rows in new)) if new else set()
    kept = manifest[~manifest["image_id"].astype(str).isin(new_ids)]
    combined = pd.concat([kept, *new], ignore_index=True).fillna("")
    mf.check_leakage(combined)
    return combined


def synthetic_rows(manifest: pd.DataFrame, generator_name: str) -> pd.DataFrame:
    """Rows made by ``generator_name`` (parsed from ``origin``), in manifest order."""
    def made_by(origin: str) -> bool:
        parsed = mf.parse_origin(str(origin)) if origin else None
        return parsed is not None and parsed[0] == generator_name

    return manifest[manifest["origin"].astype(str).map(made_by)]


def source_rows(manifest: pd.DataFrame, synthetic: pd.DataFrame) -> pd.DataFrame:
    """The source image row of each synthetic row, in the same order."""
    ids = [mf.parse_origin(str(origin))[2] for origin in synthetic["origin"]]
    indexed = manifest.set_index(manifest["image_id"].astype(str), drop=False)
    return indexed.loc[ids].reset_index(drop=True)


# ----------------------------------------------------------------------------- evaluation


#: Keys of metrics.json per translator (the phantom adds :data:`PHANTOM_KEYS`).
HEADLINE_KEYS: tuple[str, ...] = (
    "n_generated", "fd_cxr", "fd_cxr_floor", "fd_cxr_untranslated", "kid", "kid_std", "fd_cxr_blurred",
    "fd_cxr_blurred_floor", "fd_cxr_blurred_untranslated", "fid_inception",
    "fid_inception_note",
    "oracle_covid_rate_before", "oracle_covid_rate_before_ci95", "oracle_covid_rate_after",
    "oracle_covid_rate_after_ci95", "oracle_threshold", "oracle_covid_rate_real", "oracle_covid_rate_real_ci95",
    "oracle_covid_rate_real_blurred", "oracle_covid_rate_real_blurred_ci95", "oracle_covid_rate_after_blurred",
    "oracle_covid_rate_after_blurred_ci95", "detectability_auc", "detectability_auc_ci95",
    "memorisation_possible_copy_fraction", "memorisation_median_distance_ratio",
    "memorisation_pixel_possible_copy_fraction",
)
PHANTOM_KEYS: tuple[str, ...] = (
    "lesion_added_inside_lungs", "lesion_added_outside_lungs", "lesion_added_inside_lungs_fraction",
    "lesion_added_inside_lungs_fraction_ci95", "anatomy_ssim", "anatomy_l1",
)


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
    - ``oracle_covid_rate_before`` / ``_after`` (with Wilson ``_ci95``) at ``oracle_threshold``,
      and the texture check ``oracle_covid_rate_real`` / ``_real_blurred`` / ``_after_blurred``
      (:func:`cxrlib.judges.judge_generator`);
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


#: The texture check's rows: (label, report key) - see :func:`cxrlib.judges.judge_generator`.
TEXTURE_CHECK_ROWS: tuple[tuple[str, str], ...] = (
    ("real COVID-19 test images", "oracle_covid_rate_real"),
    ("real COVID-19 test images, blurred", "oracle_covid_rate_real_blurred"),
    ("translated images", "oracle_covid_rate_after"),
    ("translated images, blurred", "oracle_covid_rate_after_blurred"),
)


def texture_check_table(reports: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """The oracle's COVID-19 rate (``"0.77 (0.62-0.87)"``, Wilson 95% interval) of real COVID-19 test
    images and of each translator's images, as they are and through
    :func:`cxrlib.evaluate.synthesis.binomial_blur`: one column per translator in ``reports``
    (:func:`evaluate_translator` outputs), one row per :data:`TEXTURE_CHECK_ROWS` entry."""
    def cell(report: Mapping[str, Any], key: str) -> str:
        rate, interval = report.get(key), report.get(f"{key}_ci95")
        if rate is None:
            return "n/a"
        return f"{rate:.2f}" + (f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval is not None else "")

    columns = {name: [cell(report, key) for _, key in TEXTURE_CHECK_ROWS] for name, report in reports.items()}
    table = pd.DataFrame(columns, index=[label for label, _ in TEXTURE_CHECK_ROWS])
    table.index.name = "oracle calls COVID-19"
    return table


def headline_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`HEADLINE_KEYS` and :data:`PHANTOM_KEYS` present in a report (what metrics.json keeps)."""
    return {key: report[key] for key in (*HEADLINE_KEYS, *PHANTOM_KEYS) if key in report}


def blend(before: np.ndarray, after: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * before + alpha * after`` of two uint8 images, as uint8 (the before/after slider)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    mixed = (1.0 - alpha) * before.astype(np.float64) + alpha * after.astype(np.float64)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
