"""Notebook 02's logic: segment every image of a manifest with the trained U-Net, and score it.

- :func:`segmentation_splits` picks the rows to train and test the U-Net on (patients, not
  images, are drawn), for the notebook 01 manifest or a dataset adapter's unsplit one.
- :func:`predict_label_maps` runs the U-Net at its training resolution and brings the
  logits back to any grid (the image's, or the ground-truth mask's) before the argmax.
- :func:`segment_manifest` writes, for every image, the predicted lung label map and two
  variants of the image for the classifiers: cropped to the lungs and with everything but
  the lungs blanked; it returns the manifest with these files as new columns.
- :func:`evaluate_segmentation` scores the test split against the ground-truth masks at
  their own resolution, with and without post-processing, per image and summarised with
  bootstrap 95% confidence intervals (patients resampled whole).

Predicted label maps are stored as 8-bit PNG grey levels (:data:`LABEL_GREYS`):
0 background, 128 the patient's left lung (image right), 255 the right lung. Any image
viewer shows them, :func:`cxrlib.data.io.read_mask` reads them as the union lung mask
(both lungs are above its threshold), and :func:`read_label_map` gives the labels 0..2 back.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cxrlib.config import resolve_device
from cxrlib.data import manifest as mf
from cxrlib.data.datasets import load_label_map, mask_layout
from cxrlib.data.io import read_image, write_png
from cxrlib.data.masks import (
    BACKGROUND,
    LUNG_LEFT,
    LUNG_QC_COLUMN,
    LUNG_QC_REASON_COLUMN,
    LUNG_RIGHT,
    crop_to_lungs,
    lung_mask_from_labels,
    mask_lungs,
    postprocess_labels,
)
from cxrlib.data.transforms import DEFAULT_OPACITY_KINDS, resize_image
from cxrlib.evaluate.segmentation import per_image_metrics, summarize_metrics
from cxrlib.train.engine import autocast_context, unwrap

#: Label value -> grey level in a stored lung label map PNG.
LABEL_GREYS: dict[int, int] = {BACKGROUND: 0, LUNG_LEFT: 128, LUNG_RIGHT: 255}
#: Columns :func:`segment_manifest` adds (paths relative to the output manifest's folder).
PRED_MASK_COLUMN = "mask_pred_lung"
CROP_COLUMN = "path_lung_crop"
MASKED_COLUMN = "path_lung_masked"
FRACTION_COLUMN = "pred_lung_fraction"
#: Sub-folders of the stage folder for the files of :func:`segment_manifest`.
MASK_FOLDER, CROP_FOLDER, MASKED_FOLDER = "masks", "lung_crop", "lung_masked"

_SAFE_STEM = re.compile(r"^[\w.\- ]+$")


# ----------------------------------------------------------------------------- label-map files


def write_label_map(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write a lung label map ``(H, W)`` with values 0..2 as a grey-level PNG (:data:`LABEL_GREYS`).

    Other values (the heart, 3) are stored as background: the file holds the lungs only.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) label map, got shape {labels.shape}")
    grey = np.zeros(labels.shape, dtype=np.uint8)
    for value, level in LABEL_GREYS.items():
        grey[labels == value] = level
    return write_png(path, grey)


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG written by :func:`write_label_map`: ``(H, W)`` uint8 with values 0..2."""
    grey = read_image(path)
    # nearest stored grey level, so a resampled or re-encoded file still decodes
    levels = np.array(sorted(LABEL_GREYS.values()), dtype=np.int16)
    values = np.array([v for _, v in sorted((g, v) for v, g in LABEL_GREYS.items())], dtype=np.uint8)
    nearest = np.abs(grey.astype(np.int16)[..., None] - levels).argmin(axis=-1)
    return values[nearest]


def file_stem(image_id: str) -> str:
    """A file name for ``image_id``: the id itself when it is safe, else a cleaned id + hash."""
    image_id = str(image_id)
    if _SAFE_STEM.match(image_id) and not image_id.startswith("."):
        return image_id
    cleaned = re.sub(r"[^\w.\-]+", "_", image_id).strip("._") or "image"
    return f"{cleaned}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


# ----------------------------------------------------------------------------- choosing rows


def with_masks(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows that have lung masks (per lung or one union mask)."""
    keep = [mask_layout(row) is not None for row in manifest.to_dict("records")]
    return manifest[keep].copy()


def segmentation_splits(
    manifest: pd.DataFrame,
    *,
    n_train_patients: int = 0,
    n_test_patients: int = 0,
    val_fraction: float = 0.15,
    seed: int = 0,
) -> pd.DataFrame:
    """The rows with lung masks that train, select and test the U-Net, each with its ``split``.

    Whole patients are drawn, never single images (patients who share an identical image,
    by ``content_hash``, count as one group: :func:`cxrlib.data.manifest.patient_groups`).

    - A manifest that is already split (notebook 01): the splits are kept.
      ``n_train_patients > 0`` keeps that many patients of train and val together (drawn
      at random, each keeping its split; val keeps its share, at least one patient),
      ``n_test_patients > 0`` that many test patients; 0 keeps all.
    - An unsplit manifest (every ``split`` empty, as a dataset adapter returns it):
      ``n_test_patients`` (required) patients are drawn for ``test``, then
      ``n_train_patients`` (0: all the others) for training, of which a share
      ``val_fraction`` goes to ``val`` for model selection.

    Raises ``ValueError`` when asked for more patients than there are, or when the result
    has no train, val or test rows.
    """
    rows = with_masks(manifest)
    if rows.empty:
        raise ValueError("no row of the manifest has a lung mask")
    rng = np.random.default_rng(seed)
    groups = mf.patient_groups(rows)
    split = rows["split"].astype(str)

    def patients_of(group_names: np.ndarray) -> int:
        return int(rows.loc[groups.isin(group_names), "patient_id"].nunique())

    def draw(candidates: np.ndarray, n_patients: int, what: str) -> np.ndarray:
        """Shuffled groups, taken until they hold ``n_patients`` patients."""
        shuffled = rng.permutation(np.sort(candidates))
        if n_patients <= 0:
            return shuffled[:0]
        available = patients_of(shuffled)
        if n_patients > available:
            raise ValueError(f"asked for {n_patients} {what} patients, but only {available} are available")
        counts = rows.groupby(groups)["patient_id"].nunique().reindex(shuffled).to_numpy()
        taken = int(np.searchsorted(np.cumsum(counts), n_patients) + 1)
        return shuffled[:taken]

    if (split == "").all():
        if n_test_patients < 1:
            raise ValueError("the manifest is not split: give n_test_patients (> 0)")
        all_groups = groups.unique()
        test_groups = draw(all_groups, n_test_patients, "test")
        rest = np.setdiff1d(all_groups, test_groups)
        n_train = n_train_patients or patients_of(rest)
        train_groups = draw(rest, n_train, "training")
        n_val = max(1, round(val_fraction * len(train_groups))) if val_fraction > 0 else 0
        val_groups = train_groups[:n_val]
        new_split = np.where(groups.isin(test_groups), "test",
                             np.where(groups.isin(val_groups), "val",
                                      np.where(groups.isin(train_groups), "train", "")))
        rows["split"] = new_split
        rows = rows[rows["split"] != ""]
    else:
        if (split == "").any():
            raise ValueError("the manifest is split only in part: split every row or none")
        keep = pd.Series(True, index=rows.index)
        if n_train_patients > 0:
            # train and val are capped in proportion, so that validation keeps some patients
            n_val_now = int(rows.loc[split == "val", "patient_id"].nunique())
            n_train_now = int(rows.loc[split == "train", "patient_id"].nunique())
            n_val = min(n_val_now, max(1, round(n_train_patients * n_val_now / max(n_val_now + n_train_now, 1))))
            for name, count in (("train", n_train_patients - n_val), ("val", n_val)):
                chosen = draw(groups[split == name].unique(), count, name)
                keep &= (split != name) | groups.isin(chosen)
        if n_test_patients > 0:
            testing = split == "test"
            chosen = draw(groups[testing].unique(), n_test_patients, "test")
            keep &= ~testing | groups.isin(chosen)
        rows = rows[keep]
    missing = [name for name in mf.SPLITS if not (rows["split"] == name).any()]
    if missing:
        raise ValueError(f"no rows with lung masks in split(s) {missing}; the U-Net needs train, val and test")
    return rows.copy()


# ----------------------------------------------------------------------------- prediction


def _model_device(model: nn.Module, device: str | torch.device | None) -> tuple[nn.Module, torch.device]:
    net = unwrap(model)
    target = next(net.parameters()).device if device is None else resolve_device(str(device))
    return net.to(target).eval(), target


@torch.no_grad()
def _network_outputs(model: nn.Module, images: Sequence[np.ndarray], *, input_size: int,
                     output_shapes: Sequence[tuple[int, int]] | None, batch_size: int,
                     device: str | torch.device | None, forward):
    """Yield ``(index, output (1, C, h, w) float32)`` per image, each on its own output grid.

    Every image is resized to ``input_size``; ``forward(net, target, tensor)`` turns a batch
    ``(B, 1, s, s)`` in [0, 1] into ``(B, C, s, s)`` float outputs, which are resized bilinearly
    to ``output_shapes[i]`` (default: the image's own shape).
    """
    if output_shapes is None:
        output_shapes = [tuple(np.shape(image)) for image in images]
    if len(output_shapes) != len(images):
        raise ValueError(f"{len(output_shapes)} output shapes for {len(images)} images")
    net, target = _model_device(model, device)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = np.stack([resize_image(np.asarray(image, dtype=np.uint8), input_size) for image in chunk])
        tensor = torch.from_numpy(batch).to(target).float().div_(255.0)[:, None]
        outputs = forward(net, target, tensor)
        for offset in range(len(chunk)):
            shape = tuple(int(s) for s in output_shapes[start + offset])
            item = outputs[offset:offset + 1]
            if tuple(item.shape[-2:]) != shape:
                item = F.interpolate(item, size=shape, mode="bilinear", align_corners=False)
            yield start + offset, item


def predict_label_maps(
    model: nn.Module,
    images: Sequence[np.ndarray],
    *,
    input_size: int,
    output_shapes: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    postprocess: bool = True,
    amp: bool = True,
    flips: bool = False,
    convention: str | None = None,
    zooms: Sequence[float] = (1.0,),
) -> list[np.ndarray]:
    """Lung label maps of ``images``, each on its own output grid.

    ``images``: ``(H, W)`` uint8 arrays of any sizes. Each is resized (bilinear,
    antialiased) to ``input_size`` x ``input_size``, the resolution the U-Net was trained
    at; its logits are then resized bilinearly to ``output_shapes[i]`` (default: the
    image's own shape) and the argmax taken there, which gives smoother borders than
    up-sampling the label map. ``postprocess`` keeps the largest component of each lung and
    fills holes (:func:`cxrlib.data.masks.postprocess_labels`). ``amp``: float16 autocast
    on CUDA. Returns ``(h, w)`` uint8 label maps (0 background, 1 left lung, 2 right lung).

    ``flips``, ``zooms``: test-time augmentation (:func:`predict_probabilities`). ``convention``
    (``"anatomical"`` / ``"visible"``): the lungs of that convention, read from a 4-class
    segmenter of :func:`retrocardiac_training_labels` by :func:`labels_by_convention` (a
    3-class segmenter gives its one map either way).
    """
    if flips or convention is not None or check_zooms(zooms) != (1.0,):
        if convention not in (None, "anatomical", "visible"):
            raise ValueError(f"convention must be 'anatomical', 'visible' or None, got {convention!r}")
        probabilities = predict_probabilities(model, images, input_size=input_size, output_shapes=output_shapes,
                                              flips=flips, zooms=zooms, batch_size=batch_size, device=device)
        if convention is None:
            maps = [p.argmax(axis=0).astype(np.uint8) for p in probabilities]
            return [postprocess_labels(m) for m in maps] if postprocess else maps
        return [labels_by_convention(p, postprocess=postprocess)[convention] for p in probabilities]

    def forward(net, target, tensor):
        with autocast_context(target, amp):
            return net(tensor).float()

    results: list[np.ndarray] = []
    for _, item in _network_outputs(model, images, input_size=input_size, output_shapes=output_shapes,
                                    batch_size=batch_size, device=device, forward=forward):
        # max(...).indices, not argmax: the same first-maximum labels, ~10x faster over dim 1 on CPU
        labels = item.max(dim=1).indices[0].to(torch.uint8).cpu().numpy()
        results.append(postprocess_labels(labels) if postprocess else labels)
    return results


def segment_manifest(
    model: nn.Module,
    manifest: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    input_size: int,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    postprocess: bool = True,
    crop_margin: float = 0.05,
    crop_size: int | None = None,
    progress: bool = False,
    flips: bool = False,
    convention: str | None = None,
    zooms: Sequence[float] = (1.0,),
) -> pd.DataFrame:
    """Segment every image of ``manifest``; write masks and image variants; return the new manifest.

    ``flips``, ``zooms`` and ``convention``: as in :func:`predict_label_maps` (a 4-class segmenter
    needs a ``convention``: which lungs the masks and the lung images show).

    For each row (image at its own resolution, ``path`` absolute):

    - ``out_dir/masks/<image_id>.png``: the predicted lung label map on the image's grid
      (:func:`write_label_map`), column ``mask_pred_lung``;
    - ``out_dir/lung_crop/<image_id>.png``: the image cropped to the lungs' bounding box
      widened by ``crop_margin`` (:func:`cxrlib.data.masks.crop_to_lungs`) and resized to
      ``crop_size`` (default: the image's own size), column ``path_lung_crop``;
    - ``out_dir/lung_masked/<image_id>.png``: the image with everything outside the lungs
      set to 0 (:func:`cxrlib.data.masks.mask_lungs`), column ``path_lung_masked``;
    - column ``pred_lung_fraction``: share of the image predicted as lung (a failed
      segmentation shows up as a value near 0).

    Returns a copy of ``manifest`` with the new columns, paths absolute like the old ones:
    write it with ``write_manifest(df, out_dir / "manifest.csv")``. An image whose lungs are not found
    gets the whole image as its crop and an all-black masked image.
    """
    out_dir = Path(out_dir).resolve()
    result = manifest.reset_index(drop=True).copy()
    stems = [file_stem(image_id) for image_id in result["image_id"]]
    if len(set(stems)) != len(stems):
        raise ValueError("image ids map to the same file name; make image_id unique")
    for folder in (MASK_FOLDER, CROP_FOLDER, MASKED_FOLDER):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    columns: dict[str, list[str]] = {PRED_MASK_COLUMN: [], CROP_COLUMN: [], MASKED_COLUMN: [], FRACTION_COLUMN: []}
    net, target = _model_device(model, device)
    input_size = int(input_size)
    starts = range(0, len(result), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="segmenting", unit="batch")
    # PNG encoding and writing run in two threads beside the network (they release the GIL)
    with ThreadPoolExecutor(max_workers=2) as writer:
        pending = []
        for start in starts:
            chunk = result.iloc[start:start + batch_size]
            images = [read_image(mf.resolve_path(None, path)) for path in chunk["path"]]
            label_maps = predict_label_maps(net, images, input_size=input_size, batch_size=batch_size,
                                            device=target, postprocess=postprocess, flips=flips,
                                            convention=convention, zooms=zooms)
            for offset, (image, labels) in enumerate(zip(images, label_maps, strict=True)):
                stem = stems[start + offset]
                lungs = lung_mask_from_labels(labels)
                files = {
                    PRED_MASK_COLUMN: f"{MASK_FOLDER}/{stem}.png",
                    CROP_COLUMN: f"{CROP_FOLDER}/{stem}.png",
                    MASKED_COLUMN: f"{MASKED_FOLDER}/{stem}.png",
                }
                crop = crop_to_lungs(image, lungs, size=crop_size or image.shape, margin=crop_margin)
                pending += [
                    writer.submit(write_label_map, out_dir / files[PRED_MASK_COLUMN], labels),
                    writer.submit(write_png, out_dir / files[CROP_COLUMN], crop),
                    writer.submit(write_png, out_dir / files[MASKED_COLUMN], mask_lungs(image, lungs, "inside")),
                ]
                for column, relative in files.items():
                    columns[column].append(str(out_dir / relative))
                columns[FRACTION_COLUMN].append(f"{lungs.mean():.4f}")
            # surface a failed write early, and keep the queue short
            for future in pending:
                future.result()
            pending = []
    for column, values in columns.items():
        result[column] = values
    return result


# ----------------------------------------------------------------------------- evaluation

#: Regions and metrics of the per-image tables, in display order.
REGIONS: dict[str, str] = {"lungs": "both lungs", "left": "left lung", "right": "right lung"}
METRICS: dict[str, str] = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 (px)"}
VARIANTS: dict[str, str] = {"raw": "without post-processing", "post": "with post-processing"}


@dataclass
class SegmentationEvaluation:
    """Test-split scores of a segmenter, at the resolution of the ground-truth masks.

    ``per_image[variant]``: one row per image (``image_id, patient_id, label``, then
    ``dice_/iou_/hd95_`` x ``left/right/lungs``), for ``variant`` ``"raw"`` (argmax of the
    network) and ``"post"`` (after :func:`~cxrlib.data.masks.postprocess_labels`);
    ``summary[variant]``: :func:`~cxrlib.evaluate.segmentation.summarize_metrics` of it
    (means with bootstrap 95% CIs, patients resampled whole). ``images`` (uint8, resized
    to the mask grid), ``truth`` and ``pred[variant]`` (uint8 label maps) are kept in test
    order for figures and viewers.
    """

    per_image: dict[str, pd.DataFrame]
    summary: dict[str, dict]
    images: list[np.ndarray] = field(repr=False)
    truth: list[np.ndarray] = field(repr=False)
    pred: dict[str, list[np.ndarray]] = field(repr=False)
    seconds: float = 0.0

    @property
    def n_images(self) -> int:
        return len(self.truth)

    def table(self, digits: int = 3) -> pd.DataFrame:
        """Mean [95% CI] per metric and region (rows) and variant (columns), as text."""
        records = []
        for metric, metric_name in METRICS.items():
            for region, region_name in REGIONS.items():
                record = {"metric": metric_name, "region": region_name}
                for variant, variant_name in VARIANTS.items():
                    summary = self.summary[variant]
                    mean = summary[f"{metric}_{region}_mean"]
                    low, high = summary[f"{metric}_{region}_ci95"]
                    places = 1 if metric == "hd95" else digits
                    record[variant_name] = f"{mean:.{places}f} [{low:.{places}f}, {high:.{places}f}]"
                records.append(record)
        return pd.DataFrame(records).set_index(["metric", "region"])

    def by_label(self, variant: str = "post") -> pd.DataFrame:
        """Mean Dice (both lungs) and image count per class label: does disease hurt segmentation?"""
        table = self.per_image[variant]
        return (table.groupby("label")["dice_lungs"].agg(["mean", "min", "count"])
                .rename(columns={"mean": "dice_mean", "min": "dice_min", "count": "n_images"}))

    def metrics(self) -> dict:
        """Flat headline numbers for ``metrics.json``.

        Post-processed masks (the ones the stage writes) give ``dice_mean``, ``dice_ci95``,
        ``iou_mean``, ``iou_ci95``, ``hd95_mean``, ``hd95_ci95`` (both lungs as one
        foreground), the same per lung (``dice_left_mean``, ...), ``n_test`` (images) and
        ``n_test_patients``; ``without_postprocessing`` holds the same keys for the raw
        argmax, ``n_hd95_undefined`` counts images where one mask was empty.
        """
        def flatten(summary: dict, table: pd.DataFrame) -> dict:
            out: dict[str, object] = {}
            for metric in METRICS:
                for region in REGIONS:
                    name = metric if region == "lungs" else f"{metric}_{region}"
                    out[f"{name}_mean"] = summary[f"{metric}_{region}_mean"]
                    out[f"{name}_ci95"] = summary[f"{metric}_{region}_ci95"]
            out["n_hd95_undefined"] = int(table["hd95_lungs"].isna().sum())
            return out

        post = self.per_image["post"]
        return {
            **flatten(self.summary["post"], post),
            "n_test": int(len(post)),
            "n_test_patients": int(post["patient_id"].nunique()),
            "without_postprocessing": flatten(self.summary["raw"], self.per_image["raw"]),
        }

    def ranked(self, variant: str = "post", by: str = "dice_lungs") -> pd.DataFrame:
        """The per-image table sorted worst first, with the position ``index`` into the lists."""
        table = self.per_image[variant].reset_index(names="index")
        return table.sort_values([by, "image_id"], ascending=[True, True]).reset_index(drop=True)


def evaluate_segmentation(
    model: nn.Module,
    manifest: pd.DataFrame,
    *,
    input_size: int,
    split: str | None = "test",
    batch_size: int = 16,
    device: str | torch.device | None = None,
    seed: int = 0,
    n_boot: int = 2000,
    flips: bool = False,
    convention: str | None = None,
    zooms: Sequence[float] = (1.0,),
) -> SegmentationEvaluation:
    """Score the U-Net on the rows of ``split`` (``None``: every row) that have lung masks.

    ``flips``, ``zooms``, ``convention``: as in :func:`predict_label_maps` (``"visible"`` for a 4-class
    segmenter scored against visible-convention masks).

    Ground truth is read at its own resolution (:func:`cxrlib.data.datasets.load_label_map`;
    e.g. 256x256 masks of 299x299 images), the prediction is made on that grid
    (:func:`predict_label_maps`), once without and once with post-processing. Confidence
    intervals resample patients (``patient_id``) with ``seed``.
    """
    rows = manifest if split is None else manifest[manifest["split"] == split]
    rows = with_masks(rows)
    if rows.empty:
        raise ValueError(f"no rows with lung masks in split {split!r}")
    started = time.perf_counter()
    truth, images = [], []
    for row in rows.to_dict("records"):
        labels = load_label_map(row, size=None)
        image = read_image(mf.resolve_path(None, row["path"]))
        truth.append(labels)
        images.append(image)
    raw = predict_label_maps(model, images, input_size=input_size, output_shapes=[t.shape for t in truth],
                             batch_size=batch_size, device=device, postprocess=False, flips=flips,
                             convention=convention, zooms=zooms)
    post = [postprocess_labels(labels) for labels in raw]
    shown = [resize_image(image, labels.shape) for image, labels in zip(images, truth, strict=True)]
    per_image, summary = {}, {}
    for variant, predictions in (("raw", raw), ("post", post)):
        table = per_image_metrics(predictions, truth, image_ids=rows["image_id"].tolist())
        table.insert(1, "patient_id", rows["patient_id"].to_numpy())
        table.insert(2, "label", rows["label"].to_numpy())
        per_image[variant] = table
        summary[variant] = summarize_metrics(table, seed=seed, groups="patient_id", n_boot=n_boot)
    return SegmentationEvaluation(per_image=per_image, summary=summary, images=shown, truth=truth,
                                  pred={"raw": raw, "post": post}, seconds=time.perf_counter() - started)


def evaluate_cohorts(
    model: nn.Module,
    cohorts: Mapping[str, pd.DataFrame],
    **kwargs: Any,
) -> tuple[dict[str, SegmentationEvaluation], dict[str, str]]:
    """:func:`evaluate_segmentation` on every image with lung masks of each external cohort
    (``{name: manifest}``, :func:`cxrlib.data.external.read_external`; every row is a test
    row there). ``kwargs`` go to :func:`evaluate_segmentation` (``input_size`` is required).
    Returns ``({name: evaluation}, {name: why it was skipped})``: a cohort without lung
    masks (most real collections) is skipped, never scored against nothing. A cohort whose
    references draw the anatomical lungs with a cardiomediastinum (covid-segmentations) is
    scored under both conventions (:func:`evaluate_by_convention`, a
    :class:`ConventionEvaluation`; ``flips`` and ``zooms`` kept, ``convention`` dropped from ``kwargs``).
    """
    scored: dict[str, SegmentationEvaluation | ConventionEvaluation] = {}
    skipped: dict[str, str] = {}
    for name, cohort in cohorts.items():
        rows = with_masks(cohort)
        if rows.empty:
            skipped[name] = "no lung masks"
            continue
        if has_anatomical_references(rows):
            options = {k: v for k, v in kwargs.items() if k != "convention"}
            scored[name] = evaluate_by_convention(model, rows, split=None, **options)
        else:
            scored[name] = evaluate_segmentation(model, rows, split=None, **kwargs)
    return scored, skipped


def has_anatomical_references(rows: pd.DataFrame) -> bool:
    """Whether any row's reference draws the anatomical lungs with a cardiomediastinum mask
    (so it can be scored under both conventions)."""
    from cxrlib.data.datasets import has_path
    from cxrlib.data.masks import lung_convention_of

    return any(lung_convention_of(row) == "anatomical" and has_path(row, CARDIOMEDIASTINUM_COLUMN)
               for row in rows.to_dict("records"))


# ----------------------------------------------------------------------------- error maps

#: Pixel classes of :func:`error_categories`.
ERROR_CLASSES: dict[int, str] = {
    0: "background, correct",
    1: "lung, correct",
    2: "false lung (over-segmented)",
    3: "missed lung (under-segmented)",
    4: "lung, wrong side",
}


def error_categories(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per pixel, how a predicted lung label map ``pred`` agrees with ``truth`` (both ``(H, W)``).

    Returns uint8 codes of :data:`ERROR_CLASSES`: 0 background in both, 1 same lung in
    both, 2 lung predicted on background, 3 lung missed, 4 the other lung predicted.
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    true_lung = np.isin(truth, (LUNG_LEFT, LUNG_RIGHT))
    pred_lung = np.isin(pred, (LUNG_LEFT, LUNG_RIGHT))
    codes = np.zeros(truth.shape, dtype=np.uint8)
    codes[true_lung & pred_lung] = 1
    codes[true_lung & pred_lung & (truth != pred)] = 4
    codes[~true_lung & pred_lung] = 2
    codes[true_lung & ~pred_lung] = 3
    return codes


# ----------------------------------------------------------------------------- diseased lungs
# Lung conventions, test-time flips, lesion burden and mask quality control (docs/segmentation.md).


def _flip_lr(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, C, H, W)`` of a mirrored image, brought back: columns mirrored and the two
    lungs exchanged (the network calls the lung on the image right "left" whatever it sees)."""
    flipped = torch.flip(logits, dims=[-1])
    order = list(range(flipped.shape[1]))
    order[LUNG_LEFT], order[LUNG_RIGHT] = LUNG_RIGHT, LUNG_LEFT
    return flipped[:, order]


def check_zooms(zooms: Sequence[float]) -> tuple[float, ...]:
    """``zooms`` as a tuple of floats, or ``ValueError``: test-time zoom factors, each finite and
    positive, at least one of them at most 1 (a zoom above 1 sees only the centre of the image,
    so without one at most 1 the border would get no prediction)."""
    values = tuple(float(z) for z in zooms)
    if not values or not all(np.isfinite(z) and z > 0 for z in values):
        raise ValueError(f"zooms must be positive finite factors, got {list(zooms)!r}")
    if min(values) > 1.0:
        raise ValueError(f"zooms {list(values)!r}: one of them must be at most 1 so that the whole image is seen")
    return values


def _zoomed_probabilities(net: nn.Module, tensor: torch.Tensor, zoom: float, flips: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of ``net`` on ``tensor`` (``(B, 1, s, s)``) zoomed by ``zoom`` about its centre
    (with ``flips``: averaged with the mirror image's), mapped back onto the unzoomed grid, and
    the share of each output pixel the zoomed view covers (``(B, 1, s, s)``; 1 for ``zoom <= 1``)."""
    def softmax(batch):
        probabilities = torch.softmax(net(batch).float(), dim=1)
        if flips:
            mirrored = torch.softmax(net(torch.flip(batch, dims=[-1])).float(), dim=1)
            probabilities = (probabilities + _flip_lr(mirrored)) / 2
        return probabilities

    if zoom == 1.0:
        probabilities = softmax(tensor)
        return probabilities, torch.ones_like(probabilities[:, :1])
    count = tensor.shape[0]
    forward = torch.tensor([[1 / zoom, 0.0, 0.0], [0.0, 1 / zoom, 0.0]], dtype=tensor.dtype, device=tensor.device)
    grid = F.affine_grid(forward.expand(count, 2, 3), list(tensor.shape), align_corners=False)
    probabilities = softmax(F.grid_sample(tensor, grid, mode="bilinear", padding_mode="border", align_corners=False))
    back = torch.tensor([[zoom, 0.0, 0.0], [0.0, zoom, 0.0]], dtype=probabilities.dtype, device=tensor.device)
    grid = F.affine_grid(back.expand(count, 2, 3), list(probabilities.shape), align_corners=False)
    mapped = F.grid_sample(probabilities, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    covered = F.grid_sample(torch.ones_like(probabilities[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
    return mapped, covered


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    images: Sequence[np.ndarray],
    *,
    input_size: int,
    output_shapes: Sequence[tuple[int, int]] | None = None,
    flips: bool = False,
    zooms: Sequence[float] = (1.0,),
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> list[np.ndarray]:
    """Class probabilities ``(C, h, w)`` float32 per image, on each image's output grid.

    As :func:`predict_label_maps` (logits resized bilinearly to ``output_shapes[i]``, default
    the image's shape), with test-time augmentation:

    - ``flips``: the softmax of the image and of its mirror image (mapped back, lungs
      exchanged) are averaged;
    - ``zooms``: the image (at ``input_size``) is also seen zoomed about its centre by each
      factor (e.g. ``(1.0, 1.15, 1.3)``: the zooms a segmenter trained with zoom augmentation
      has seen), each softmax is mapped back, and every pixel averages the views that cover it
      (a zoom above 1 covers the centre only). The default ``(1.0,)`` is the image as it is.
    """
    zooms = check_zooms(zooms)

    def forward(net, target, tensor):
        total = weight = None
        for zoom in zooms:
            probabilities, covered = _zoomed_probabilities(net, tensor, zoom, flips)
            total = probabilities if total is None else total + probabilities
            weight = covered if weight is None else weight + covered
        return total / weight

    return [item[0].cpu().numpy() for _, item in _network_outputs(
        model, images, input_size=input_size, output_shapes=output_shapes, batch_size=batch_size, device=device,
        forward=forward)]


def labels_by_convention(probabilities: np.ndarray, *, postprocess: bool = True) -> dict[str, np.ndarray]:
    """Lung label maps (0 / 1 left / 2 right) from class probabilities ``(C, H, W)``.

    A 3-class segmenter (background, left, right) gives one map, returned under both keys
    (``"anatomical"`` and ``"visible"`` are the same prediction: which one it is depends on
    the masks it learnt from). A 4-class segmenter of :func:`retrocardiac_training_labels`
    (label 3 = the lung behind the heart) gives ``"visible"`` (labels 1 and 2 only) and
    ``"anatomical"`` (label 3 added to the nearer lung).
    """
    labels = probabilities.argmax(axis=0).astype(np.uint8)
    if probabilities.shape[0] < 4:
        clean = postprocess_labels(labels) if postprocess else labels
        return {"anatomical": clean, "visible": clean.copy()}
    from scipy import ndimage

    visible = np.where(labels == 3, BACKGROUND, labels).astype(np.uint8)
    behind = labels == 3
    anatomical = visible.copy()
    if behind.any() and np.isin(visible, (LUNG_LEFT, LUNG_RIGHT)).any():
        # each retrocardiac pixel joins the lung it is nearest to
        to_left = ndimage.distance_transform_edt(visible != LUNG_LEFT) if (visible == LUNG_LEFT).any() else None
        to_right = ndimage.distance_transform_edt(visible != LUNG_RIGHT) if (visible == LUNG_RIGHT).any() else None
        if to_left is None:
            anatomical[behind] = LUNG_RIGHT
        elif to_right is None:
            anatomical[behind] = LUNG_LEFT
        else:
            anatomical[behind] = np.where(to_left[behind] <= to_right[behind], LUNG_LEFT, LUNG_RIGHT)
    if postprocess:
        anatomical, visible = postprocess_labels(anatomical), postprocess_labels(visible)
    return {"anatomical": anatomical, "visible": visible}


#: Training label of a visible-convention source's background: background *or* the lung behind
#: the heart, which such a source never draws (a partial label, see
#: :func:`cxrlib.train.segmentation.segmentation_loss`).
BACKGROUND_OR_RETROCARDIAC = 4
#: ``SegTrainConfig.partial_labels`` of the 4-class retrocardiac labels.
RETROCARDIAC_PARTIAL_LABELS: dict[int, list[int]] = {BACKGROUND_OR_RETROCARDIAC: [BACKGROUND, 3]}


def retrocardiac_training_labels(labels: np.ndarray, cardiomediastinum: np.ndarray | None, *,
                                 partial: bool = True) -> np.ndarray:
    """Training labels that hold both conventions: 0 background, 1 / 2 the visible left /
    right lung, 3 the lung behind the cardiomediastinum (anatomical minus visible).

    ``labels``: anatomical lung label map ``(H, W)`` (0..2); ``cardiomediastinum``: ``(H, W)``
    bool, or ``None`` for a visible-convention reference. Such a source never drew the lung
    behind the heart, so its background inside the convex hull of the two lungs (where the
    heart, the mediastinum and the recesses below the diaphragm domes lie) is "background or
    label 3": :data:`BACKGROUND_OR_RETROCARDIAC`; outside the hull it stays background, so
    the network still learns that no lung lies beside the chest or above the shoulders.
    With ``partial=False`` all of it stays 0, which teaches the network that the lung
    behind the heart is background, contradicting the anatomical sources. Train with
    ``include_heart=True`` (4 classes) and ``partial_labels=RETROCARDIAC_PARTIAL_LABELS``;
    :func:`labels_by_convention` reads the predictions back.
    """
    labels = np.asarray(labels, dtype=np.uint8)
    if cardiomediastinum is None:
        out = labels.copy()
        lungs = np.isin(labels, (LUNG_LEFT, LUNG_RIGHT))
        if partial and lungs.any():
            from skimage.morphology import convex_hull_image

            out[convex_hull_image(lungs) & (labels == BACKGROUND)] = BACKGROUND_OR_RETROCARDIAC
        return out
    behind = np.asarray(cardiomediastinum, dtype=bool) & np.isin(labels, (LUNG_LEFT, LUNG_RIGHT))
    out = labels.copy()
    out[behind] = 3
    return out


def _optional_mask(row: dict, column: str, shape: tuple[int, int]) -> np.ndarray | None:
    from cxrlib.data.datasets import has_path
    from cxrlib.data.io import read_mask
    from cxrlib.data.transforms import resize_mask

    if not has_path(row, column):
        return None
    mask = read_mask(mf.resolve_path(None, str(row[column])))
    return mask if mask.shape == tuple(shape) else resize_mask(mask, shape)


@dataclass
class ReferenceMasks:
    """The reference masks of one manifest row, on one grid: lung ``labels`` (0..2) as the
    source draws them, its ``convention``, the ``cardiomediastinum`` (``None`` when the
    source has none) and ``lesions`` (ground glass, consolidation; ``None`` where not drawn)."""

    labels: np.ndarray
    convention: str
    cardiomediastinum: np.ndarray | None
    lesions: list[np.ndarray | None]

    @property
    def lesion_burden(self) -> float:
        """Share of the lung covered by lesions (NaN for a source without lesion masks)."""
        from cxrlib.evaluate.segmentation import lesion_burden

        if self.convention != "anatomical" or self.cardiomediastinum is None:
            return float("nan")
        return lesion_burden(lung_mask_from_labels(self.labels), self.lesions)


#: Manifest columns of the lesion masks (the covid-segmentations adapter writes them).
LESION_COLUMNS: tuple[str, ...] = ("mask_ground_glass", "mask_consolidation")
CARDIOMEDIASTINUM_COLUMN = "mask_cardiomediastinum"


def reference_masks(row: dict, size: int | tuple[int, int] | None = None) -> ReferenceMasks:
    """Read a manifest row's reference masks (:class:`ReferenceMasks`), resized to ``size``
    (``None``: the lung masks' own grid). Its convention comes from
    :func:`cxrlib.data.masks.lung_convention_of` (``visible`` when unknown)."""
    from cxrlib.data.masks import lung_convention_of

    labels = load_label_map(row, size=size)
    convention = lung_convention_of(row) or "visible"
    heart = _optional_mask(row, CARDIOMEDIASTINUM_COLUMN, labels.shape)
    lesions = [_optional_mask(row, column, labels.shape) for column in LESION_COLUMNS]
    return ReferenceMasks(labels=labels, convention=convention, cardiomediastinum=heart, lesions=lesions)


@dataclass
class ConventionEvaluation:
    """Scores of a segmenter under each lung convention its references allow.

    ``per_image``: one row per image and convention (``image_id, convention, patient_id,
    label, source, lesion_burden``, then ``dice_/iou_/hd95_`` x ``left/right/lungs``);
    ``summary[convention]``: :func:`cxrlib.evaluate.segmentation.summarize_by_convention`.
    ``images`` (uint8 on the reference grid), ``truth`` (references as drawn), ``pred``
    (``{convention: label maps}``) and ``cardiomediastinum`` are kept in row order.
    """

    per_image: pd.DataFrame
    summary: dict[str, dict]
    images: list[np.ndarray] = field(repr=False)
    truth: list[np.ndarray] = field(repr=False)
    pred: dict[str, list[np.ndarray]] = field(repr=False)
    cardiomediastinum: list[np.ndarray | None] = field(repr=False)
    flips: bool = False
    zooms: tuple[float, ...] = (1.0,)

    @property
    def n_images(self) -> int:
        return int(self.per_image["image_id"].nunique())

    def metrics(self) -> dict:
        """For ``metrics.json``: ``{convention: {dice_mean, dice_ci95, dice_left_mean, ...,
        dice_worst_decile, n_images, n_patients}}`` plus ``test_time_flips`` and ``test_time_zooms``."""
        out: dict[str, object] = {"test_time_flips": bool(self.flips), "test_time_zooms": list(self.zooms)}
        for convention, summary in self.summary.items():
            rows = self.per_image[self.per_image["convention"] == convention]
            flat: dict[str, object] = {"n_images": int(len(rows)), "n_patients": int(rows["patient_id"].nunique()),
                                       "dice_worst_decile": summary["dice_lungs_worst_decile"]}
            for metric in METRICS:
                for region in REGIONS:
                    name = metric if region == "lungs" else f"{metric}_{region}"
                    flat[f"{name}_mean"] = summary[f"{metric}_{region}_mean"]
                    flat[f"{name}_ci95"] = summary[f"{metric}_{region}_ci95"]
            out[convention] = flat
        return out

    def table(self, digits: int = 3) -> pd.DataFrame:
        """Mean [95% CI] of Dice and HD95 per region (rows) and convention (columns), as text."""
        records = []
        for metric in ("dice", "hd95"):
            for region, region_name in REGIONS.items():
                record = {"metric": METRICS[metric], "region": region_name}
                for convention, summary in self.summary.items():
                    places = 1 if metric == "hd95" else digits
                    low, high = summary[f"{metric}_{region}_ci95"]
                    record[f"{convention} lungs"] = (f"{summary[f'{metric}_{region}_mean']:.{places}f} "
                                                     f"[{low:.{places}f}, {high:.{places}f}]")
                records.append(record)
        return pd.DataFrame(records).set_index(["metric", "region"])

    def by_burden(self, **options) -> pd.DataFrame:
        """Dice / HD95 per lesion-burden bin and convention
        (:func:`cxrlib.evaluate.segmentation.metrics_by_burden`; images with a burden only)."""
        from cxrlib.evaluate.segmentation import metrics_by_burden

        rows = self.per_image[self.per_image["lesion_burden"].notna()]
        options.setdefault("groups", "patient_id")
        return metrics_by_burden(rows, **options)

    def ranked(self, convention: str = "anatomical", by: str = "dice_lungs") -> pd.DataFrame:
        """Rows of one convention sorted worst first, with ``index`` into the image lists."""
        table = self.per_image[self.per_image["convention"] == convention]
        return table.sort_values([by, "image_id"]).reset_index(drop=True)


def evaluate_by_convention(
    model: nn.Module,
    manifest: pd.DataFrame,
    *,
    input_size: int,
    split: str | None = None,
    flips: bool = False,
    size: int | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    seed: int = 0,
    n_boot: int = 2000,
    zooms: Sequence[float] = (1.0,),
) -> ConventionEvaluation:
    """Score a segmenter on the rows of ``split`` (``None``: all) under every convention the
    references allow: anatomical and visible (cardiomediastinum removed from both) for
    covid-segmentations rows, visible for covid19-radiography rows (and other visible sources).

    References are read on their own grid (``size=None``) or resized to ``size``; the
    prediction is made on that grid with or without test-time ``flips`` and ``zooms``
    (:func:`predict_probabilities`) and post-processed. A 4-class segmenter
    (:func:`retrocardiac_training_labels`) is scored with its anatomical output against
    anatomical references and its visible output against visible ones. Intervals resample
    patients.
    """
    from cxrlib.evaluate.segmentation import (
        per_image_metrics_by_convention,
        summarize_by_convention,
    )

    zooms = check_zooms(zooms)
    rows = manifest if split is None else manifest[manifest["split"] == split]
    rows = with_masks(rows)
    if rows.empty:
        raise ValueError(f"no rows with lung masks in split {split!r}")
    references, images = [], []
    for row in rows.to_dict("records"):
        reference = reference_masks(row, size=size)
        references.append(reference)
        image = read_image(mf.resolve_path(manifest, row["path"]))
        images.append(resize_image(image, reference.labels.shape))
    probabilities = predict_probabilities(model, images, input_size=input_size,
                                          output_shapes=[r.labels.shape for r in references],
                                          flips=flips, zooms=zooms, batch_size=batch_size, device=device)
    predictions = [labels_by_convention(p) for p in probabilities]
    tables = []
    for index, reference in enumerate(references):
        pred = predictions[index][reference.convention]
        table = per_image_metrics_by_convention(
            [pred], [reference.labels], reference_conventions=[reference.convention],
            cardiomediastinum=[reference.cardiomediastinum], image_ids=[rows["image_id"].iloc[index]])
        tables.append(table)
    per_image = pd.concat(tables, ignore_index=True)
    info = rows.set_index("image_id")
    burden = {image_id: ref.lesion_burden for image_id, ref in zip(rows["image_id"], references, strict=True)}
    per_image.insert(2, "patient_id", info.loc[per_image["image_id"], "patient_id"].to_numpy())
    per_image.insert(3, "label", info.loc[per_image["image_id"], "label"].to_numpy())
    per_image.insert(4, "source", info.loc[per_image["image_id"], "source"].to_numpy())
    per_image.insert(5, "lesion_burden", per_image["image_id"].map(burden).astype(float))
    summary = summarize_by_convention(per_image.drop(columns=["label", "source", "lesion_burden"]),
                                      seed=seed, groups="patient_id", n_boot=n_boot)
    pred = {name: [p[name] for p in predictions] for name in ("anatomical", "visible")}
    return ConventionEvaluation(per_image=per_image, summary=summary, images=images,
                                truth=[r.labels for r in references], pred=pred,
                                cardiomediastinum=[r.cardiomediastinum for r in references], flips=flips,
                                zooms=zooms)


def mask_qc_table(
    label_maps: Sequence[np.ndarray],
    images: Sequence[np.ndarray | None] | None = None,
    image_ids: Sequence[object] | None = None,
    limits=None,
) -> pd.DataFrame:
    """Quality control of predicted lung label maps, no reference needed.

    ``label_maps``: ``(H, W)`` label maps; ``images``: the images they were predicted on
    (same shapes; ``None``: judged on the whole frame). Returns one row per image:
    ``image_id, qc_pass (bool), qc_reason`` (``""`` when passed) and the measures of
    :func:`cxrlib.data.masks.lung_mask_qc` (``area_fraction, lr_ratio, ...``).
    """
    from cxrlib.data.masks import LungQCLimits, lung_mask_qc

    limits = limits or LungQCLimits()
    images = list(images) if images is not None else [None] * len(label_maps)
    ids = list(range(len(label_maps))) if image_ids is None else list(image_ids)
    if not len(images) == len(ids) == len(label_maps):
        raise ValueError(f"{len(label_maps)} label maps, {len(images)} images and {len(ids)} ids")
    records = []
    for image_id, labels, image in zip(ids, label_maps, images, strict=True):
        qc = lung_mask_qc(labels, image, limits)
        records.append({"image_id": image_id, "qc_pass": qc.passed, "qc_reason": qc.reason, **qc.measures})
    return pd.DataFrame(records)


def qc_manifest(manifest: pd.DataFrame, limits=None, *, column: str = PRED_MASK_COLUMN) -> pd.DataFrame:
    """:func:`mask_qc_table` of every row of a :func:`segment_manifest` result (its ``column`` of
    predicted label maps, judged against the row's image on the same grid). Returns the
    table with ``patient_id, label, source`` of each row after ``image_id``."""
    label_maps, images = [], []
    for row in manifest.to_dict("records"):
        labels = read_label_map(mf.resolve_path(manifest, row[column]))
        image = read_image(mf.resolve_path(manifest, row["path"]))
        label_maps.append(labels)
        images.append(resize_image(image, labels.shape))
    table = mask_qc_table(label_maps, images, manifest["image_id"].tolist(), limits)
    for position, name in enumerate(("patient_id", "label", "source"), start=1):
        if name in manifest.columns:
            table.insert(position, name, manifest[name].to_numpy())
    return table


def add_lung_qc(segmented: pd.DataFrame, qc: pd.DataFrame) -> pd.DataFrame:
    """``segmented`` with :data:`LUNG_QC_COLUMN` and :data:`LUNG_QC_REASON_COLUMN` from the
    :func:`qc_manifest` table ``qc`` (matched by ``image_id``; every row must have a verdict).
    Notebook 04 keeps failed images out of the lung input modes (counted)."""
    verdicts = qc.set_index("image_id")
    missing = sorted(set(segmented["image_id"]) - set(verdicts.index))
    if missing:
        raise ValueError(f"{len(missing)} segmented images have no quality-control verdict: {missing[:5]}")
    out = segmented.copy()
    out[LUNG_QC_COLUMN] = ["True" if bool(v) else "False" for v in verdicts.loc[out["image_id"], "qc_pass"]]
    out[LUNG_QC_REASON_COLUMN] = verdicts.loc[out["image_id"], "qc_reason"].fillna("").astype(str).to_numpy()
    return out


# ----------------------------------------------------------------------------- cohorts with reference masks


def load_mask_cohort(folder: str | os.PathLike, *, cache_dir: str | os.PathLike) -> pd.DataFrame:
    """The images with reference lung masks of a folder in a known layout, all in ``test``.

    ``covid-segmentations`` (a ``structure.csv``: expert masks pasted into ``cache_dir``,
    anatomical lungs with the cardiomediastinum) or the COVID-19 Radiography Database
    (``<Class>/images`` + ``<Class>/masks``, visible lungs). Anything else, or a folder with
    no usable mask, is refused with one line naming the folder.
    """
    from cxrlib.data.sources import Covid19RadiographyDatabase, CovidSegmentations
    from cxrlib.errors import CxrInputError

    folder = Path(folder)
    if not folder.is_dir():
        raise CxrInputError(f"{folder}: no such folder (a cohort with lung masks)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            if (folder / "structure.csv").is_file():
                manifest = CovidSegmentations(folder, cache_dir=cache_dir).manifest()
            elif any((child / "masks").is_dir() for child in folder.iterdir() if child.is_dir()):
                manifest = Covid19RadiographyDatabase(folder).manifest()
            else:
                raise CxrInputError(f"{folder}: neither the covid-segmentations layout (structure.csv) nor the "
                                    "COVID-19 Radiography Database layout (<Class>/images + <Class>/masks)")
        except CxrInputError:
            raise
        except (ValueError, OSError) as error:
            raise CxrInputError(f"{folder}: {' '.join(str(error).split())}") from None
    rows = with_masks(manifest).copy()
    if rows.empty:
        raise CxrInputError(f"{folder}: no image with a lung mask")
    rows["split"] = "test"
    rows.attrs["skipped"] = [str(w.message) for w in caught]
    return rows.reset_index(drop=True)


def without_training_patients(cohort: pd.DataFrame, training_rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(kept, dropped)``: the rows of ``cohort`` whose patient (or image) the segmenter
    never learnt from (``training_rows``: its train and val rows), and the others with the
    reason, so an external score is never made on a training patient."""
    seen = training_rows[training_rows["split"].isin(("train", "val"))]
    patients, images = set(seen["patient_id"]), set(seen["image_id"])
    by_patient = cohort["patient_id"].isin(patients)
    by_image = cohort["image_id"].isin(images)
    dropped = cohort.loc[by_patient | by_image, ["image_id", "patient_id"]].copy()
    dropped["reason"] = np.where(by_patient[by_patient | by_image], "patient in the segmenter's training data",
                                 "image in the segmenter's training data")
    return cohort[~(by_patient | by_image)].reset_index(drop=True), dropped.reset_index(drop=True)


def external_mask_cohorts(folders: Sequence[str | os.PathLike], training_rows: pd.DataFrame, *,
                          cache_dir: str | os.PathLike) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Notebook 02's ``SEG_EXTERNAL``: each folder read by :func:`load_mask_cohort` (masks cached
    under ``cache_dir/<folder name>``), with the segmenter's training patients taken out
    (:func:`without_training_patients`).

    Returns ``({folder name: kept rows}, left_out)``: a folder with nothing left is absent from
    the dict; ``left_out`` lists every row taken out, with its ``cohort`` and ``reason``. Two
    folders with the same name are refused (their scores would be told apart by name only).
    """
    cohorts: dict[str, pd.DataFrame] = {}
    left_out = [pd.DataFrame(columns=["image_id", "patient_id", "reason", "cohort"])]
    names: dict[str, Path] = {}
    for folder in folders:
        folder = Path(folder)
        if folder.name in names:
            raise ValueError(f"external mask folders {names[folder.name]} and {folder} have the same name "
                             f"{folder.name!r}; give each cohort its own folder name")
        names[folder.name] = folder
        cohort = load_mask_cohort(folder, cache_dir=Path(cache_dir) / folder.name)
        kept, dropped = without_training_patients(cohort, training_rows)
        left_out.append(dropped.assign(cohort=folder.name))
        if len(kept):
            cohorts[folder.name] = kept
    return cohorts, pd.concat(left_out, ignore_index=True)


# ----------------------------------------------------------------------------- recipe: opacified lungs


class LabelMapPairs(torch.utils.data.Dataset):
    """In-memory ``(image, label map)`` pairs for :func:`cxrlib.train.segmentation.train_segmentation`.

    ``images``: ``(H, W)`` uint8; ``labels``: ``(H, W)`` uint8 (e.g. from
    :func:`retrocardiac_training_labels`), all of one size. Items are ``(image (1, H, W)
    float32 in [0, 1], labels (H, W) int64)``; ``augment`` draws from a generator seeded by
    ``(seed, epoch, index)`` as :class:`cxrlib.data.datasets.SegmentationDataset` does.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], *, augment=None,
                 seed: int = 0) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images for {len(labels)} label maps")
        self.images, self.labels = list(images), list(labels)
        self.augment, self.seed, self.epoch = augment, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = self.images[index], self.labels[index]
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
            image, labels = self.augment(image, labels, rng)
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        return (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
                torch.from_numpy(labels.astype(np.int64)))


@dataclass
class DiseasedLungRecipe:
    """Settings of :func:`train_diseased_lung_segmenter` (saved with the run).

    A 4-class U-Net (background, visible left / right lung, lung behind the heart:
    :func:`retrocardiac_training_labels`) learns from several mask sources at once; lesions are
    painted into training lungs (:class:`cxrlib.data.transforms.OpacityAugment`, with
    probability ``opacity_p``, one of ``opacity_kinds``); the films of the expert-annotated
    source are repeated ``expert_repeats`` times per epoch so that diseased lungs weigh more;
    test-time ``flips`` average the image and its mirror image and test-time ``zooms`` its views
    zoomed about the centre (:func:`predict_probabilities`); the geometric augmentation zooms
    by a factor uniform in ``[0.9, scale_max]`` and shifts by up to ``translate`` of the side
    (zooming in cuts the lungs at the frame, as tightly cropped films do), so test-time zooms
    up to ``scale_max`` show the network what it has seen in training. With
    ``partial_labels`` the background of a visible-convention source is "background or the lung
    behind the heart" (:data:`BACKGROUND_OR_RETROCARDIAC`), so the two conventions never
    contradict each other.
    """

    image_size: int = 128
    base_channels: int = 8
    depth: int = 4
    epochs: int = 30
    batch_size: int = 8
    lr: float = 2e-3
    opacity_p: float = 0.5
    expert_repeats: int = 16
    flips: bool = True
    seed: int = 0
    max_steps_per_epoch: int | None = None
    partial_labels: bool = True
    precision: str = "auto"
    scale_max: float = 1.3
    translate: float = 0.1
    opacity_kinds: tuple[str, ...] = DEFAULT_OPACITY_KINDS
    zooms: tuple[float, ...] = (1.0, 1.15, 1.3)

    def __post_init__(self):
        self.zooms = check_zooms(self.zooms)

    def train_config(self, device: str = "auto"):
        from cxrlib.train.segmentation import SegTrainConfig

        return SegTrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                              image_size=self.image_size, include_heart=True,
                              unet={"base_channels": self.base_channels, "depth": self.depth},
                              seed=self.seed, device=device, progress=False,
                              max_steps_per_epoch=self.max_steps_per_epoch, precision=self.precision,
                              partial_labels=RETROCARDIAC_PARTIAL_LABELS if self.partial_labels else {})


def expert_fold_splits(expert_source: pd.DataFrame, *, fold: int, n_folds: int = 4, val_fraction: float = 0.15,
                       seed: int = 0) -> pd.DataFrame:
    """Patient-level cross-validation of a small expert-annotated source: the rows with masks,
    split so that fold ``fold`` of ``n_folds`` (patient groups dealt round-robin after a seeded
    shuffle) is ``test`` and a share ``val_fraction`` of the other groups is ``val``. Over the
    folds every patient is tested exactly once."""
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in 0..{n_folds - 1}, got {fold}")
    rows = with_masks(expert_source).copy()
    groups = mf.patient_groups(rows)
    order = np.random.default_rng(seed).permutation(np.sort(groups.unique()))
    if len(order) < n_folds:
        raise ValueError(f"{len(order)} patient groups cannot make {n_folds} folds")
    fold_of = {group: index % n_folds for index, group in enumerate(order)}
    rest = [group for group in order if fold_of[group] != fold]
    val = set(rest[:max(1, round(val_fraction * len(rest)))])
    rows["split"] = np.where(groups.map(fold_of) == fold, "test", np.where(groups.isin(val), "val", "train"))
    return rows


def diseased_lung_rows(
    visible_source: pd.DataFrame,
    expert_source: pd.DataFrame,
    *,
    n_train_patients: int = 400,
    n_test_patients: int = 100,
    n_expert_test_patients: int = 12,
    val_fraction: float = 0.15,
    seed: int = 0,
    expert_fold: int | None = None,
    n_expert_folds: int = 4,
) -> pd.DataFrame:
    """Patient-level train / val / test rows of two mask sources, concatenated.

    ``visible_source``: e.g. the covid19-radiography adapter's manifest (split as notebook 02
    splits it: :func:`segmentation_splits` with ``n_train_patients``, ``n_test_patients``,
    ``seed``, so its test rows are notebook 02's); ``expert_source``: the covid-segmentations
    manifest, whose ``n_expert_test_patients`` patients are held out whole. The two sources
    share no film (checked: :func:`cxrlib.data.manifest.check_leakage` on the result);
    their copies elsewhere (the ieee8023 films) share the patient ids, so a later split of
    a cohort holding them can keep them apart. With ``expert_fold`` the expert source is split
    by :func:`expert_fold_splits` instead (fold ``expert_fold`` of ``n_expert_folds`` tested).
    """
    visible = segmentation_splits(visible_source, n_train_patients=n_train_patients,
                                  n_test_patients=n_test_patients, val_fraction=val_fraction, seed=seed)
    if expert_fold is None:
        expert = segmentation_splits(expert_source, n_test_patients=n_expert_test_patients,
                                     val_fraction=val_fraction, seed=seed)
    else:
        expert = expert_fold_splits(expert_source, fold=expert_fold, n_folds=n_expert_folds,
                                    val_fraction=val_fraction, seed=seed)
    rows = pd.concat([visible, expert], ignore_index=True)
    overlap = set(visible["patient_id"]) & set(expert["patient_id"])
    if overlap:
        raise ValueError(f"the two mask sources share patients: {sorted(overlap)[:5]}")
    mf.check_leakage(rows)
    return rows


def training_pairs(rows: pd.DataFrame, size: int, *, partial: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images (uint8) and 4-class labels (:func:`retrocardiac_training_labels`, ``partial``
    as there) of ``rows``, resized to ``size`` x ``size``."""
    images, labels = [], []
    for row in rows.to_dict("records"):
        reference = reference_masks(row, size=size)
        heart = reference.cardiomediastinum if reference.convention == "anatomical" else None
        labels.append(retrocardiac_training_labels(reference.labels, heart, partial=partial))
        images.append(resize_image(read_image(mf.resolve_path(rows, row["path"])), size))
    return images, labels


#: :class:`DiseasedLungRecipe` settings used at prediction time only: changing them does not make a
#: resumed network another network, so :func:`resumed_recipe_changes` does not report them.
INFERENCE_SETTINGS = ("flips", "zooms")


def resumed_recipe_changes(run_dir: str | os.PathLike, recipe: DiseasedLungRecipe) -> dict[str, list[Any]]:
    """The recipe settings that differ from those saved in ``run_dir/recipe.json``, as
    ``{name: [saved, now]}``, when ``run_dir`` holds a checkpoint that training would resume
    (``last.pt``); ``{}`` otherwise. The augmentation and data settings are not part of the
    training configuration that :func:`cxrlib.train.segmentation.train_segmentation` checks, so a
    changed recipe would otherwise resume an old network without a word. A setting missing from
    the saved file (written before the setting existed) is not compared, nor are the
    :data:`INFERENCE_SETTINGS`."""
    from cxrlib.runs import read_json, to_plain

    run_dir = Path(run_dir)
    if not (run_dir / "last.pt").is_file() or not (run_dir / "recipe.json").is_file():
        return {}
    saved = read_json(run_dir / "recipe.json")
    current = to_plain(asdict(recipe))
    return {name: [saved[name], value] for name, value in current.items()
            if name in saved and name not in INFERENCE_SETTINGS and saved[name] != value}


def train_diseased_lung_segmenter(
    rows: pd.DataFrame,
    run_dir: str | os.PathLike,
    recipe: DiseasedLungRecipe | None = None,
    *,
    device: str = "auto",
    on_epoch_end=None,
):
    """Train the :class:`DiseasedLungRecipe` U-Net on the ``train`` rows of ``rows``
    (:func:`diseased_lung_rows`), choose the epoch on ``val``; resume from ``run_dir``.

    Returns :class:`cxrlib.train.segmentation.SegTrainResult`; score it with
    :func:`evaluate_by_convention` (``flips=recipe.flips``, ``zooms=recipe.zooms``) on each source's test rows.
    """
    from cxrlib.data.transforms import OpacityAugment, PairedAugment
    from cxrlib.runs import write_json
    from cxrlib.train.segmentation import train_segmentation

    recipe = recipe or DiseasedLungRecipe()
    changed = resumed_recipe_changes(run_dir, recipe)
    if changed:
        warnings.warn(f"resuming {Path(run_dir) / 'last.pt'}, trained with other recipe settings "
                      f"(saved, now): {changed}; the earlier epochs keep theirs", stacklevel=2)
    train, val = rows[rows["split"] == "train"], rows[rows["split"] == "val"]
    expert = train["source"] == "covid-segmentations"
    train = pd.concat([train[~expert]] + [train[expert]] * max(1, recipe.expert_repeats), ignore_index=True)
    augment = PairedAugment(scale=(0.9, recipe.scale_max), translate=recipe.translate,
                            opacity=OpacityAugment(p=recipe.opacity_p, kinds=tuple(recipe.opacity_kinds),
                                                   lung_labels=(LUNG_LEFT, LUNG_RIGHT, 3))
                            if recipe.opacity_p > 0 else None)
    train_set = LabelMapPairs(*training_pairs(train, recipe.image_size, partial=recipe.partial_labels),
                              augment=augment, seed=recipe.seed)
    val_set = LabelMapPairs(*training_pairs(val, recipe.image_size, partial=recipe.partial_labels))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "recipe.json", {**asdict(recipe), "n_train_items": len(train_set),
                                         "n_val": len(val_set),
                                         **({"resumed_with_changes": changed} if changed else {})})
    return train_segmentation(train_set, val_set, run_dir, recipe.train_config(device), on_epoch_end=on_epoch_end)


# ----------------------------------------------------------------------------- expert masks on cohort films


def link_expert_masks(cohort: pd.DataFrame, expert: pd.DataFrame) -> pd.DataFrame:
    """The expert mask columns of ``expert`` (covid-segmentations manifest) on the rows of
    ``cohort`` that show the same film (cohort ``image_id`` == expert ``ieee8023_image_id``,
    or ``<source>:<ieee8023_image_id>`` as a recipe's cohort names it; same ``patient_id``).

    Returns a copy of ``cohort`` with every ``mask_*`` column of ``expert`` (except
    ``mask_path``) added, ``""`` on rows without expert masks, and ``expert_image_id``.
    A film whose patient differs between the two manifests raises ``ValueError``.
    """
    columns = [c for c in expert.columns if c.startswith("mask_") and c != "mask_path"]
    experts = expert.set_index("ieee8023_image_id")
    linked = cohort.copy()
    linked["expert_image_id"] = ""
    for column in columns:
        linked[column] = ""
    for position, (image_id, patient) in enumerate(zip(cohort["image_id"], cohort["patient_id"], strict=True)):
        image_id = str(image_id)
        if image_id not in experts.index:
            image_id = image_id.split(":", 1)[-1]  # a recipe's "<source>:<file>" id
            if image_id not in experts.index:
                continue
        match = experts.loc[image_id]
        if str(match["patient_id"]) != str(patient):
            raise ValueError(f"film {image_id}: patient {patient} in the cohort, {match['patient_id']} "
                             "in the expert manifest")
        linked.iloc[position, linked.columns.get_loc("expert_image_id")] = match["image_id"]
        for column in columns:
            linked.iloc[position, linked.columns.get_loc(column)] = match[column]
    return linked


def expert_lesion_mask(row: dict, shape: tuple[int, int]) -> np.ndarray | None:
    """Union of a row's expert ground-glass and consolidation masks on a ``shape`` grid
    (``(H, W)`` bool), or ``None`` when the row has no expert lung masks (no reference: an
    empty lesion mask would claim "no lesion"). A row with lung masks but no lesion drawn
    gives an all-False mask."""
    if _optional_mask(row, "mask_lung_left", tuple(shape)) is None:
        return None
    union = np.zeros(tuple(shape), dtype=bool)
    for column in LESION_COLUMNS:
        lesion = _optional_mask(row, column, tuple(shape))
        if lesion is not None:
            union |= lesion
    return union
