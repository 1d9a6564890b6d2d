"""Judges of generated chest X-rays, for any generator: a feature network and an oracle trained
on real images only, and the measures every generator gets from them.

- :func:`train_feature_network`: the chest X-ray feature space the project trains itself
  (a 3-class classifier on *real* training images; its global-average-pooling features,
  :func:`features`, serve FD, KID, memorisation and detectability);
- :func:`train_oracle`: an independent COVID vs non-COVID classifier on real images (other
  seed, other task), its threshold chosen on validation (:func:`oracle_threshold`,
  :func:`covid_probability`);
- :func:`judge_generator`: FD / KID with the real-vs-real floor, oracle rates and
  detectability, and :func:`memorisation` (nearest training images in pixels and in the
  feature space). Notebook 03 judges its translators and notebook 06 its diffusion model
  with the same two functions.

Images are ``(N, S, S)`` uint8 at one side ``S`` (:func:`cxrlib.data.arrays.load_images`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrlib.data.arrays import ArrayDataset, load_images, real_rows
from cxrlib.evaluate import synthesis as synth
from cxrlib.train.classifier import (
    ClassifierTrainConfig,
    ClassifierTrainResult,
    predict_proba,
    train_classifier,
)

#: The class every generator is meant to make (the oracle's positive class).
TARGET_LABEL = "covid"
#: Classes of the feature network, in index order.
FEATURE_CLASSES: tuple[str, ...] = ("normal", "pneumonia", "covid")
#: Classes of the oracle (index 1 is the positive class).
ORACLE_CLASSES: tuple[str, str] = ("non_covid", "covid")


# ----------------------------------------------------------------------------- the judges


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
                          device: str = "auto", progress: bool = False,
                          precision: str = "fp32") -> ClassifierTrainResult:
    """The project's own chest X-ray feature space: a 3-class classifier (normal / pneumonia /
    covid) trained on *real* training images only, chosen by validation macro AUC.

    Images are resized to ``image_size`` (the CycleGAN's side). Its GAP features
    (:func:`features`) are the space for FD, KID, memorisation and detectability: a network
    that never saw a synthetic image is an unbiased judge of them. Resumes / loads from
    ``run_dir`` like :func:`cxrlib.train.classifier.train_classifier`. ``precision``: the
    training loop's autocast (:func:`cxrlib.train.engine.resolve_precision`); features are
    read in fp32.
    """
    config = ClassifierTrainConfig(arch=arch, classes=list(FEATURE_CLASSES), image_size=image_size, epochs=epochs,
                                   batch_size=batch_size, lr=lr, seed=seed, device=device, augment="light",
                                   patience=None, progress=progress, precision=precision)
    return _train_judge(manifest, run_dir, config, None)


def train_oracle(manifest: pd.DataFrame, run_dir: str | Path, *, image_size: int, arch: str = "small_cnn",
                 epochs: int = 10, batch_size: int = 32, lr: float = 1e-3, seed: int = 1,
                 device: str = "auto", progress: bool = False, precision: str = "fp32") -> ClassifierTrainResult:
    """An independent COVID vs non-COVID classifier ("oracle") trained on real training images only.

    Another task and seed than :func:`train_feature_network`; normal and pneumonia images
    are the negatives. Its threshold (``result.threshold``, Youden's J) is chosen on the
    validation split, never on test images or synthetic ones.
    """
    config = ClassifierTrainConfig(arch=arch, classes=list(ORACLE_CLASSES), image_size=image_size, epochs=epochs,
                                   batch_size=batch_size, lr=lr, seed=seed, device=device, augment="light",
                                   patience=None, progress=progress, precision=precision)
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


# ----------------------------------------------------------------------------- the measures


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
    - the texture check, at the same threshold: ``oracle_covid_rate_real`` (real COVID-19
      test images), ``oracle_covid_rate_real_blurred`` (the same images through
      :func:`cxrlib.evaluate.synthesis.binomial_blur`) and ``oracle_covid_rate_after_blurred``
      (the synthetic images through it), each with ``_ci95``. Calls that vanish under a blur
      that removes only the period-two texture rest on that texture (a source or compression
      artefact, or a generator's checkerboard), not on the lungs; ``fd_cxr_blurred``,
      ``fd_cxr_blurred_floor`` and ``fd_cxr_blurred_untranslated``: the three FDs with every set
      so blurred (``None`` where the FDs are);
    - ``detectability_auc`` (+ ``_ci95``): a linear probe telling real held-out COVID-19 from
      synthetic images, folds grouped by patient (``None`` with fewer than two groups a side).
    """
    synthetic_feats = features(feature_net, synthetic_images)
    train_feats = features(feature_net, real_covid_train)
    test_feats = features(feature_net, real_covid_test)
    source_feats = features(feature_net, source_images) if source_images is not None else None
    report: dict[str, Any] = {"n_generated": int(len(synthetic_images))}
    # the texture check's inputs, blurred once for its FDs and its oracle rates
    blurred_synthetic, blurred_test = synth.binomial_blur(synthetic_images), synth.binomial_blur(real_covid_test)
    # tiny cohorts (the smoke-test profile) may lack the two images per set a covariance needs
    if min(len(synthetic_feats), len(train_feats), len(test_feats)) >= 2:
        fd = synth.fd_report(synthetic_feats, test_feats, train_feats, reference=source_feats, seed=seed)
        report.update(fd_cxr=fd["fd"], fd_cxr_floor=fd["fd_floor"], fd_cxr_untranslated=fd["fd_reference"],
                      kid=fd["kid"], kid_std=fd["kid_std"])
        # the same with the period-two texture blurred away from every set: what is left to compare
        fd_blurred = synth.fd_report(
            features(feature_net, blurred_synthetic), features(feature_net, blurred_test),
            features(feature_net, synth.binomial_blur(real_covid_train)),
            reference=(features(feature_net, synth.binomial_blur(source_images)) if source_images is not None
                       else None), seed=seed)
        report.update(fd_cxr_blurred=fd_blurred["fd"], fd_cxr_blurred_floor=fd_blurred["fd_floor"],
                      fd_cxr_blurred_untranslated=fd_blurred["fd_reference"])
    else:
        report.update(fd_cxr=None, fd_cxr_floor=None, fd_cxr_untranslated=None, kid=None, kid_std=None,
                      fd_cxr_blurred=None, fd_cxr_blurred_floor=None, fd_cxr_blurred_untranslated=None)
    fid, fid_note = quiet_inception_fid(synthetic_images, real_covid_test) if inception else (None, "not asked for")
    report.update(fid_inception=fid, fid_inception_note=fid_note)
    threshold = oracle_threshold(oracle)
    rates = synth.oracle_rates(covid_probability(oracle, source_images) if source_images is not None else None,
                               covid_probability(oracle, synthetic_images), threshold)
    report.update({key: rates[key] for key in (
        "oracle_covid_rate_before", "oracle_covid_rate_before_ci95", "oracle_covid_rate_after",
        "oracle_covid_rate_after_ci95")}, oracle_threshold=rates["threshold"])
    # the texture check: the same calls once the finest texture (period two) is filtered away
    real = synth.oracle_rates(covid_probability(oracle, real_covid_test), covid_probability(oracle, blurred_test),
                              threshold)
    blurred = synth.oracle_rates(None, covid_probability(oracle, blurred_synthetic), threshold)
    report.update(oracle_covid_rate_real=real["oracle_covid_rate_before"],
                  oracle_covid_rate_real_ci95=real["oracle_covid_rate_before_ci95"],
                  oracle_covid_rate_real_blurred=real["oracle_covid_rate_after"],
                  oracle_covid_rate_real_blurred_ci95=real["oracle_covid_rate_after_ci95"],
                  oracle_covid_rate_after_blurred=blurred["oracle_covid_rate_after"],
                  oracle_covid_rate_after_blurred_ci95=blurred["oracle_covid_rate_after_ci95"])
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


def quiet_inception_fid(images_a: np.ndarray, images_b: np.ndarray) -> tuple[float | None, str]:
    """Inception FID and a message: the value, or why it was skipped (weights not on this machine)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = synth.inception_fid(images_a, images_b)
    message = str(caught[0].message) if caught else f"Inception FID = {value:.2f}"
    return value, message
