"""Burned-in text and marker removal: a data-cleaning step any image source can use.

Chest X-rays carry burned-in letters (site name, accession number, date, view) and side
markers. They identify the hospital, which a classifier can learn instead of the disease
(the site shortcut notebook 04 measures), and a generator trained on them copies them.
"This X-Ray Does Not Exist" (2024) removes them by segmentation + inpainting; so does this
module:

1. :func:`train_text_segmenter` trains the project's U-Net (:class:`cxrlib.models.unet.UNet`,
   two classes: background / text) on the phantom's exact text masks (manifest column
   ``mask_text``), on random crops half of which are centred on text, so a small network
   learns from full-resolution letters quickly; :func:`predict_text_masks` runs it on whole
   images (the U-Net is fully convolutional);
2. :func:`inpaint_telea` fills the predicted mask with OpenCV's Telea method (the baseline);
   :func:`inpaint_diffusion` fills it with the trained diffusion model (RePaint-style, at the
   model's resolution, pasted back inside the mask only);
3. :func:`text_region_scores` measures, on the phantom, the mask Dice and PSNR / SSIM *inside
   the text region* against the text-free twin the phantom renders with the same seed
   (``images_clean/``, :func:`clean_twin_paths`); :func:`clean_manifest` writes cleaned copies
   of every image of a manifest, so a classifier (notebook 04's site control) can be trained
   on them before and after.

On real images there is no text-free twin and no exact mask: results there can only be
looked at, not scored.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from cxrlib.config import seed_everything
from cxrlib.data import manifest as mf
from cxrlib.data.io import read_image, read_mask, write_png
from cxrlib.evaluate.segmentation import dice
from cxrlib.models.unet import UNet, UNetConfig
from cxrlib.train.engine import (
    PRECISION_HELP,
    PRECISIONS,
    MetricLogger,
    Precision,
    as_precision,
    init_distributed,
    load_checkpoint,
    make_loader,
    progress_bar,
    read_checkpoint,
    resolve_precision,
    save_checkpoint,
    seed_epoch,
    set_loader_epoch,
    unwrap,
    wrap_ddp,
)
from cxrlib.train.segmentation import segmentation_loss

#: Manifest column with the phantom's exact text / marker mask.
TEXT_MASK_COLUMN = "mask_text"
#: Folder of the phantom's text-free twins, next to ``images/`` (see :func:`cxrlib.data.phantom.write_cohort`).
CLEAN_FOLDER = "images_clean"


# ----------------------------------------------------------------------------- data


def clean_twin_paths(rows: pd.DataFrame) -> list[Path]:
    """The text-free twin of each phantom image: ``.../images/<id>.png`` -> ``.../images_clean/<id>.png``.

    Raises ``FileNotFoundError`` naming the first missing twin and how many are missing
    (cohorts written with ``text=False`` have none; real datasets never do).
    """
    paths, missing = [], []
    for value in rows["path"].astype(str):
        image_path = mf.resolve_path(rows, value)
        twin = image_path.parent.parent / CLEAN_FOLDER / image_path.name
        if image_path.parent.name != "images" or not twin.is_file():
            missing.append(str(twin))
        paths.append(twin)
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) have no text-free twin, e.g. {missing[0]} "
                                "(only phantom cohorts rendered with text=True have images_clean/)")
    return paths


def _resize(image: np.ndarray, size: int | None, *, nearest: bool = False) -> np.ndarray:
    if size is None or image.shape == (size, size):
        return image
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(image, (size, size), interpolation=interpolation)


def load_text_data(rows: pd.DataFrame, *, size: int | None = None, clean: bool = True
                   ) -> dict[str, np.ndarray]:
    """Images, exact text masks and (``clean=True``) text-free twins of phantom rows.

    Returns ``{"images": (N, S, S) uint8, "masks": (N, S, S) bool, "clean": (N, S, S) uint8}``,
    resized to ``size`` (``None``: as stored; masks nearest-neighbour). Raises ``ValueError``
    when the manifest has no ``mask_text`` column or a row has no mask (naming it).
    """
    if TEXT_MASK_COLUMN not in rows.columns:
        raise ValueError(f"the manifest has no {TEXT_MASK_COLUMN!r} column: text masks come from the phantom "
                         "(cxrlib.data.phantom.write_cohort)")
    empty = rows[rows[TEXT_MASK_COLUMN].astype(str).str.strip() == ""]
    if len(empty):
        raise ValueError(f"{len(empty)} row(s) have no {TEXT_MASK_COLUMN}: {empty['image_id'].astype(str).tolist()[:5]}")
    images = [_resize(read_image(mf.resolve_path(rows, p)), size) for p in rows["path"].astype(str)]
    masks = [_resize(read_mask(mf.resolve_path(rows, p)).astype(np.uint8), size, nearest=True) > 0
             for p in rows[TEXT_MASK_COLUMN].astype(str)]
    out = {"images": np.stack(images), "masks": np.stack(masks)}
    if clean:
        out["clean"] = np.stack([_resize(read_image(p), size) for p in clean_twin_paths(rows)])
    return out


class TextCropDataset(Dataset):
    """Random ``crop x crop`` windows of images and their text masks, for training the segmenter.

    Items: ``(image (1, crop, crop) float32 in [0, 1], labels (crop, crop) int64 in {0, 1})``.
    With probability ``text_fraction`` a window is centred (with jitter) on a random text
    pixel of the image, otherwise placed uniformly; the draw depends only on
    ``(seed, epoch, index)`` (:meth:`set_epoch`), so runs and resumed runs see the same crops.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, *, crop: int = 64, text_fraction: float = 0.5,
                 seed: int = 0) -> None:
        images, masks = np.asarray(images), np.asarray(masks, dtype=bool)
        if images.ndim != 3 or images.dtype != np.uint8 or masks.shape != images.shape:
            raise ValueError(f"need (N, H, W) uint8 images and bool masks of the same shape, got "
                             f"{images.shape} {images.dtype} and {masks.shape}")
        if crop > min(images.shape[1:]):
            raise ValueError(f"crop {crop} is larger than the images {images.shape[1:]}")
        self.images, self.masks, self.crop = images, masks, int(crop)
        self.text_fraction, self.seed, self.epoch = float(text_fraction), int(seed), 0
        self.text_pixels = [np.argwhere(mask) for mask in masks]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        height, width = self.images.shape[1:]
        half = self.crop // 2
        pixels = self.text_pixels[index]
        if len(pixels) and rng.random() < self.text_fraction:
            y, x = pixels[rng.integers(len(pixels))] + rng.integers(-half // 2, half // 2 + 1, size=2)
            top, left = int(np.clip(y - half, 0, height - self.crop)), int(np.clip(x - half, 0, width - self.crop))
        else:
            top, left = int(rng.integers(0, height - self.crop + 1)), int(rng.integers(0, width - self.crop + 1))
        window = (slice(top, top + self.crop), slice(left, left + self.crop))
        image = torch.from_numpy(self.images[index][window].astype(np.float32) / 255.0)[None]
        labels = torch.from_numpy(self.masks[index][window].astype(np.int64))
        return image, labels


# ----------------------------------------------------------------------------- segmenter


@dataclass
class TextSegConfig:
    """Settings of :func:`train_text_segmenter` (saved with its checkpoint).

    ``base_channels``, ``depth``: the U-Net (:class:`~cxrlib.models.unet.UNetConfig`, two
    classes, group norm so batch statistics of text-heavy crops do not leak into inference
    on whole images); ``crop``, ``text_fraction``: the training windows
    (:class:`TextCropDataset`); ``epochs`` x ``steps_per_epoch`` steps of ``batch_size``
    crops, AdamW ``lr``; ``threshold``: text probability that counts as text;
    ``seed``, ``device``, ``progress``; ``precision`` (:func:`~cxrlib.train.engine.resolve_precision`;
    the saved config holds the resolved one).
    """

    base_channels: int = 8
    depth: int = 3
    crop: int = 64
    text_fraction: float = 0.5
    epochs: int = 4
    steps_per_epoch: int = 50
    batch_size: int = 16
    lr: float = 3e-3
    threshold: float = 0.5
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    precision: str = field(default="fp32", metadata={"help": PRECISION_HELP, "choices": PRECISIONS})

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def unet_config(self) -> UNetConfig:
        return UNetConfig(in_channels=1, num_classes=2, depth=self.depth, base_channels=self.base_channels,
                          norm="group")


@dataclass
class TextSegmenter:
    """A trained text segmenter: the U-Net (eval mode), its config, history and checkpoint."""

    model: UNet
    config: TextSegConfig
    history: pd.DataFrame
    checkpoint_path: Path


def train_text_segmenter(images: np.ndarray, masks: np.ndarray, run_dir: str | os.PathLike,
                         config: TextSegConfig | None = None, *, resume: bool = True) -> TextSegmenter:
    """Train (or resume, or load) the two-class U-Net on ``images`` ``(N, H, W)`` uint8 and their
    text ``masks`` ``(N, H, W)`` bool (training images only), with the lung segmenter's
    cross-entropy + soft Dice loss (:func:`cxrlib.train.segmentation.segmentation_loss`).

    ``run_dir`` gets ``last.pt`` (every epoch, with the resolved config), ``config.json`` and
    ``history.jsonl``; a finished run is loaded instead of retrained.
    """
    config = config or TextSegConfig()
    ctx = init_distributed(config.device)
    precision = resolve_precision(config.precision, ctx.device)
    config = replace(config, precision=precision.name)  # the checkpoint records what ran
    scaler = precision.grad_scaler()
    run_dir = Path(run_dir)
    last_path = run_dir / "last.pt"
    seed_everything(config.seed)
    model = UNet(config.unet_config()).to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    start_epoch, step = 1, 0
    if resume and last_path.is_file():
        checkpoint = load_checkpoint(last_path, model=model, optimizer=optimizer)
        start_epoch, step = int(checkpoint["epoch"]) + 1, int(checkpoint["step"])
    logger = MetricLogger(run_dir, enabled=ctx.is_main)
    logger.drop_after(start_epoch - 1)
    if start_epoch <= config.epochs:
        dataset = TextCropDataset(images, masks, crop=config.crop, text_fraction=config.text_fraction,
                                  seed=config.seed)
        loader = make_loader(dataset, config.batch_size, shuffle=True, seed=config.seed, ctx=ctx, drop_last=False)
        net = wrap_ddp(model, ctx)
        for epoch in progress_bar(range(start_epoch, config.epochs + 1), ctx=ctx, enabled=config.progress,
                                  desc="text segmenter", unit="epoch"):
            started = time.perf_counter()
            seed_epoch(config.seed, epoch, ctx.rank)
            set_loader_epoch(loader, epoch)
            net.train()
            total, steps = 0.0, 0
            while steps < config.steps_per_epoch:  # several passes when the set is small
                for batch, labels in loader:
                    with precision.autocast():
                        logits = net(batch.to(ctx.device))
                    loss, _ = segmentation_loss(logits.float(), labels.to(ctx.device))  # float32 loss
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    total += float(loss.detach())
                    steps += 1
                    if steps >= config.steps_per_epoch:
                        break
            step += steps
            logger.log({"epoch": epoch, "step": step, "train_loss": total / max(steps, 1),
                        "time_s": round(time.perf_counter() - started, 3)})
            if ctx.is_main:
                save_checkpoint(last_path, model=model, optimizer=optimizer, epoch=epoch, step=step,
                                config=asdict(config))
    unwrap(model).eval()
    return TextSegmenter(model=unwrap(model), config=config, history=logger.frame(), checkpoint_path=last_path)


def load_text_segmenter(path: str | os.PathLike, device: str = "cpu") -> TextSegmenter:
    """A segmenter from its run folder or checkpoint (``weights_only`` loading)."""
    checkpoint = read_checkpoint(path)
    names = {f.name for f in fields(TextSegConfig)}
    config = TextSegConfig(**{k: v for k, v in (checkpoint.get("config") or {}).items() if k in names})
    model = UNet(config.unet_config())
    load_checkpoint(checkpoint, model=model)
    history_path = Path(checkpoint["path"]).parent / "history.jsonl"
    history = pd.read_json(history_path, lines=True) if history_path.is_file() else pd.DataFrame()
    return TextSegmenter(model=model.to(device).eval(), config=config, history=history,
                         checkpoint_path=Path(checkpoint["path"]))


@torch.no_grad()
def text_probability(segmenter: TextSegmenter | nn.Module, images: np.ndarray, *, batch_size: int = 8,
                     precision: str | Precision = "fp32") -> np.ndarray:
    """Per-pixel text probability ``(N, H, W)`` float32 in [0, 1] of uint8 images ``(N, H, W)``.

    ``precision``: the autocast of the forward passes (:func:`~cxrlib.train.engine.resolve_precision`).
    """
    net = segmenter.model if isinstance(segmenter, TextSegmenter) else segmenter
    device = next(net.parameters()).device
    precision = as_precision(precision, device)
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size].astype(np.float32) / 255.0)[:, None].to(device)
        with precision.autocast():
            logits = net(batch)
        out.append(logits.float().softmax(dim=1)[:, 1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(images.shape, np.float32)


def predict_text_masks(segmenter: TextSegmenter, images: np.ndarray, *, threshold: float | None = None,
                       batch_size: int = 8, precision: str | Precision = "fp32") -> np.ndarray:
    """Text masks ``(N, H, W)`` bool: text probability >= ``threshold`` (default: the config's)."""
    cut = segmenter.config.threshold if threshold is None else float(threshold)
    return text_probability(segmenter, images, batch_size=batch_size, precision=precision) >= cut


#: File endings :func:`sample_folder_images` reads (what :func:`cxrlib.data.io.read_image` reads).
FOLDER_IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def sample_folder_images(folder: str | os.PathLike, n: int, *, size: int = 256,
                         seed: int = 0) -> tuple[np.ndarray, list[Path], list[str]]:
    """Up to ``n`` images drawn at random (seeded) from ``folder`` and its subfolders, for a look at
    text removal on images with no ground truth.

    Reads PNG, JPEG and DICOM (:data:`FOLDER_IMAGE_SUFFIXES`, any case) with
    :func:`cxrlib.data.io.read_image` and resizes each to ``size x size``. A file that cannot
    be read is skipped, listed as ``"<path>: <reason>"``, and the next drawn file takes its
    place. Returns ``(images (k, size, size) uint8, paths, problems)``; FileNotFoundError
    when the folder does not exist or holds no image file.
    """
    from cxrlib.data.transforms import resize_image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    files = sorted(path for path in root.rglob("*") if path.suffix.lower() in FOLDER_IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{root}: no image file ({', '.join(FOLDER_IMAGE_SUFFIXES)})")
    images, paths, problems = [], [], []
    for index in np.random.default_rng(seed).permutation(len(files)):
        if len(images) >= n:
            break
        path = files[index]
        try:
            images.append(resize_image(read_image(path), size).astype(np.uint8))
            paths.append(path)
        except Exception as exc:  # list the bad file and go on
            problems.append(f"{path}: {exc}")
    stacked = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    return stacked, paths, problems


def grow(masks: np.ndarray, pixels: int = 1) -> np.ndarray:
    """Masks ``(N, H, W)`` or ``(H, W)`` bool dilated by ``pixels`` (3x3 square), so inpainting also
    replaces the anti-aliased rim of the letters."""
    masks = np.asarray(masks, dtype=bool)
    if pixels <= 0:
        return masks
    kernel = np.ones((3, 3), np.uint8)
    grown = [cv2.dilate(m.astype(np.uint8), kernel, iterations=int(pixels)) > 0 for m in masks.reshape(-1, *masks.shape[-2:])]
    return np.stack(grown).reshape(masks.shape)


# ----------------------------------------------------------------------------- inpainting


def inpaint_telea(images: np.ndarray, masks: np.ndarray, *, radius: float = 3.0) -> np.ndarray:
    """OpenCV's Telea inpainting (``cv2.inpaint(..., cv2.INPAINT_TELEA)``) of each image's mask.

    ``images``: ``(N, H, W)`` uint8; ``masks``: ``(N, H, W)`` bool (True = replace). Returns
    ``(N, H, W)`` uint8; pixels outside the masks are unchanged.
    """
    images, masks = np.asarray(images), np.asarray(masks, dtype=bool)
    if images.shape != masks.shape or images.dtype != np.uint8:
        raise ValueError(f"need uint8 images and bool masks of one shape, got {images.shape} {images.dtype}, "
                         f"{masks.shape}")
    out = images.copy()
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        if mask.any():
            out[index] = cv2.inpaint(image, mask.astype(np.uint8), float(radius), cv2.INPAINT_TELEA)
    return out


def inpaint_diffusion(model: Any, images: np.ndarray, masks: np.ndarray, *, labels: Sequence[str] | None = None,
                      num_inference_steps: int = 25, resample: int = 2, seed: int = 0,
                      batch_size: int = 32) -> np.ndarray:
    """Fill each image's mask with a :class:`~cxrlib.models.diffusion.DiffusionModel` (RePaint-style).

    The images and masks are resized to the model's ``image_size`` (any pixel touching the
    mask counts as unknown), :meth:`~cxrlib.models.diffusion.DiffusionModel.inpaint` invents
    the unknown region conditioned on the rest, and the result is resized back and pasted
    *inside the original masks only*. A model trained at a lower resolution than the images
    can only fill in what it knows at its own scale (a blurrier patch), which the PSNR
    against the text-free twin shows. Returns ``(N, H, W)`` uint8.
    """
    images, masks = np.asarray(images), np.asarray(masks, dtype=bool)
    if images.shape != masks.shape or images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"need (N, H, W) uint8 images and bool masks of one shape, got {images.shape}, {masks.shape}")
    side = model.config.image_size
    height, width = images.shape[1:]
    small = np.stack([cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA) for image in images])
    # INTER_AREA of the mask as float: any coverage makes the small pixel unknown
    small_masks = np.stack([cv2.resize(mask.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA) > 0
                            for mask in masks])
    filled = model.inpaint(small, small_masks, labels, num_inference_steps=num_inference_steps, resample=resample,
                           seed=seed, batch_size=batch_size)
    large = np.stack([cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC) for image in filled])
    return np.where(masks, large, images).astype(np.uint8)


# ----------------------------------------------------------------------------- scores


def region_psnr(restored: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, peak 255) over the pixels of ``mask`` of one ``(H, W)`` image pair; NaN for an
    empty mask, ``inf`` for an exact match."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return float("nan")
    error = np.mean((restored[mask].astype(np.float64) - reference[mask].astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10.0 * np.log10(255.0**2 / error))


def region_ssim(restored: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """Mean of skimage's SSIM map (7x7 window) over the pixels of ``mask``; NaN for an empty mask."""
    from skimage.metrics import structural_similarity

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return float("nan")
    _, ssim_map = structural_similarity(restored, reference, data_range=255, win_size=7, full=True)
    return float(ssim_map[mask].mean())


def text_region_scores(restored: np.ndarray, clean: np.ndarray, true_masks: np.ndarray) -> dict[str, Any]:
    """PSNR and SSIM of inpainted images against their text-free twins, inside the TRUE text region.

    ``restored``, ``clean``: ``(N, H, W)`` uint8; ``true_masks``: ``(N, H, W)`` bool (the
    phantom's exact masks: a segmenter that misses letters is penalised, as they stay
    white). Returns ``psnr`` / ``ssim`` (mean over images with text; an exact match is capped
    at 100 dB), the per-image arrays ``psnr_per_image`` / ``ssim_per_image`` and ``n``.
    """
    psnr = np.array([region_psnr(r, c, m) for r, c, m in zip(restored, clean, true_masks, strict=True)])
    ssim = np.array([region_ssim(r, c, m) for r, c, m in zip(restored, clean, true_masks, strict=True)])
    psnr = np.minimum(psnr, 100.0)
    return {"psnr": float(np.nanmean(psnr)) if np.isfinite(psnr).any() else float("nan"),
            "ssim": float(np.nanmean(ssim)) if np.isfinite(ssim).any() else float("nan"),
            "psnr_per_image": psnr, "ssim_per_image": ssim, "n": int(np.isfinite(psnr).sum())}


def mask_dice(predicted: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Text-mask Dice: ``dice`` over all pixels of all images pooled, and ``dice_mean`` per image
    (images without text on both sides score 1), via :func:`cxrlib.evaluate.segmentation.dice`."""
    predicted, true = np.asarray(predicted, bool), np.asarray(true, bool)
    per_image = [dice(p, t) for p, t in zip(predicted, true, strict=True)]
    return {"dice": float(dice(predicted, true)), "dice_mean": float(np.mean(per_image)) if per_image else float("nan")}


# ----------------------------------------------------------------------------- whole manifests


def clean_manifest(manifest: pd.DataFrame, segmenter: TextSegmenter, out_dir: str | os.PathLike, *,
                   method: str | Callable[[np.ndarray, np.ndarray], np.ndarray] = "telea", grow_pixels: int = 1,
                   rows: pd.DataFrame | None = None, batch_size: int = 16, progress: bool = True
                   ) -> tuple[pd.DataFrame, list[str]]:
    """Write text-removed copies of images and return the manifest pointing at them.

    Every row of ``rows`` (default: all real rows of ``manifest``) is read, its text
    predicted by ``segmenter`` (grown by ``grow_pixels``) and inpainted with ``method``
    (``"telea"`` or a function ``(images, masks) -> images``); the PNG goes to
    ``out_dir/<image_id>.png`` (atomically; an existing file is reused, so a killed run
    resumes). Returns ``(cleaned manifest, problems)``: the chosen rows with ``path``
    replaced (absolute, like every manifest path in memory), and one line per unreadable image
    (``"<path>: <error>"``), which is left out and the run goes on.
    """
    inpaint = inpaint_telea if method == "telea" else method
    if not callable(inpaint):
        raise ValueError(f"method must be 'telea' or a function (images, masks) -> images, got {method!r}")
    out_dir = Path(out_dir)
    chosen = (manifest[manifest["origin"].astype(str) == mf.REAL] if rows is None else rows).copy()
    problems: list[str] = []
    new_paths: dict[Any, str] = {}
    pending: list[tuple[Any, Path, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        stack_shape = {image.shape for _, _, image in pending}
        groups = [[item for item in pending if item[2].shape == shape] for shape in stack_shape]
        for group in groups:
            batch = np.stack([image for _, _, image in group])
            cleaned = inpaint(batch, grow(predict_text_masks(segmenter, batch), grow_pixels))
            for (index, target, _), image in zip(group, cleaned, strict=True):
                write_png(target, image)
                new_paths[index] = str(target.resolve())
        pending.clear()

    for index, row in progress_bar(list(chosen.iterrows()), enabled=progress, desc="text removal", unit="img"):
        target = out_dir / f"{row['image_id']}.png"
        if target.is_file():
            new_paths[index] = str(target.resolve())
            continue
        source = mf.resolve_path(manifest, str(row["path"]))
        try:
            image = read_image(source)
        except Exception as exc:  # a long run lists bad files and goes on
            problems.append(f"{source}: {type(exc).__name__}: {exc}")
            continue
        pending.append((index, target, image))
        if len(pending) >= batch_size:
            flush()
    flush()
    cleaned = chosen.loc[[index for index in chosen.index if index in new_paths]].copy()
    cleaned["path"] = [new_paths[index] for index in cleaned.index]
    return cleaned, problems

