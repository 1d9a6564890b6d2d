"""What synthetic chest X-rays really are: fidelity, effect, anatomy, copies, detectability.

The same measures serve every generator family (the CycleGAN translators ``G_NC`` and
``G_PC``, a diffusion model): each function takes arrays (images, masks, features,
classifier probabilities) and returns plain numbers, so nothing here depends on how the
images or the features were made. Features come from whatever network the notebook
chose (e.g. the global-average-pooling layer of a classifier trained on *real* images
only; a network that has seen the synthetic images during training is a biased judge).

=========================  ============================================================
measure                    question it answers
=========================  ============================================================
:func:`fd_report`          are synthetic images distributed like real COVID images,
                           compared with the real-vs-real floor? (FD, KID)
:func:`inception_fid`      the customary Inception-v3 FID, when its weights are local
:func:`oracle_rates`       does a real-data classifier call them COVID, before / after?
:func:`lesion_change`      where did the generator add density: inside the lungs or not?
:func:`anatomy_change`     did it keep the anatomy it should not touch?
:func:`memorisation_report` are some synthetic images near-copies of training images?
:func:`detectability_auc`  can a linear probe tell synthetic from real?
:func:`synthesis_table`    all of the above, one row per generator
=========================  ============================================================

Images are ``(N, H, W)`` ``uint8`` arrays (0..255) as :func:`cxrlib.data.io.read_image`
gives them; masks are ``(N, H, W)`` bool; features are ``(N, D)`` float arrays.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import linalg, ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import PredefinedSplit, StratifiedGroupKFold, cross_val_predict
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cxrlib.evaluate.stats import bootstrap_ci, wilson_ci

#: Added density below this (in [0, 1] intensity units, ~13 grey levels) counts as noise.
LESION_THRESHOLD = 0.05
#: skimage's default SSIM window is 7x7: a pixel's SSIM sees 3 pixels to each side.
_SSIM_WIN_SIZE = 7
#: ImageNet statistics that torchvision's Inception-v3 weights expect.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_INCEPTION_SIZE = 299


# ----------------------------------------------------------------------------- internals


def _features(values: npt.ArrayLike, name: str, *, min_rows: int = 1) -> np.ndarray:
    """``values`` as a finite ``(N, D)`` float64 array, or a ValueError naming ``name``."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name} must be (N, D) features, got shape {array.shape}")
    if len(array) < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {len(array)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf")
    return array


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")


def _image_stack(images: npt.ArrayLike, name: str) -> np.ndarray:
    """``(H, W)`` or ``(N, H, W)`` images -> ``(N, H, W)`` float64 in [0, 1]."""
    array = np.asarray(images)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) or (H, W) images, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if np.issubdtype(array.dtype, np.floating) and array.size and array.min() >= 0 and array.max() <= 1:
        return array.astype(np.float64)
    raise ValueError(f"{name} must be uint8 (0..255) or float in [0, 1], got {array.dtype}")


def _mask_stack(masks: npt.ArrayLike, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Bool masks broadcast to ``shape`` (one ``(H, W)`` mask may serve every image)."""
    array = np.asarray(masks, dtype=bool)
    if array.ndim == 2:
        array = array[None]
    try:
        return np.broadcast_to(array, shape)
    except ValueError:
        raise ValueError(f"{name} {array.shape} does not match the images {shape}") from None


def _mean_ci(values: np.ndarray, seed: int) -> tuple[float, float]:
    """Bootstrap 95% interval of the mean of per-image values (NaN dropped)."""
    _, low, high = bootstrap_ci(values, seed=seed)
    return low, high


# ----------------------------------------------------------------------------- FD and KID


def frechet_distance(feats_a: npt.ArrayLike, feats_b: npt.ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the "F" of FID).

    ``feats_a``: ``(N, D)``, ``feats_b``: ``(M, D)`` floats, N, M >= 2. Returns
    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` >= 0, 0 for identical sets.
    The trace of the matrix square root is computed exactly without ``scipy.linalg.sqrtm``
    (which is slow for large ``D`` and leaves complex rounding): with ``D`` at most the
    smaller set's size, as ``sum_i sqrt(l_i)`` over the eigenvalues of the symmetric
    ``S_a^(1/2) S_b S_a^(1/2)`` (the eigenvalues of ``S_a S_b``); with more dimensions than
    images (2048-dim Inception features of a few hundred images), as the sum of the singular
    values of ``A B^T / sqrt((N - 1)(M - 1))`` for the centred feature matrices ``A``, ``B``,
    whose squares are the non-zero eigenvalues of ``S_a S_b``. Eigenvalues that rounding
    pushes below zero count as zero, so singular covariances need no ``eps``.

    What it can show: how far apart the two feature distributions are in mean and
    spread, in one number; compare it with :func:`fd_floor`, the distance between two
    real sets, never with FIDs computed with other features or sample sizes. What it
    cannot show: which images are bad, or whether a low value means realism or copies of
    the training set (see :func:`memorisation_report`). The estimate is biased upwards
    and unstable when N or M is not much larger than D (the covariances are then
    rank-deficient), so prefer low-dimensional features (a global-average-pooling layer
    of 64-512 dims) unless thousands of images are available.
    """
    a = _features(feats_a, "feats_a", min_rows=2)
    b = _features(feats_b, "feats_b", min_rows=2)
    _same_dim(a, b)
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    centred_a, centred_b = a - mean_a, b - mean_b
    trace_a = float(np.sum(centred_a**2) / (len(a) - 1))  # tr(S_a)
    trace_b = float(np.sum(centred_b**2) / (len(b) - 1))
    distance = float(np.sum((mean_a - mean_b) ** 2) + trace_a + trace_b
                     - 2.0 * _trace_sqrt_product(centred_a, centred_b))
    return max(distance, 0.0)  # rounding can leave a tiny negative number for equal sets


def _trace_sqrt_product(centred_a: np.ndarray, centred_b: np.ndarray) -> float:
    """``tr((S_a S_b)^(1/2))`` of the covariances of two centred feature matrices ``(N, D)``,
    ``(M, D)`` (see :func:`frechet_distance` for the two exact routes)."""
    n, m, dim = len(centred_a), len(centred_b), centred_a.shape[1]
    if dim <= min(n, m):
        cov_a = np.atleast_2d(np.cov(centred_a, rowvar=False))
        cov_b = np.atleast_2d(np.cov(centred_b, rowvar=False))
        values, vectors = linalg.eigh(cov_a)
        root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
        middle = root_a @ cov_b @ root_a
        return float(np.sqrt(np.clip(linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum())
    cross = centred_a @ centred_b.T / np.sqrt((n - 1) * (m - 1))
    return float(linalg.svdvals(cross).sum())


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between equal-size samples with k(x, y) = (x.y / d + 1)^3."""
    m, dim = x.shape
    k_xx = (x @ x.T / dim + 1.0) ** 3
    k_yy = (y @ y.T / dim + 1.0) ** 3
    k_xy = (x @ y.T / dim + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kernel_inception_distance(
    feats_a: npt.ArrayLike,
    feats_b: npt.ArrayLike,
    *,
    n_subsets: int = 50,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel distance (KID; Bińkowski et al. 2018) between two feature sets: ``(mean, std)``.

    ``feats_a``: ``(N, D)``, ``feats_b``: ``(M, D)`` floats. Over ``n_subsets`` random
    subsets of ``min(subset_size, N, M)`` rows drawn from each set (without replacement),
    the unbiased squared maximum mean discrepancy with the cubic polynomial kernel
    ``k(x, y) = (x . y / D + 1)^3`` is averaged; ``std`` is its spread over subsets.

    What it can show: the same question as :func:`frechet_distance`, with an estimate
    that is unbiased (about 0 for one distribution, and it may come out slightly
    negative), so small sets and different set sizes compare more fairly. What it
    cannot show: more than FD does about single images or copies; the subset std
    describes subsampling noise, not a confidence interval over new images.
    """
    a = _features(feats_a, "feats_a", min_rows=2)
    b = _features(feats_b, "feats_b", min_rows=2)
    _same_dim(a, b)
    size = min(int(subset_size), len(a), len(b))
    if size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    rng = np.random.default_rng(seed)
    values = np.array([
        _polynomial_mmd2(
            a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)]
        )
        for _ in range(int(n_subsets))
    ])
    return float(values.mean()), float(values.std())


def fd_floor(
    real_train_feats: npt.ArrayLike,
    real_test_feats: npt.ArrayLike,
    *,
    n_samples: int | None = None,
    n_repeats: int = 5,
    seed: int = 0,
) -> float:
    """Fréchet distance between two real sets (train vs test): the value a perfect generator would get.

    ``real_train_feats``: ``(N, D)``, ``real_test_feats``: ``(M, D)``. FD grows as sets
    shrink, so when ``n_samples`` (e.g. the number of synthetic images) is smaller than N,
    ``n_samples`` training rows are drawn without replacement ``n_repeats`` times and the
    distances averaged; the floor then matches the synthetic-vs-test comparison in size.

    What it can show: how much of an FD is sampling noise and real variation between
    splits (patients, sites), the yardstick for "close to real". What it cannot show:
    anything about the generator; if train and test come from different sources the
    floor is high and hides differences.
    """
    train = _features(real_train_feats, "real_train_feats", min_rows=2)
    test = _features(real_test_feats, "real_test_feats", min_rows=2)
    if n_samples is None or n_samples >= len(train):
        return frechet_distance(train, test)
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2, got {n_samples}")
    rng = np.random.default_rng(seed)
    return float(np.mean([
        frechet_distance(train[rng.choice(len(train), n_samples, replace=False)], test)
        for _ in range(max(int(n_repeats), 1))
    ]))


def fd_report(
    synthetic: npt.ArrayLike,
    real_test: npt.ArrayLike,
    real_train: npt.ArrayLike,
    reference: npt.ArrayLike | None = None,
    *,
    kid_subsets: int = 50,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float | None]:
    """FD and KID of synthetic features against real test features, with the floor and a reference.

    All arguments are ``(N_i, D)`` features of one network: ``synthetic`` (the generated
    images), ``real_test`` (real images of the target class, e.g. COVID-19, test split),
    ``real_train`` (real target-class training images, for :func:`fd_floor`) and
    optionally ``reference`` (e.g. the untranslated source images, Normal for ``G_NC``).

    Returns ``fd`` (synthetic vs real test), ``fd_floor`` (real train vs real test at the
    synthetic set's size), ``kid`` and ``kid_std`` (synthetic vs real test) and
    ``fd_reference`` (reference vs real test, ``None`` without a reference). Read
    ``fd`` between the two: near ``fd_floor`` is as close as real images get, and a
    translator that moved images towards real COVID has ``fd`` well below
    ``fd_reference``.
    """
    synthetic = _features(synthetic, "synthetic", min_rows=2)
    real_test = _features(real_test, "real_test", min_rows=2)
    kid, kid_std = kernel_inception_distance(
        synthetic, real_test, n_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
    )
    return {
        "fd": frechet_distance(synthetic, real_test),
        "fd_floor": fd_floor(real_train, real_test, n_samples=len(synthetic), seed=seed),
        "kid": kid,
        "kid_std": kid_std,
        "fd_reference": None if reference is None else frechet_distance(reference, real_test),
    }


# ----------------------------------------------------------------------------- Inception FID


def _inception_weights_file() -> tuple[str, str]:
    """File name and URL of torchvision's Inception-v3 ImageNet weights."""
    from torchvision.models import Inception_V3_Weights

    url = Inception_V3_Weights.IMAGENET1K_V1.url
    return url.rsplit("/", 1)[-1], url


def inception_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """Where the Inception-v3 weights are looked for: ``weights_path``, or
    ``<torch.hub.get_dir()>/checkpoints/<file name from the torchvision weights URL>``."""
    if weights_path is not None:
        return Path(weights_path).expanduser()
    import torch

    file_name, _ = _inception_weights_file()
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _warn_missing_weights(path: Path) -> None:
    """The one message a missing weights file produces (pointing at the caller's caller)."""
    file_name, url = _inception_weights_file()
    warnings.warn(
        f"Inception-v3 FID skipped: weights not found at {path}. To compute it, copy "
        f"{file_name} (from {url}) to {path.parent}/ or pass weights_path=...; "
        "nothing is downloaded.",
        stacklevel=3,
    )


def inception_features(
    images: npt.ArrayLike,
    *,
    weights_path: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 32,
) -> np.ndarray | None:
    """Inception-v3 pool3 features ``(N, 2048)`` float64 of grayscale images, or ``None``.

    ``images``: ``(N, H, W)`` ``uint8``. Each image is repeated to 3 channels, resized to
    299x299 (bilinear, antialiased), ImageNet-normalised and passed through torchvision's
    Inception-v3 with ``fc`` replaced by an identity. The weights are read from
    :func:`inception_weights_path` and never downloaded: when the file is absent a
    warning says where to put it and ``None`` is returned.
    """
    path = inception_weights_path(weights_path)
    if not path.is_file():
        _warn_missing_weights(path)
        return None
    import torch
    from torchvision.models import inception_v3

    stack = np.asarray(images)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3 or stack.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W) uint8, got {stack.shape} {stack.dtype}")
    # transform_input=True is how torchvision builds this model for these weights: it maps
    # ImageNet-normalised input to the [-1, 1] range the original weights were trained on
    model = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.fc = torch.nn.Identity()
    model.eval().to(device)
    mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)
    features = []
    with torch.inference_mode():
        for start in range(0, len(stack), batch_size):
            batch = torch.from_numpy(stack[start : start + batch_size]).to(device)
            batch = batch.float().div(255.0).unsqueeze(1)
            batch = torch.nn.functional.interpolate(
                batch, size=(_INCEPTION_SIZE, _INCEPTION_SIZE), mode="bilinear",
                align_corners=False, antialias=True,
            )
            batch = (batch.expand(-1, 3, -1, -1) - mean) / std
            features.append(model(batch).double().cpu().numpy())
    return np.concatenate(features) if features else np.empty((0, 2048))


def inception_fid(
    images_a: npt.ArrayLike,
    images_b: npt.ArrayLike,
    *,
    weights_path: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 32,
) -> float | None:
    """Inception-v3 FID between two image sets ``(N, H, W)`` / ``(M, H, W)`` ``uint8``, or ``None``.

    :func:`frechet_distance` of :func:`inception_features`; ``None`` (with one warning
    naming the expected weights file) when torchvision's Inception-v3 weights are not on
    this machine.

    What it can show: the number papers report (e.g. FID 68.4 for "This X-Ray Does Not
    Exist"), for rough comparison only: torchvision's Inception differs slightly from the
    TensorFlow graph most papers used, and ImageNet features are not chest X-ray
    features. What it cannot show: clinical plausibility; with 2048 dimensions it needs
    thousands of images per set to be stable (see :func:`frechet_distance`).
    """
    path = inception_weights_path(weights_path)
    if not path.is_file():
        _warn_missing_weights(path)
        return None
    feats_a = inception_features(images_a, weights_path=path, device=device, batch_size=batch_size)
    feats_b = inception_features(images_b, weights_path=path, device=device, batch_size=batch_size)
    if feats_a is None or feats_b is None:  # the file vanished in between
        return None
    return frechet_distance(feats_a, feats_b)


# ----------------------------------------------------------------------------- oracle


def binomial_blur(images: npt.ArrayLike) -> np.ndarray:
    """``images`` ``(N, H, W)`` (or ``(H, W)``) uint8 filtered by ``[1, 2, 1] / 4`` along both axes
    (mirrored borders), rounded back to uint8.

    The filter's response is ``cos(w / 2) ** 2``: 1 at constant, 0.5 at half the Nyquist
    frequency and zero at the Nyquist frequency, so it removes exactly the patterns of period
    two (a checkerboard, stripes one pixel wide) and keeps what a reader sees. A judge whose
    verdicts change under it reads that finest texture, not the anatomy
    (:func:`cxrlib.judges.judge_generator`'s ``*_blurred`` rates)."""
    from scipy import ndimage

    array = np.asarray(images)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"images must be (N, H, W) or (H, W) uint8, got {array.ndim}-d {array.dtype}")
    kernel = np.array([0.25, 0.5, 0.25])
    out = ndimage.convolve1d(array.astype(np.float64), kernel, axis=-1, mode="mirror")
    out = ndimage.convolve1d(out, kernel, axis=-2, mode="mirror")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def oracle_rates(
    prob_covid_before: npt.ArrayLike | None,
    prob_covid_after: npt.ArrayLike,
    threshold: float,
) -> dict[str, Any]:
    """How often a real-data classifier (the "oracle") calls images COVID, before and after translation.

    ``prob_covid_before``: ``(N,)`` COVID probabilities of the source images (``None``
    for generators without a source image, e.g. diffusion); ``prob_covid_after``:
    ``(N,)`` of the synthetic images; ``threshold``: the operating point, chosen on the
    validation split (probability >= threshold counts as COVID). Returns
    ``oracle_covid_rate_before`` / ``oracle_covid_rate_after`` in [0, 1], each with a
    Wilson 95% interval (``..._ci95``: ``(low, high)``), ``threshold`` and ``n``.

    What it can show: whether translation moves images across a real-data classifier's
    decision boundary. What it cannot show: that the images look like COVID-19 to a
    radiologist; a generator can learn whatever the classifier keys on (texture, source
    artefacts), so the oracle must be trained on real images only and never on the
    generator's output.
    """
    after = np.asarray(prob_covid_after, dtype=np.float64).ravel()
    n = len(after)
    result: dict[str, Any] = {}
    for key, probs in (("before", prob_covid_before), ("after", after)):
        if probs is None:
            result[f"oracle_covid_rate_{key}"] = None
            result[f"oracle_covid_rate_{key}_ci95"] = None
            continue
        probs = np.asarray(probs, dtype=np.float64).ravel()
        if len(probs) != n:
            raise ValueError(f"prob_covid_before has {len(probs)} values, prob_covid_after {n}")
        k = int(np.sum(probs >= threshold))
        result[f"oracle_covid_rate_{key}"] = k / n if n else float("nan")
        result[f"oracle_covid_rate_{key}_ci95"] = wilson_ci(k, n)
    result["threshold"] = float(threshold)
    result["n"] = n
    return result


# ----------------------------------------------------------------------------- phantom lesions


def lesion_change(
    before: npt.ArrayLike,
    after: npt.ArrayLike,
    lung_mask: npt.ArrayLike,
    *,
    threshold: float = LESION_THRESHOLD,
    seed: int = 0,
) -> dict[str, Any]:
    """Where a generator added density: inside the lungs or outside them.

    ``before`` / ``after``: ``(N, H, W)`` ``uint8`` source and translated images (or
    floats in [0, 1]); ``lung_mask``: ``(N, H, W)`` or one ``(H, W)`` bool lung mask of the
    source. Added density is ``max(after - before, 0)`` in [0, 1] intensity units, with
    values below ``threshold`` set to 0 (generator noise). Per image, then averaged over
    images:

    - ``lesion_added_inside_lungs`` / ``lesion_added_outside_lungs``: mean added intensity
      per pixel of the region (all region pixels, in [0, 1]);
    - ``lesion_added_inside_lungs_fraction`` / ``lesion_added_outside_lungs_fraction``:
      share of the image's total added signal that lies in the region (they sum to 1),
      with a bootstrap 95% interval ``lesion_added_inside_lungs_fraction_ci95``;
      images with no added density above ``threshold`` have no share and are counted in
      ``n_unchanged`` instead; ``n`` is the number of images.

    What it can show: whether opacities appear where COVID-19 findings live (in the
    lungs) or elsewhere (borders, text, outside the body: signs of a shortcut). What it
    cannot show: whether the added density looks like real ground-glass or consolidation
    (pattern, peripheral / bilateral distribution), nor density the generator removed.
    """
    before_px = _image_stack(before, "before")
    after_px = _image_stack(after, "after")
    if before_px.shape != after_px.shape:
        raise ValueError(f"before {before_px.shape} and after {after_px.shape} differ in shape")
    lungs = _mask_stack(lung_mask, before_px.shape, "lung_mask")
    added = np.clip(after_px - before_px, 0.0, None)
    added[added < threshold] = 0.0

    axes = (1, 2)
    added_inside = (added * lungs).sum(axis=axes)
    added_outside = (added * ~lungs).sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_pixel_inside = added_inside / lungs.sum(axis=axes)
        per_pixel_outside = added_outside / (~lungs).sum(axis=axes)
        total = added_inside + added_outside
        fraction_inside = np.where(total > 0, added_inside / total, np.nan)
    changed = total > 0
    fraction_ci = _mean_ci(fraction_inside, seed) if changed.any() else (float("nan"),) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN means: nothing to average
        mean_fraction_inside = float(np.nanmean(fraction_inside))
        return {
            "lesion_added_inside_lungs": float(np.nanmean(per_pixel_inside)),
            "lesion_added_outside_lungs": float(np.nanmean(per_pixel_outside)),
            "lesion_added_inside_lungs_fraction": mean_fraction_inside,
            "lesion_added_outside_lungs_fraction": 1.0 - mean_fraction_inside,
            "lesion_added_inside_lungs_fraction_ci95": fraction_ci,
            "n": len(added),
            "n_unchanged": int((~changed).sum()),
        }


def anatomy_change(
    before: npt.ArrayLike,
    after: npt.ArrayLike,
    exclude_mask: npt.ArrayLike,
    *,
    dilation: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """SSIM and L1 between source and translated images, outside the region allowed to change.

    ``before`` / ``after``: ``(N, H, W)`` ``uint8`` (or floats in [0, 1]);
    ``exclude_mask``: ``(N, H, W)`` or ``(H, W)`` bool, e.g. the lesion masks (or the lungs).
    The mask is grown by ``dilation`` pixels; with ``dilation >= 3`` the 7x7 SSIM window of
    a kept pixel never reaches inside the mask, so changes inside cannot move the result.
    Per image, the SSIM map of ``skimage.metrics.structural_similarity(full=True)`` and the
    absolute difference (in [0, 1] units) are averaged over the kept pixels (the SSIM map
    also leaves out the 3-pixel border, as skimage's mean does); then over images.
    Returns ``anatomy_ssim`` (1 = unchanged), ``anatomy_l1`` (0 = unchanged), their
    bootstrap 95% intervals (``..._ci95``) and ``n``; an image with nothing left to compare
    gives NaN and is left out of the means.

    What it can show: whether a translator kept ribs, heart, mediastinum and devices
    where it had no reason to change them. What it cannot show: realism (an untouched
    copy scores perfectly) or anything for generators without a source image.
    """
    from skimage.metrics import structural_similarity

    before_px = _image_stack(before, "before")
    after_px = _image_stack(after, "after")
    if before_px.shape != after_px.shape:
        raise ValueError(f"before {before_px.shape} and after {after_px.shape} differ in shape")
    excluded = _mask_stack(exclude_mask, before_px.shape, "exclude_mask")
    border = (_SSIM_WIN_SIZE - 1) // 2
    ssim_values, l1_values = [], []
    for image_before, image_after, image_excluded in zip(before_px, after_px, excluded, strict=True):
        if dilation > 0 and image_excluded.any():
            # a square element grows the mask in the chessboard metric, the shape of the window
            image_excluded = ndimage.binary_dilation(
                image_excluded, structure=np.ones((3, 3), bool), iterations=int(dilation)
            )
        kept = ~image_excluded
        _, ssim_map = structural_similarity(
            image_before, image_after, data_range=1.0, win_size=_SSIM_WIN_SIZE, full=True
        )
        interior = np.zeros_like(kept)
        interior[border:-border, border:-border] = True
        ssim_kept = kept & interior
        ssim_values.append(ssim_map[ssim_kept].mean() if ssim_kept.any() else np.nan)
        l1_values.append(np.abs(image_after - image_before)[kept].mean() if kept.any() else np.nan)
    ssim_values, l1_values = np.array(ssim_values), np.array(l1_values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN means: nothing to average
        return {
            "anatomy_ssim": float(np.nanmean(ssim_values)),
            "anatomy_ssim_ci95": _mean_ci(ssim_values, seed),
            "anatomy_l1": float(np.nanmean(l1_values)),
            "anatomy_l1_ci95": _mean_ci(l1_values, seed),
            "n": len(ssim_values),
        }


# ----------------------------------------------------------------------------- memorisation


def pixel_features(images: npt.ArrayLike, *, size: int = 32) -> np.ndarray:
    """Images ``(N, H, W)`` ``uint8`` -> ``(N, size * size)`` float64 in [0, 1]: each image
    resized (antialiased) to ``size x size`` and flattened; a stand-in for learned features
    in :func:`memorisation_report` when none are available (it finds near-identical pixels,
    not near-identical content)."""
    from skimage.transform import resize

    stack = _image_stack(images, "images")
    return np.stack([
        resize(image, (size, size), anti_aliasing=True, preserve_range=True).ravel()
        for image in stack
    ]) if len(stack) else np.empty((0, size * size))


def nearest_neighbour_distances(
    query_feats: npt.ArrayLike,
    reference_feats: npt.ArrayLike,
    *,
    exclude_self: bool = False,
    metric: str = "euclidean",
) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each query row to its nearest reference row: ``(distances (N,), indices (N,))``.

    ``query_feats``: ``(N, D)``; ``reference_feats``: ``(M, D)``; ``metric``: any
    ``sklearn.neighbors.NearestNeighbors`` metric. ``exclude_self=True`` is for a set
    against itself (query row i is reference row i): row i's own entry is skipped, while
    an exact duplicate elsewhere in the set still counts (distance 0).
    """
    query = _features(query_feats, "query_feats")
    reference = _features(reference_feats, "reference_feats")
    _same_dim(query, reference)
    if exclude_self and len(query) != len(reference):
        raise ValueError("exclude_self needs the query and reference to be the same set")
    n_neighbours = 2 if exclude_self else 1
    if len(reference) < n_neighbours:
        raise ValueError(f"reference_feats needs at least {n_neighbours} rows")
    index = NearestNeighbors(n_neighbors=n_neighbours, metric=metric).fit(reference)
    distances, indices = index.kneighbors(query)
    if not exclude_self:
        return distances[:, 0], indices[:, 0]
    # with ties at distance 0 the row itself need not come first; take the other one
    rows = np.arange(len(query))
    column = (indices[:, 0] == rows).astype(int)
    return distances[rows, column], indices[rows, column]


def memorisation_report(
    synthetic_feats: npt.ArrayLike,
    train_feats: npt.ArrayLike,
    *,
    quantile: float = 0.01,
    metric: str = "euclidean",
) -> dict[str, Any]:
    """Synthetic images that sit closer to a training image than training images sit to each other.

    ``synthetic_feats``: ``(N, D)``; ``train_feats``: ``(M, D)`` features of the images the
    generator was trained on (or :func:`pixel_features` of both). Each synthetic row's
    nearest-training distance is compared with the ``quantile`` (default 1st percentile)
    of the train-to-train nearest-neighbour distances (self excluded), reported as
    ``nearest_train_distance_p01`` (named for the default quantile; ``quantile`` is
    returned too). Synthetic rows below it are ``possible_copy_indices`` (``(K,)`` int
    array) and ``possible_copy_fraction`` = K / N; ``median_distance_ratio`` is the median
    synthetic-to-train distance over the median train-to-train distance (< 1: synthetic
    images crowd the training images). Genuinely new images fall below the threshold
    about ``quantile`` of the time by chance, so read ``possible_copy_fraction`` against
    ``quantile``, not against 0. Per-row arrays ``nearest_train_distance`` and
    ``nearest_train_index`` come back for inspection; show the flagged pairs side by side.

    What it can show: near-copies of training images, which a low FD would reward.
    What it cannot show: copying of parts (a lesion pasted into a new chest) or copies the
    features do not see. A translator's output is close to its own source image by
    design: compare it with the target-domain training images (real COVID-19 the
    generator saw), not with the set its inputs came from.
    """
    synthetic = _features(synthetic_feats, "synthetic_feats")
    train = _features(train_feats, "train_feats", min_rows=2)
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    train_distances, _ = nearest_neighbour_distances(train, train, exclude_self=True, metric=metric)
    synthetic_distances, synthetic_index = nearest_neighbour_distances(synthetic, train, metric=metric)
    threshold = float(np.quantile(train_distances, quantile))
    # a zero threshold (duplicates in the training set) still flags exact copies
    below = synthetic_distances < threshold if threshold > 0 else synthetic_distances <= 0
    copies = np.flatnonzero(below)
    median_train = float(np.median(train_distances))
    return {
        "nearest_train_distance_p01": threshold,
        "quantile": float(quantile),
        "possible_copy_fraction": len(copies) / len(synthetic),
        "possible_copy_indices": copies,
        "median_distance_ratio": (
            float(np.median(synthetic_distances)) / median_train if median_train > 0 else float("nan")
        ),
        "nearest_train_distance": synthetic_distances,
        "nearest_train_index": synthetic_index,
        "n_synthetic": len(synthetic),
        "n_train": len(train),
    }


# ----------------------------------------------------------------------------- detectability


def grouped_folds(
    labels: npt.ArrayLike,
    groups: npt.ArrayLike | None = None,
    *,
    n_splits: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Fold number ``(N,)`` int in ``0..n_splits-1`` per sample, stratified by ``labels``.

    Every group (patient, or source image) lies in exactly one fold
    (``sklearn.model_selection.StratifiedGroupKFold``); ``groups=None`` makes every sample
    its own group.
    """
    labels = np.asarray(labels).ravel()
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups).ravel()
    if len(groups) != len(labels):
        raise ValueError(f"groups has {len(groups)} entries for {len(labels)} labels")
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise ValueError(f"{n_groups} groups cannot fill {n_splits} folds; lower n_splits")
    folds = np.full(len(labels), -1)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for fold, (_, test_index) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[test_index] = fold
    return folds


def detectability_auc(
    real_feats: npt.ArrayLike,
    synthetic_feats: npt.ArrayLike,
    *,
    groups_real: npt.ArrayLike | None = None,
    groups_synthetic: npt.ArrayLike | None = None,
    n_splits: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """How well a linear probe tells synthetic from real features: out-of-fold ROC AUC.

    ``real_feats``: ``(N, D)``, ``synthetic_feats``: ``(M, D)``. A logistic regression on
    standardised features is trained in ``n_splits`` cross-validation folds (label 1 =
    synthetic); the AUC of the pooled out-of-fold probabilities is reported with a
    bootstrap 95% interval (:func:`cxrlib.evaluate.stats.bootstrap_ci`, resampling whole
    groups). ``groups_real`` / ``groups_synthetic``: ``(N,)`` / ``(M,)`` ids in one
    namespace, e.g. the real images' ``patient_id`` and the synthetic images' source
    patient (from ``parse_origin``), so an image, its patient's other images and its
    translations never straddle folds; ``None`` makes each sample its own group.
    Returns ``auc`` (0.5 = indistinguishable, 1.0 = trivially detectable; below 0.5 is
    noise), ``auc_ci95`` ``(low, high)``, ``n_real`` and ``n_synthetic``.

    What it can show: whether synthetic images carry a consistent signature in this
    feature space (the separate UMAP region Zunair & Hamza saw, as a number). What it
    cannot show: that no detector could tell them apart (a probe on other features or a
    CNN on pixels may), and a high AUC may come from confounders (resolution, source,
    post-processing) rather than anatomy; compare like with like, e.g. real COVID-19 vs
    synthetic COVID-19 from the same sites.
    """
    real = _features(real_feats, "real_feats", min_rows=2)
    synthetic = _features(synthetic_feats, "synthetic_feats", min_rows=2)
    _same_dim(real, synthetic)
    features = np.concatenate([real, synthetic])
    labels = np.concatenate([np.zeros(len(real), int), np.ones(len(synthetic), int)])

    def ids(values: npt.ArrayLike | None, count: int, kind: str) -> np.ndarray:
        if values is None:  # one group per sample, named so it cannot meet a user id
            return np.array([f"\0{kind}{i}" for i in range(count)], dtype=object)
        values = np.asarray(values).ravel()
        if len(values) != count:
            raise ValueError(f"groups_{kind} has {len(values)} entries for {count} samples")
        return values.astype(str).astype(object)

    groups = np.concatenate([
        ids(groups_real, len(real), "real"), ids(groups_synthetic, len(synthetic), "synthetic")
    ])
    folds = grouped_folds(labels, groups, n_splits=n_splits, seed=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_predict(
        probe, features, labels, cv=PredefinedSplit(folds), method="predict_proba"
    )[:, 1]

    def auc_of(sample_index: np.ndarray) -> float:
        picked = sample_index.astype(int)
        if len(np.unique(labels[picked])) < 2:
            return float("nan")  # a resample with one class has no AUC
        return float(roc_auc_score(labels[picked], scores[picked]))

    auc, low, high = bootstrap_ci(
        np.arange(len(labels), dtype=np.float64), stat=auc_of, n_boot=n_boot, seed=seed,
        groups=groups,
    )
    return {"auc": auc, "auc_ci95": (low, high), "n_real": len(real), "n_synthetic": len(synthetic)}


# ----------------------------------------------------------------------------- table


def _is_cell(value: Any) -> bool:
    """Numbers, strings, None and tuples (intervals) go into the table; arrays do not."""
    return value is None or isinstance(value, str | bool | int | float | np.number | tuple)


def synthesis_table(reports: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Generators side by side: one row per generator (index = its name), one column per metric.

    ``reports``: ``{generator name: report}``, where a report is a dict of metrics (the
    return values of the functions above, merged) and may hold whole sections as nested
    dicts, whose keys become ``<section>_<key>`` (unless they already start with it):
    ``{"G_NC": {**fd_report(...), "oracle": oracle_rates(...), "detectability":
    detectability_auc(...)}}`` gives ``fd, ..., oracle_n, ..., detectability_auc``.
    Columns follow first appearance; a metric a generator lacks is NaN; per-sample arrays
    (e.g. ``possible_copy_indices``) are left out; intervals stay ``(low, high)`` tuples.
    """
    rows = {}
    for name, report in reports.items():
        row: dict[str, Any] = {}
        for key, value in report.items():
            if isinstance(value, Mapping):
                for inner, inner_value in value.items():
                    if _is_cell(inner_value):
                        # "oracle" + "oracle_covid_rate_after" needs no second prefix
                        prefixed = inner if inner.startswith(f"{key}_") else f"{key}_{inner}"
                        row[prefixed] = inner_value
            elif _is_cell(value):
                row[key] = value
        rows[name] = row
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    table = pd.DataFrame.from_dict(rows, orient="index", columns=columns) if rows else pd.DataFrame()
    table.index.name = "generator"
    return table
