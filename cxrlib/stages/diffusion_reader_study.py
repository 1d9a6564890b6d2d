"""The diffusion stage (notebook 06): register samples, judge every generator alike, clean text, read.

This module holds the parts of notebook 06 that are more than a few lines:

- :func:`diffusion_rows` / :func:`add_diffusion_rows`: samples of the diffusion model as
  manifest rows (``origin = "diffusion:<checkpoint>"``, the conditioning class as ``label``,
  split ``train``: made from noise, they inherit no split and may only ever train);
- :func:`train_judges`: the feature network and the oracle of notebook 03
  (:func:`cxrlib.judges.train_feature_network`, :func:`cxrlib.judges.train_oracle`),
  trained on real images at the resolution every generator is compared at;
- :func:`generator_report`: notebook 03's :func:`cxrlib.judges.judge_generator` and
  :func:`cxrlib.judges.memorisation` for any generator (FD / KID with the real-vs-real
  floor, oracle rate per conditioning class, memorisation against the real training images,
  detectability), so ``G_NC``, ``G_PC`` and the diffusion model land in one table with one
  judge;
- :func:`notebook03_reference`: what notebook 03 reported for its translators (at its own
  resolution), to put next to that table.

Why a common resolution: the judges are small CNNs trained on real images of one size; a
32 px image blown up to 64 px looks blurred to a 64 px oracle, which then stops calling even
real COVID-19 images COVID. Every generator is therefore judged at the smallest side of the
generators compared (the diffusion model's), with judges trained at that side.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlib import judges
from cxrlib.data import manifest as mf
from cxrlib.data.io import pixel_hash, write_png
from cxrlib.evaluate import synthesis as synth
from cxrlib.runs import read_json
from cxrlib.stages import METRICS, output_path
from cxrlib.stages import cyclegan as syn

#: Generator name in ``origin`` values and the grid's ``real_diffusion`` condition.
DIFFUSION = "diffusion"
#: Per-generator keys of ``metrics.json``.
GENERATOR_KEYS: tuple[str, ...] = (
    "n_generated", "fd_cxr", "fd_cxr_floor", "fid_inception", "kid", "kid_std", "oracle_covid_rate",
    "oracle_covid_rate_ci95", "oracle_covid_rate_before", "detectability_auc", "detectability_auc_ci95",
    "nearest_train_distance_p01", "nearest_train_distance_min", "possible_copies", "possible_copy_fraction",
    "feature_possible_copy_fraction",
)


# ----------------------------------------------------------------------------- manifest rows


def diffusion_rows(manifest: pd.DataFrame, images: np.ndarray, labels: Sequence[str], checkpoint_name: str,
                   out_dir: str | os.PathLike) -> pd.DataFrame:
    """Write samples as PNGs and return their manifest rows (the columns of ``manifest``).

    ``images``: ``(N, S, S)`` uint8; ``labels``: the conditioning class of each. Files:
    ``out_dir/diffusion_<label>_<k>.png`` (atomic writes). Rows: ``image_id`` = file stem,
    ``label`` = conditioning class, ``patient_id`` = ``image_id`` (no real person), ``source``
    ``"synthetic"``, ``split`` ``"train"``, ``origin`` = ``make_origin("diffusion",
    checkpoint_name)`` (no source image), ``content_hash`` when the manifest has that column;
    every other column empty. Paths are absolute, like every manifest path in memory.
    """
    images = np.asarray(images)
    if len(images) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    out_dir = Path(out_dir)
    columns = list(dict.fromkeys([*manifest.columns, *mf.COLUMNS]))
    origin = mf.make_origin(DIFFUSION, checkpoint_name)
    counters: dict[str, int] = {}
    rows = []
    for image, label in zip(images, labels, strict=True):
        k = counters.get(label, 0)
        counters[label] = k + 1
        image_id = f"{DIFFUSION}_{label}_{k:04d}"
        path = write_png(out_dir / f"{image_id}.png", image)
        row = dict.fromkeys(columns, "")
        row.update(image_id=image_id, path=str(path.resolve()), label=str(label),
                   patient_id=image_id, source="synthetic", split="train", origin=origin)
        if "content_hash" in columns:
            row["content_hash"] = pixel_hash(image)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def is_diffusion(manifest: pd.DataFrame) -> pd.Series:
    """Bool per row: made by the diffusion model."""
    def made_by(origin: str) -> bool:
        parsed = mf.parse_origin(origin) if origin else None
        return parsed is not None and parsed[0] == DIFFUSION

    return manifest["origin"].astype(str).map(made_by)


def add_diffusion_rows(manifest: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """``manifest`` without earlier diffusion rows, plus ``rows``; leakage-checked
    (:func:`cxrlib.data.manifest.check_leakage` refuses source-less synthetic rows in val / test)."""
    kept = manifest[~is_diffusion(manifest)]
    combined = pd.concat([kept, rows], ignore_index=True).fillna("")
    mf.check_leakage(combined)
    return combined


# ----------------------------------------------------------------------------- judges


def train_judges(manifest: pd.DataFrame, folder: str | os.PathLike, *, image_size: int, epochs: int = 10,
                 arch: str = "small_cnn", seed: int = 0, device: str = "auto",
                 precision: str = "fp32") -> tuple[Any, Any]:
    """``(feature_net, oracle)`` of notebook 03's recipe at ``image_size``, trained on real images only
    (``folder/feature_net``, ``folder/oracle``; a finished run is loaded)."""
    folder = Path(folder)
    feature_net = judges.train_feature_network(manifest, folder / "feature_net", image_size=image_size, arch=arch,
                                            epochs=epochs, seed=seed, device=device, precision=precision)
    oracle = judges.train_oracle(manifest, folder / "oracle", image_size=image_size, arch=arch, epochs=epochs,
                              seed=seed + 1, device=device, precision=precision)
    return feature_net, oracle


# ----------------------------------------------------------------------------- one report per generator


def generator_report(
    *,
    synthetic_images: np.ndarray,
    conditioning: Sequence[str],
    real_covid_train: np.ndarray,
    real_covid_test: np.ndarray,
    real_covid_heldout: np.ndarray,
    real_covid_heldout_groups: Sequence[str],
    real_train: np.ndarray,
    feature_net: Any,
    oracle: Any,
    source_images: np.ndarray | None = None,
    synthetic_groups: Sequence[str] | None = None,
    target: str = judges.TARGET_LABEL,
    inception: bool = True,
    seed: int = 0,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Every measure of one generator, computed with :mod:`cxrlib.evaluate.synthesis`.

    Images are ``(N, S, S)`` uint8 at one common side ``S``. ``synthetic_images`` with their
    ``conditioning`` class (a translator's are all ``covid``); the real COVID-19 images of the
    train split, of the test split and held out from the judges' training (val + test, with
    patient groups); ``real_train``: every real training image the generators may have seen
    (the memorisation reference); ``source_images``: the translator's inputs (``None`` for the
    diffusion model); ``synthetic_groups``: source patients (``None``: each image its own).

    Returns (target = covid-conditioned samples): ``fd_cxr`` / ``kid`` against real COVID-19
    test, ``fd_cxr_floor`` (real COVID-19 train vs test at the same size), ``fid_inception``
    (when the Inception-v3 weights are on this machine and ``inception``; else ``None``, and
    ``fid_inception_note`` says why),
    ``oracle_covid_rate`` (+ ``_ci95``) and ``oracle_covid_rate_by_class`` for every
    conditioning class, ``oracle_covid_rate_before`` (sources; ``None`` without),
    ``detectability_auc`` (+ ``_ci95``; real held-out COVID-19 vs synthetic COVID-19), and
    memorisation of ALL samples against ``real_train``: in pixels (32 x 32,
    :func:`~cxrlib.evaluate.synthesis.pixel_features`) ``nearest_train_distance_p01`` (the
    train-to-train 1st percentile), ``nearest_train_distance_min``, ``possible_copies`` (sample
    indices below it), ``possible_copy_fraction``, the per-sample ``nearest_train_distance`` /
    ``nearest_train_index`` arrays, and ``feature_possible_copy_fraction`` in the feature
    network's space.
    """
    conditioning = np.asarray(list(conditioning), dtype=object)
    if len(conditioning) != len(synthetic_images):
        raise ValueError(f"{len(conditioning)} conditioning labels for {len(synthetic_images)} images")
    is_target = conditioning == target
    groups = np.asarray(list(synthetic_groups), dtype=object) if synthetic_groups is not None else None
    judged = judges.judge_generator(
        synthetic_images=synthetic_images[is_target], real_covid_train=real_covid_train,
        real_covid_test=real_covid_test, real_covid_heldout=real_covid_heldout,
        real_covid_heldout_groups=real_covid_heldout_groups, feature_net=feature_net, oracle=oracle,
        source_images=source_images[is_target] if source_images is not None else None,
        synthetic_groups=groups[is_target] if groups is not None else None, inception=inception, seed=seed,
        n_boot=n_boot)
    report: dict[str, Any] = {"n_generated": int(len(synthetic_images)), "n_target": int(is_target.sum())}
    report.update({key: value for key, value in judged.items() if key != "n_generated"})
    report["oracle_covid_rate"] = report.pop("oracle_covid_rate_after")
    report["oracle_covid_rate_ci95"] = report.pop("oracle_covid_rate_after_ci95")
    report["oracle_covid_rate_blurred"] = report.pop("oracle_covid_rate_after_blurred")
    report["oracle_covid_rate_blurred_ci95"] = report.pop("oracle_covid_rate_after_blurred_ci95")
    report.pop("oracle_covid_rate_before_ci95")

    threshold = report["oracle_threshold"]
    prob_all = judges.covid_probability(oracle, synthetic_images)
    by_class = {}
    for name in dict.fromkeys(conditioning.tolist()):
        chosen = conditioning == name
        per = synth.oracle_rates(None, prob_all[chosen], threshold)
        by_class[str(name)] = {"rate": per["oracle_covid_rate_after"], "ci95": per["oracle_covid_rate_after_ci95"],
                               "n": int(chosen.sum())}
    report["oracle_covid_rate_by_class"] = by_class

    memo = judges.memorisation(feature_net, synthetic_images, real_train)  # every sample, whatever its class
    if memo is not None:
        pixels, feats = memo["pixels"], memo["features"]
        report.update(nearest_train_distance_p01=pixels["nearest_train_distance_p01"],
                      nearest_train_distance_min=float(pixels["nearest_train_distance"].min()),
                      possible_copies=[int(i) for i in pixels["possible_copy_indices"]],
                      possible_copy_fraction=pixels["possible_copy_fraction"],
                      median_distance_ratio=pixels["median_distance_ratio"],
                      nearest_train_distance=pixels["nearest_train_distance"],
                      nearest_train_index=pixels["nearest_train_index"],
                      feature_possible_copy_fraction=feats["possible_copy_fraction"],
                      feature_possible_copies=[int(i) for i in feats["possible_copy_indices"]])
    return report


def headline(report: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`GENERATOR_KEYS` of a report plus the per-class oracle rates (what metrics.json keeps)."""
    out = {key: report[key] for key in GENERATOR_KEYS if key in report}
    if "oracle_covid_rate_by_class" in report:
        out["oracle_covid_rate_by_class"] = report["oracle_covid_rate_by_class"]
    return out


def comparison_table(reports: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per generator (:func:`cxrlib.evaluate.synthesis.synthesis_table`) with the headline
    columns, per-class oracle rates as ``oracle_<class>`` columns."""
    flat = {}
    for name, report in reports.items():
        row = {k: v for k, v in headline(report).items() if k not in ("oracle_covid_rate_by_class", "possible_copies")}
        for cls, values in report.get("oracle_covid_rate_by_class", {}).items():
            row[f"oracle_{cls}"] = values["rate"]
        flat[name] = row
    return synth.synthesis_table(flat)


def notebook03_reference(run_dir: str | os.PathLike) -> pd.DataFrame:
    """What notebook 03 reported for ``G_NC`` / ``G_PC`` (its ``metrics.json``, at its own resolution and
    with its own judges): an empty frame when notebook 03 has not run."""
    path = output_path(run_dir, "03", METRICS)
    if not path.is_file():
        return pd.DataFrame()
    metrics = read_json(path)
    keys = ("n_generated", "fd_cxr", "fd_cxr_floor", "kid", "oracle_covid_rate_after", "detectability_auc",
            "memorisation_possible_copy_fraction")
    rows = {name: {key: metrics[name].get(key) for key in keys} for name in syn.TRANSLATORS if name in metrics}
    return synth.synthesis_table(rows)
