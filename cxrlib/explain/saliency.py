"""Is a saliency map where the disease is, and does the classifier actually use it?

Two kinds of measure, for any map ``(H, W)`` of non-negative saliency (a Grad-CAM, a
random map, a centre prior):

Localisation, against masks (the phantom knows exactly where its lesions are):

- :func:`lung_overlap` - the share of the map's energy (sum of its values) inside the
  lung mask. A map that reads text, devices or the body outline scores low;
- :func:`lesion_energy` - the share of energy inside the lesion mask. A uniform map scores
  the lesion's area fraction, so only values well above that mean anything;
- :func:`pointing_game` (Zhang et al. 2018) - does the map's maximum fall on a lesion, up to
  ``tolerance`` pixels? Ties for the maximum count as the share of tied pixels that hit.

Each is compared with two baselines made without the classifier (:func:`random_maps`:
smooth random maps at the CAM's own resolution; :func:`centre_prior`: a Gaussian centred
on the image). Lungs and lesions sit near the image centre, so a map can "localise" well
while knowing nothing: a CAM method is only informative where it beats the centre prior.

Faithfulness, against the model (:func:`faithfulness`): pytorch-grad-cam's ROAD
(Rong et al. 2022: remove the most / least relevant pixels by noisy linear imputation and
watch the class probability; ``road`` = (LeRF - MoRF) / 2, higher is more faithful) and
``CamMultImageConfidenceChange`` (multiply the image by the map: the change in the class
probability, higher means the highlighted pixels alone keep the decision).

What they cannot show: that a map is *right* clinically (the phantom's lesion mask is the
truth only for the phantom), nor that a low-resolution map (a 3x3 CAM upsampled) could
ever point at a small lesion. Read every number next to its baselines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from scipy import ndimage

from cxrlib.data.transforms import resize_image
from cxrlib.evaluate.stats import bootstrap_ci, seed_patient_ci, widened

#: Names of the two classifier-free baselines in tables.
RANDOM = "random map"
CENTRE = "centre prior"


def _map(saliency: npt.ArrayLike, name: str = "saliency") -> np.ndarray:
    values = np.asarray(saliency, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"{name} must be a 2-D map (H, W), got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} has NaN or infinite values")
    if (values < 0).any():
        raise ValueError(f"{name} has negative values (min {values.min():.3g}); saliency must be >= 0")
    return values


def _mask(mask: npt.ArrayLike, name: str) -> np.ndarray:
    values = np.asarray(mask)
    if values.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask (H, W), got shape {values.shape}")
    return values > 0


def resize_map(saliency: npt.ArrayLike, shape: tuple[int, int]) -> np.ndarray:
    """A saliency map ``(h, w)`` resized bilinearly to ``shape`` ``(H, W)``: float64, same value range."""
    values = _map(saliency)
    if values.shape == tuple(shape):
        return values
    return resize_image(values.astype(np.float32), tuple(int(s) for s in shape)).astype(np.float64)


def _on_mask_grid(saliency: npt.ArrayLike, mask: npt.ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    region = _mask(mask, name)
    return resize_map(saliency, region.shape), region


def energy_inside(saliency: npt.ArrayLike, mask: npt.ArrayLike, *, name: str = "mask") -> float:
    """Share of the map's total value inside ``mask``, in [0, 1].

    ``saliency`` ``(h, w)`` >= 0 is resized to the mask's grid ``(H, W)`` first (bilinear),
    so a CAM at the network's input size is scored against full-resolution masks. A
    uniform map gives the mask's area fraction. NaN for an all-zero map or an empty mask.
    """
    values, region = _on_mask_grid(saliency, mask, name)
    total = values.sum()
    if total <= 0 or not region.any():
        return float("nan")
    return float(values[region].sum() / total)


def lung_overlap(saliency: npt.ArrayLike, lung_mask: npt.ArrayLike) -> float:
    """Fraction of the map's energy inside the lung mask (:func:`energy_inside`)."""
    return energy_inside(saliency, lung_mask, name="lung_mask")


def lesion_energy(saliency: npt.ArrayLike, lesion_mask: npt.ArrayLike) -> float:
    """Fraction of the map's energy inside the lesion mask; NaN when the image has no lesion."""
    return energy_inside(saliency, lesion_mask, name="lesion_mask")


def pointing_game(saliency: npt.ArrayLike, lesion_mask: npt.ArrayLike, *, tolerance: float = 0.0) -> float:
    """Does the map's maximum fall on the lesion (within ``tolerance`` pixels of the mask grid)?

    1.0 for a hit, 0.0 for a miss. When several pixels share the maximum (a flat map),
    the result is the share of them that hit, i.e. the chance that a maximum picked at
    random hits: a uniform map scores the (dilated) lesion's area fraction, not 0 or 1 by
    the accident of which pixel comes first. NaN when the image has no lesion.
    """
    lesion = _mask(lesion_mask, "lesion_mask")
    return _scores(saliency, None, lesion, _dilated(lesion, tolerance))["pointing_game"]


def centre_prior(shape: tuple[int, int], sigma: float = 0.25) -> np.ndarray:
    """A Gaussian centred on the image, ``sigma`` in units of the image side: ``(H, W)`` float64 in (0, 1]."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    height, width = (int(s) for s in shape)
    rows = (np.arange(height) - (height - 1) / 2) / (sigma * height)
    cols = (np.arange(width) - (width - 1) / 2) / (sigma * width)
    return np.exp(-0.5 * (rows[:, None] ** 2 + cols[None, :] ** 2))


def random_maps(shape: tuple[int, int], n: int, *, grid: int | tuple[int, int] = 7,
                rng: np.random.Generator | int | None = 0) -> np.ndarray:
    """``n`` random maps ``(n, H, W)`` float64 in [0, 1]: uniform noise on a ``grid`` upsampled bilinearly.

    ``grid`` is the CAM's own resolution (e.g. 3 for a 3x3 target layer), so a random map is
    as smooth as a CAM and differs only in *where* it is high. ``rng``: a generator or a seed.
    """
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    grid_hw = (grid, grid) if isinstance(grid, int | np.integer) else tuple(grid)
    if n < 1 or min(grid_hw) < 1:
        raise ValueError(f"need n >= 1 and a grid of at least 1x1, got n={n}, grid={grid_hw}")
    noise = generator.random((n, *grid_hw))
    return np.stack([resize_map(cell, shape) for cell in noise])


def saliency_scores(saliency: npt.ArrayLike, *, lung_mask: npt.ArrayLike | None = None,
                    lesion_mask: npt.ArrayLike | None = None, tolerance: float = 0.0) -> dict[str, float]:
    """``lung_overlap``, ``lesion_energy`` and ``pointing_game`` of one map (NaN for a missing mask)."""
    lung = _mask(lung_mask, "lung_mask") if lung_mask is not None else None
    lesion = _mask(lesion_mask, "lesion_mask") if lesion_mask is not None else None
    return _scores(saliency, lung, lesion, _dilated(lesion, tolerance))


def _dilated(lesion: np.ndarray | None, tolerance: float) -> np.ndarray | None:
    """The pixels within ``tolerance`` of the lesion (what counts as a pointing-game hit)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if lesion is None or tolerance == 0 or not lesion.any():
        return lesion
    return ndimage.distance_transform_edt(~lesion) <= tolerance


def _scores(saliency: npt.ArrayLike, lung: np.ndarray | None, lesion: np.ndarray | None,
            hit_region: np.ndarray | None) -> dict[str, float]:
    """The three scores with the map resized once to the masks' grid (they share one grid)."""
    nan = float("nan")
    grids = {m.shape for m in (lung, lesion) if m is not None}
    if len(grids) > 1:
        raise ValueError(f"lung and lesion masks must share one grid, got shapes {sorted(grids)}")
    values = resize_map(saliency, grids.pop()) if grids else _map(saliency)
    total = values.sum()

    def inside(region: np.ndarray | None) -> float:
        if region is None or total <= 0 or not region.any():
            return nan
        return float(values[region].sum() / total)

    pointing = nan
    if hit_region is not None and hit_region.any():
        peak = values.max()
        pointing = float(hit_region[values >= peak - 1e-12 * max(abs(peak), 1.0)].mean())
    return {"lung_overlap": inside(lung), "lesion_energy": inside(lesion), "pointing_game": pointing}


def score_images(
    cams: Mapping[str, npt.ArrayLike],
    image_ids: Sequence[str],
    *,
    lung_masks: Sequence[np.ndarray | None] | None = None,
    lesion_masks: Sequence[np.ndarray | None] | None = None,
    patient_ids: Sequence[str] | None = None,
    tolerance: float = 0.0,
    n_random: int = 10,
    random_grid: int | tuple[int, int] = 7,
    centre_sigma: float = 0.25,
    seed: int = 0,
) -> pd.DataFrame:
    """Localisation scores of every image under every CAM method and both baselines.

    ``cams``: method name -> maps ``(N, h, w)`` (one per image, in ``image_ids`` order).
    ``lung_masks`` / ``lesion_masks``: one ``(H, W)`` mask per image (``None`` for a missing
    one, e.g. no lesion). Baselines are drawn on each image's mask grid: the mean score of
    ``n_random`` :func:`random_maps` (``random_grid``: the CAM's native resolution; seeded
    by ``(seed, image index)``) and one :func:`centre_prior`. Returns one row per
    ``(method, image)``: ``method, image_id, patient_id, lung_overlap, lesion_energy,
    pointing_game``.
    """
    n = len(image_ids)
    lung_masks = list(lung_masks) if lung_masks is not None else [None] * n
    lesion_masks = list(lesion_masks) if lesion_masks is not None else [None] * n
    patient_ids = list(patient_ids) if patient_ids is not None else list(image_ids)
    if not (len(lung_masks) == len(lesion_masks) == len(patient_ids) == n):
        raise ValueError("image_ids, lung_masks, lesion_masks and patient_ids must have the same length")
    stacks = {}
    for method, maps in cams.items():
        maps = np.asarray(maps)
        if maps.ndim != 3 or len(maps) != n:
            raise ValueError(f"cams[{method!r}] must be (N={n}, h, w), got shape {maps.shape}")
        stacks[method] = maps
    rows = []
    for i, image_id in enumerate(image_ids):
        lung = _mask(lung_masks[i], "lung_mask") if lung_masks[i] is not None else None
        lesion = _mask(lesion_masks[i], "lesion_mask") if lesion_masks[i] is not None else None
        hit_region = _dilated(lesion, tolerance)
        grid_shape = next((m.shape for m in (lesion, lung) if m is not None), None)
        base = {"image_id": str(image_id), "patient_id": str(patient_ids[i])}
        for method, maps in stacks.items():
            rows.append({"method": method, **base, **_scores(maps[i], lung, lesion, hit_region)})
        if grid_shape is None:
            continue
        draws = random_maps(grid_shape, n_random, grid=random_grid, rng=np.random.default_rng([seed, i]))
        random_scores = [_scores(m, lung, lesion, hit_region) for m in draws]
        rows.append({"method": RANDOM, **base,
                     **{k: float(np.mean([s[k] for s in random_scores])) for k in random_scores[0]}})
        rows.append({"method": CENTRE, **base, **_scores(centre_prior(grid_shape, centre_sigma), lung, lesion,
                                                         hit_region)})
    return pd.DataFrame(rows, columns=["method", "image_id", "patient_id", "lung_overlap", "versus_baseline", "lesion_energy",
                                       "pointing_game"])


def _by_seed(per_image: pd.DataFrame, method: str, metric: str) -> pd.DataFrame:
    """``metric`` of ``method`` as a (seed x image) table (NaN where a seed did not score an image)."""
    rows = per_image[per_image["method"] == method]
    seeds = rows["seed"] if "seed" in rows.columns else pd.Series(0, index=rows.index)
    return rows.assign(seed=seeds).pivot_table(index="seed", columns="image_id", values=metric, aggfunc="mean",
                                               dropna=False)


def _patients(per_image: pd.DataFrame, image_ids: Sequence[str]) -> np.ndarray:
    lookup = per_image.drop_duplicates("image_id").set_index("image_id")["patient_id"]
    return lookup.loc[list(image_ids)].to_numpy()


def summarize_scores(per_image: pd.DataFrame, metrics: Sequence[str] | None = None, *, n_boot: int = 1000,
                     seed: int = 0) -> pd.DataFrame:
    """Mean of each metric per method with a 95 % bootstrap interval.

    ``per_image``: :func:`score_images` output (optionally with more metric columns, e.g.
    ``road``), optionally with a ``seed`` column when several training runs' classifiers
    were scored (one block of rows per seed). One seed: the interval resamples patients.
    Several seeds: the estimate is the mean over seeds of each seed's image mean, and the
    interval resamples seeds and then patients (:func:`cxrlib.evaluate.stats.seed_patient_ci`),
    so it covers a rerun with other training runs. One row per method (order kept):
    ``method``, ``n_images``, ``n_seeds`` and per metric ``<metric>``, ``<metric>_low``,
    ``<metric>_high`` (NaN images are left out of that metric).
    """
    metrics = list(metrics) if metrics is not None else [
        c for c in per_image.columns if c not in ("method", "image_id", "patient_id", "seed")]
    several = "seed" in per_image.columns and per_image["seed"].nunique() > 1
    rows = []
    for method, group in per_image.groupby("method", sort=False):
        row: dict[str, object] = {"method": method, "n_images": int(group["image_id"].nunique()),
                                  "n_seeds": int(group["seed"].nunique()) if "seed" in group.columns else 1}
        for metric in metrics:
            if several:
                table = _by_seed(per_image, method, metric)
                values = table.to_numpy(dtype=float)
                estimate, low, high = seed_patient_ci(values, n_boot=n_boot, seed=seed,
                                                      groups=_patients(per_image, table.columns))
                with np.errstate(all="ignore"):
                    low, high = widened((low, high), [np.nanmean(r) if np.isfinite(r).any() else np.nan
                                                      for r in values])
            else:
                estimate, low, high = bootstrap_ci(group[metric].to_numpy(dtype=float), n_boot=n_boot, seed=seed,
                                                   groups=group["patient_id"].to_numpy())
            row.update({metric: estimate, f"{metric}_low": low, f"{metric}_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def versus_baseline(per_image: pd.DataFrame, metrics: Sequence[str], *, baseline: str = RANDOM,
                    n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Each CAM method minus ``baseline`` (a map made without the model), paired by seed and image.

    For every method other than the two baselines and every metric: ``difference`` (mean
    over seeds of each seed's mean per-image difference), its 95% interval resampling seeds
    and then patients (:func:`cxrlib.evaluate.stats.seed_patient_ci`), widened to contain the
    Student-t interval of the per-seed values (:func:`cxrlib.evaluate.stats.widened`), and ``per_seed``
    (each seed's mean difference). A method beats the baseline only where ``low > 0``
    (:mod:`cxrlib.evaluate.claims` words it). Columns: ``method, measure, baseline,
    difference, low, high, per_seed, n_seeds, n_images``.
    """
    rows = []
    methods = [m for m in dict.fromkeys(per_image["method"]) if m not in (RANDOM, CENTRE)]
    for method in methods:
        for metric in metrics:
            method_table = _by_seed(per_image, method, metric)
            base_table = _by_seed(per_image, baseline, metric).reindex(index=method_table.index,
                                                                        columns=method_table.columns)
            difference = method_table.to_numpy(dtype=float) - base_table.to_numpy(dtype=float)
            if not np.isfinite(difference).any():
                continue
            estimate, low, high = seed_patient_ci(difference, n_boot=n_boot, seed=seed,
                                                  groups=_patients(per_image, method_table.columns))
            with np.errstate(all="ignore"):
                per_seed = [float(np.nanmean(r)) if np.isfinite(r).any() else float("nan") for r in difference]
            low, high = widened((low, high), per_seed)
            rows.append({"method": method, "measure": metric, "baseline": baseline, "difference": estimate,
                         "low": low, "high": high, "per_seed": per_seed, "n_seeds": int(difference.shape[0]),
                         "n_images": int(np.isfinite(difference).any(axis=0).sum())})
    return pd.DataFrame(rows, columns=["method", "measure", "baseline", "difference", "low", "high", "per_seed",
                                       "n_seeds", "n_images"])


# --------------------------------------------------------------------------- faithfulness


def faithfulness(
    model: torch.nn.Module,
    images: torch.Tensor | np.ndarray,
    maps: np.ndarray,
    target_classes: Sequence[int] | int,
    *,
    percentiles: Sequence[int] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """ROAD and CamMultImageConfidenceChange (pytorch-grad-cam) of ``maps`` for ``model``.

    ``images``: ``(N, 1, H, W)`` float in [0, 1], what the model takes (a cxrlib
    classifier standardises them itself, so "multiplying by the map" darkens pixels towards
    black). ``maps``: ``(N, H, W)`` in [0, 1] at the input size (min-max scale your own maps).
    ``target_classes``: the class whose softmax probability is watched (one per image, or
    one for all). ROAD's imputation noise comes from torch's generator, seeded here.

    Returns ``{"road": (N,), "road_morf": (N,), "road_lerf": (N,), "cam_mult_change": (N,)}``
    float32: ``road_morf`` / ``road_lerf`` are the probability changes averaged over
    ``percentiles`` when the most / least relevant pixels are removed, ``road = (lerf -
    morf) / 2`` (ROADCombined), ``cam_mult_change`` the probability change of the image
    multiplied by its map. Probabilities, so every value lies in [-1, 1].
    """
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.metrics.road import (
        ROADLeastRelevantFirstAverage,
        ROADMostRelevantFirstAverage,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    tensor = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images, dtype=torch.float32)
    maps = np.asarray(maps, dtype=np.float32)
    if tensor.ndim != 4 or maps.shape != (tensor.shape[0], *tensor.shape[-2:]):
        raise ValueError(f"images must be (N, C, H, W) and maps (N, H, W) of the same N, H, W; got "
                         f"{tuple(tensor.shape)} and {maps.shape}")
    classes = [int(target_classes)] * len(tensor) if isinstance(target_classes, int | np.integer) \
        else [int(c) for c in target_classes]
    if len(classes) != len(tensor):
        raise ValueError(f"{len(classes)} target classes for {len(tensor)} images")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    metrics: dict[str, Callable] = {
        "road_morf": ROADMostRelevantFirstAverage(list(percentiles)),
        "road_lerf": ROADLeastRelevantFirstAverage(list(percentiles)),
        "cam_mult_change": CamMultImageConfidenceChange(),
    }
    out: dict[str, list[np.ndarray]] = {name: [] for name in metrics}
    try:
        for start in range(0, len(tensor), batch_size):
            batch = tensor[start:start + batch_size].to(device)
            targets = [ClassifierOutputSoftmaxTarget(c) for c in classes[start:start + batch_size]]
            for name, metric in metrics.items():
                out[name].append(np.asarray(metric(batch, maps[start:start + batch_size], targets, model),
                                            dtype=np.float32).reshape(-1))
    finally:
        torch.set_rng_state(generator_state)
        model.train(was_training)
    result = {name: np.concatenate(parts) if parts else np.zeros(0, np.float32) for name, parts in out.items()}
    result["road"] = (result["road_lerf"] - result["road_morf"]) / 2
    return result


def score_faithfulness(
    per_image: pd.DataFrame,
    model: torch.nn.Module,
    inputs: torch.Tensor | np.ndarray,
    cams: Mapping[str, np.ndarray],
    target_classes: Sequence[int] | int,
    *,
    percentiles: Sequence[int] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
    random_grid: int | tuple[int, int] = 7,
    centre_sigma: float = 0.25,
    seed: int = 0,
) -> pd.DataFrame:
    """``per_image`` (:func:`score_images` output) with ``road`` and ``cam_mult_change`` filled in.

    Every CAM method of ``cams`` (maps ``(N, H, W)`` at the input size, in ``per_image``'s
    image order) is scored with :func:`faithfulness`, and so are the two baselines at the
    same size: one :func:`random_maps` draw per image on ``random_grid`` (seeded by ``seed``)
    and the :func:`centre_prior`. A model that ignores where the map points scores the same
    for a CAM as for a random map. Rows of methods not scored keep NaN. Returns a copy.
    """
    tensor = torch.as_tensor(np.asarray(inputs) if isinstance(inputs, np.ndarray) else inputs, dtype=torch.float32)
    n, size = len(tensor), tuple(int(s) for s in tensor.shape[-2:])
    reference = {RANDOM: random_maps(size, n, grid=random_grid, rng=seed).astype(np.float32),
                 CENTRE: np.repeat(centre_prior(size, centre_sigma)[None], n, 0).astype(np.float32)}
    scored = per_image.copy()
    for column in ("road", "cam_mult_change"):
        if column not in scored.columns:
            scored[column] = np.nan
    for method, maps in {**cams, **reference}.items():
        where = (scored["method"] == method).to_numpy()
        if where.sum() != n:
            raise ValueError(f"per_image has {where.sum()} row(s) of {method!r}, the inputs {n} image(s)")
        values = faithfulness(model, tensor, np.asarray(maps, dtype=np.float32), target_classes,
                              percentiles=percentiles, seed=seed)
        scored.loc[where, "road"] = values["road"]
        scored.loc[where, "cam_mult_change"] = values["cam_mult_change"]
    return scored


__all__ = [
    "CENTRE", "RANDOM", "centre_prior", "energy_inside", "faithfulness", "lesion_energy", "lung_overlap",
    "pointing_game", "random_maps", "resize_map", "saliency_scores", "score_faithfulness", "score_images",
    "summarize_scores", "versus_baseline",
]

