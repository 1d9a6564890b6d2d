"""Paired image + label-map transforms: resizing to a common grid and training augmentation.

Images and their masks come at different sizes (the COVID-19 Radiography Database ships
299x299 images with 256x256 lung masks), so every pair is first brought to one square grid:
bilinear with antialiasing for images, nearest neighbour for masks so that no new label
value is ever invented. :class:`PairedAugment` then applies the same random geometry to
both, and intensity changes to the image only.

All functions take and return NumPy arrays; the work is done by
``torchvision.transforms.v2.functional`` on tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

Size = int | tuple[int, int]
MaskLike = TypeVar("MaskLike", np.ndarray, Mapping[str, np.ndarray])


def _as_hw(size: Size) -> list[int]:
    """``256`` -> ``[256, 256]``; ``(h, w)`` -> ``[h, w]``."""
    if isinstance(size, int | np.integer):
        return [int(size), int(size)]
    height, width = size
    return [int(height), int(width)]


def _check_2d(array: np.ndarray, name: str) -> None:
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {array.shape}")


def resize_image(image: np.ndarray, size: Size) -> np.ndarray:
    """Resize a grey-level image with antialiased bilinear interpolation.

    ``image``: ``(H, W)`` uint8 (0..255) or float. ``size``: ``s`` for a square ``s x s``
    (the aspect ratio is not kept, as is usual for CXR datasets) or ``(height, width)``.
    Returns ``(height, width)`` of the input dtype; values stay within the input range.
    """
    _check_2d(image, "image")
    target = _as_hw(size)
    if list(image.shape) == target:
        return image.copy()
    if image.dtype == np.uint8:
        tensor = torch.from_numpy(np.ascontiguousarray(image))[None]
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    resized = TF.resize(tensor, target, interpolation=InterpolationMode.BILINEAR, antialias=True)[0]
    if image.dtype != np.uint8:
        # Float rounding in the filter can overshoot by ~1e-7, e.g. past 1.0.
        resized = resized.clamp_(float(image.min()), float(image.max()))
    return resized.numpy().astype(image.dtype, copy=False)


def resize_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    """Resize a boolean mask or an integer label map by nearest neighbour.

    ``mask``: ``(H, W)`` bool, or integer label map (e.g. uint8 0..3, or 0/255).
    Returns ``(height, width)`` of the same dtype holding only values present in the input.
    Uses the exact (pixel-centre aligned) nearest neighbour, so a mask is not shifted by
    half a pixel relative to the bilinearly resized image.
    """
    _check_2d(mask, "mask")
    target = _as_hw(size)
    if list(mask.shape) == target:
        return mask.copy()
    if mask.dtype == np.bool_:
        values = mask.astype(np.uint8)
    elif np.issubdtype(mask.dtype, np.integer):
        values = mask
    else:
        raise TypeError(f"mask must be bool or integer (labels), got dtype {mask.dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(values))[None]
    resized = TF.resize(
        tensor, target, interpolation=InterpolationMode.NEAREST_EXACT, antialias=False
    )
    return resized[0].numpy().astype(mask.dtype, copy=False)


def to_common_grid(
    image: np.ndarray, masks_or_labels: MaskLike, size: Size
) -> tuple[np.ndarray, MaskLike]:
    """Resize an image (bilinear) and its mask(s) (nearest) to one grid.

    ``masks_or_labels`` is a single ``(h, w)`` mask / label map or a mapping of name ->
    mask (e.g. ``{"lung_left": ..., "heart": ...}``); each may have its own size, since all
    are assumed to cover the same field of view as the image. Returns ``(image, masks)``
    with masks in the same structure as given.
    """
    resized_image = resize_image(image, size)
    if isinstance(masks_or_labels, Mapping):
        return resized_image, {name: resize_mask(m, size) for name, m in masks_or_labels.items()}
    return resized_image, resize_mask(masks_or_labels, size)


def swap_labels(labels: np.ndarray, pair: tuple[int, int]) -> np.ndarray:
    """Return a copy of ``labels`` with the two values of ``pair`` exchanged."""
    first, second = pair
    swapped = labels.copy()
    swapped[labels == first] = second
    swapped[labels == second] = first
    return swapped


@dataclass
class PairedAugment:
    """Random flip, affine and intensity augmentation of an image and its label map.

    Geometry (same draw for both): horizontal flip with probability ``hflip_p``; rotation
    uniform in ``+-rotate_deg`` degrees; isotropic scale uniform in ``scale``; translation
    uniform in ``+-translate`` times the image width / height. The image is interpolated
    bilinearly, the labels by nearest neighbour; uncovered borders become 0 (black image,
    background label). Intensity (image only): brightness and contrast factors uniform in
    ``1 +- brightness`` / ``1 +- contrast``, gamma log-uniform in ``gamma``.

    A horizontal flip moves the patient's left lung to the image left, where the right lung
    normally is; the label values in ``swap_lr_labels`` are exchanged on a flip so that
    "label 1 = lung on the image right" keeps holding. ``None`` keeps labels as they are.

    All random numbers are drawn from the given ``rng`` in a fixed order whatever the
    magnitudes, so the output is a function of the rng state; with every magnitude zero
    (:meth:`identity`) the call only converts the image to float. ``opacity`` (only with
    labels, which say where the lungs are) paints lesions into the lungs after the
    geometry and before the intensity changes; its draws come after all the others.
    """

    hflip_p: float = 0.5
    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    brightness: float = 0.15
    contrast: float = 0.15
    gamma: tuple[float, float] = (0.8, 1.25)
    swap_lr_labels: tuple[int, int] | None = (1, 2)
    #: Opacities painted inside the lungs after the geometry (:class:`OpacityAugment`);
    #: ``None`` paints none and draws nothing more from the rng.
    opacity: OpacityAugment | None = None

    @classmethod
    def identity(cls) -> PairedAugment:
        """An augmentation with every magnitude zero (returns its input unchanged)."""
        return cls(
            hflip_p=0.0,
            rotate_deg=0.0,
            scale=(1.0, 1.0),
            translate=0.0,
            brightness=0.0,
            contrast=0.0,
            gamma=(1.0, 1.0),
        )

    def __call__(
        self, image: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``image`` ``(H, W)`` uint8 (or float in [0, 1]), ``labels`` ``(H, W)`` uint8 or ``None``.

        Returns ``(image float32 (H, W) in [0, 1], labels uint8 (H, W))``; with
        ``labels=None`` (an image alone, e.g. for a classifier) only the image is
        transformed and ``None`` comes back; the image is the same as with labels.
        """
        _check_2d(image, "image")
        if labels is not None:
            _check_2d(labels, "labels")
            if image.shape != labels.shape:
                raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape")
        height, width = image.shape

        flip = rng.random() < self.hflip_p
        angle = float(rng.uniform(-self.rotate_deg, self.rotate_deg))
        zoom = float(rng.uniform(*self.scale))
        shift = [
            float(rng.uniform(-self.translate, self.translate) * width),
            float(rng.uniform(-self.translate, self.translate) * height),
        ]
        brightness = float(rng.uniform(1 - self.brightness, 1 + self.brightness))
        contrast = float(rng.uniform(1 - self.contrast, 1 + self.contrast))
        gamma = float(np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1]))))

        if image.dtype == np.uint8:
            image_t = torch.from_numpy(image.astype(np.float32) / 255.0)[None]
        else:
            image_t = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())[None]
        labels_t = (
            None if labels is None else torch.from_numpy(np.array(labels, dtype=np.uint8))[None]
        )

        if flip:
            image_t = TF.horizontal_flip(image_t)
            labels_t = None if labels_t is None else TF.horizontal_flip(labels_t)
        # Resampling at the identity transform is not exact, so it is skipped.
        if angle != 0.0 or zoom != 1.0 or shift != [0.0, 0.0]:
            geometry = {"angle": angle, "translate": shift, "scale": zoom, "shear": [0.0, 0.0]}
            image_t = TF.affine(
                image_t, **geometry, interpolation=InterpolationMode.BILINEAR, fill=0.0
            )
            if labels_t is not None:
                labels_t = TF.affine(
                    labels_t, **geometry, interpolation=InterpolationMode.NEAREST, fill=0
                )
        if self.opacity is not None and labels_t is not None:
            opacity_rng = np.random.default_rng(int(rng.integers(2**63)))
            painted = self.opacity(image_t[0].numpy(), labels_t[0].numpy(), opacity_rng)
            image_t = torch.from_numpy(painted)[None]
        if gamma != 1.0:
            image_t = TF.adjust_gamma(image_t, gamma)
        if contrast != 1.0:
            image_t = TF.adjust_contrast(image_t, contrast)
        if brightness != 1.0:
            image_t = TF.adjust_brightness(image_t, brightness)

        image_out = image_t[0].clamp_(0.0, 1.0).numpy().astype(np.float32, copy=False)
        if labels_t is None:
            return image_out, None
        labels_out = labels_t[0].numpy()
        if flip and self.swap_lr_labels is not None:
            labels_out = swap_labels(labels_out, self.swap_lr_labels)
        return image_out, labels_out.astype(np.uint8, copy=False)


# ----------------------------------------------------------------------------- opacities

#: Kinds of opacity :class:`OpacityAugment` can paint.
OPACITY_KINDS: tuple[str, ...] = ("ground_glass", "consolidation", "white_out", "effusion", "basal_white_out")
#: The kinds it paints unless told otherwise: those that stay inside the lung. ``basal_white_out``
#: is an option; in the diseased-lung cross-validation it made no measurable difference
#: (``docs/segmentation.md``).
DEFAULT_OPACITY_KINDS: tuple[str, ...] = ("ground_glass", "consolidation", "white_out", "effusion")


def _smooth_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to [0, 1], ``(H, W)`` float32."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="reflect")
    low, high = float(field.min()), float(field.max())
    return (field - low) / max(high - low, 1e-6)


@dataclass
class OpacityAugment:
    """Paint COVID-19-like opacities inside the lungs of an image; the lung label is kept.

    Models trained on clear lungs leave dense consolidation and white-out out of the lung;
    painting such opacities into training images, with the lung label unchanged, teaches
    that an opaque lung is still lung. With probability ``p`` an image gets one kind,
    drawn uniformly from ``kinds`` (:data:`DEFAULT_OPACITY_KINDS`; all: :data:`OPACITY_KINDS`), in
    one or both lungs:

    - ``ground_glass``: patchy, soft-edged haze (blobs of smoothed noise) that raises the
      grey level by ``ground_glass_strength`` of the way to white and keeps the texture;
    - ``consolidation``: denser patches, blended ``consolidation_strength`` of the way to a
      soft-tissue grey level (the image's 90th percentile inside the body);
    - ``white_out``: the whole lung, denser towards the base;
    - ``effusion``: the lung below a level with a meniscus rising to the side wall, nearly
      as dense as the soft tissue;
    - ``basal_white_out``: the lung below a ragged level as dense as the soft tissue right up
      to its border (ribs and vessels kept faintly), and the soft tissue next to it alike, so
      that the diaphragm and the lateral border vanish (the silhouette sign of ARDS and dense
      basal consolidation). The only kind that also paints outside the lung: within
      ``silhouette_margin`` of the side of the lung below the level, and only where the image
      is at least as bright as the lung's median (soft tissue, never the air beside the body).

    ``lung_labels``: label values that are lung (1, 2; add 3 when it stands for lung, e.g.
    the retrocardiac lung). ``image``: ``(H, W)`` float32 in [0, 1]; ``labels`` ``(H, W)``
    integer. Returns a new float32 image in [0, 1]; ``labels`` is never changed.
    """

    p: float = 0.5
    kinds: tuple[str, ...] = DEFAULT_OPACITY_KINDS
    lung_labels: tuple[int, ...] = (1, 2)
    ground_glass_strength: tuple[float, float] = (0.15, 0.4)
    consolidation_strength: tuple[float, float] = (0.6, 0.95)
    blob_sigma: tuple[float, float] = (0.03, 0.08)
    silhouette_margin: tuple[float, float] = (0.03, 0.06)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(OPACITY_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {OPACITY_KINDS}, got {self.kinds}")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")

    def __call__(self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from scipy import ndimage

        _check_2d(image, "image")
        _check_2d(labels, "labels")
        if image.shape != labels.shape:
            raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape")
        image = np.asarray(image, dtype=np.float32)
        if rng.random() >= self.p:
            return image.copy()
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        lungs = np.isin(labels, self.lung_labels)
        if not lungs.any():
            return image.copy()
        height, width = image.shape
        # one lung (by image half) or both
        side = int(rng.integers(3))
        columns = np.arange(width)[None, :]
        lung_cols = np.flatnonzero(lungs.any(axis=0))
        middle = (lung_cols[0] + lung_cols[-1]) / 2
        region = lungs & (columns < middle if side == 0 else columns >= middle if side == 1 else True)
        if not region.any():
            region = lungs
        # soft edges: the opacity fades out over a few pixels at the lung border
        soft = ndimage.gaussian_filter(region.astype(np.float32), max(1.0, 0.01 * width))
        soft = np.where(region, soft, 0.0).clip(0, 1)
        body = image[image > np.percentile(image, 5)]
        tissue = float(np.percentile(body if body.size else image, 90))
        if kind == "ground_glass":
            sigma = float(rng.uniform(*self.blob_sigma)) * width
            patches = (_smooth_field(image.shape, sigma, rng) - rng.uniform(0.35, 0.6)).clip(0, None)
            weight = soft * patches / max(float(patches.max()), 1e-6)
            strength = float(rng.uniform(*self.ground_glass_strength))
            painted = image + strength * weight * (1.0 - image)
        elif kind == "consolidation":
            sigma = float(rng.uniform(*self.blob_sigma)) * width
            patches = ((_smooth_field(image.shape, sigma, rng) - rng.uniform(0.5, 0.7)) * 8).clip(0, 1)
            # lower zones are hit more often (as in COVID-19 pneumonia)
            rows = np.linspace(0.4, 1.0, height, dtype=np.float32)[:, None]
            weight = soft * patches * rows
            strength = float(rng.uniform(*self.consolidation_strength))
            painted = image + strength * weight * (np.maximum(tissue, image) - image)
        elif kind == "white_out":
            lung_rows = np.flatnonzero(region.any(axis=1))
            top, bottom = lung_rows[0], lung_rows[-1] + 1
            ramp = np.clip((np.arange(height) - top) / max(bottom - top, 1), 0, 1)[:, None]
            strength = float(rng.uniform(*self.consolidation_strength))
            weight = soft * (0.6 + 0.4 * ramp.astype(np.float32))
            painted = image + strength * weight * (np.maximum(tissue, image) - image)
        elif kind == "basal_white_out":
            lung_rows = np.flatnonzero(region.any(axis=1))
            top, bottom = lung_rows[0], lung_rows[-1] + 1
            span = max(bottom - top, 1)
            level = top + float(rng.uniform(0.35, 0.8)) * span
            # a ragged upper edge: the level moves by up to a tenth of the lung's height
            ragged = (_smooth_field(image.shape, 0.05 * width, rng) - 0.5) * 0.2 * span
            below = np.clip((np.arange(height)[:, None] - level + ragged) / max(0.05 * span, 1.0) + 0.5, 0, 1)
            margin = max(1, int(round(float(rng.uniform(*self.silhouette_margin)) * width)))
            reach = ndimage.binary_dilation(region, iterations=margin)
            reach &= np.arange(height)[:, None] >= top
            reach &= region | (image >= float(np.median(image[region])))
            # full weight at the lung border, so that no edge is left there
            spread = ndimage.gaussian_filter(reach.astype(np.float32), max(1.0, 0.01 * width))
            weight = np.where(reach, np.maximum(spread, region), 0.0) * below
            strength = float(rng.uniform(0.7, 0.95))
            # ribs and vessels stay faintly visible through the opacity: half of the fine
            # detail that the blend takes away is given back. The detail is measured against
            # a local mean of lung pixels only, so that the lung's own border is no detail
            blur = max(1.0, 0.008 * width)
            inside = region.astype(np.float32)
            local = ndimage.gaussian_filter(image * inside, blur) / np.maximum(ndimage.gaussian_filter(inside, blur), 1e-6)
            detail = np.where(region, image - local, 0.0)
            painted = image + strength * weight * (np.maximum(tissue, image) - image + 0.5 * detail)
        else:  # effusion
            lung_rows = np.flatnonzero(region.any(axis=1))
            top, bottom = lung_rows[0], lung_rows[-1] + 1
            level = top + float(rng.uniform(0.55, 0.9)) * (bottom - top)
            # meniscus: the fluid line rises towards the lateral chest wall
            lateral = np.abs(columns - middle) / max(width / 2, 1)
            line = level - float(rng.uniform(0.05, 0.2)) * (bottom - top) * lateral**2
            fluid = (np.arange(height)[:, None] >= line).astype(np.float32)
            fluid = ndimage.gaussian_filter(fluid, max(1.0, 0.01 * height))
            weight = soft * fluid
            strength = float(rng.uniform(0.8, 0.97))
            painted = image + strength * weight * (np.maximum(tissue, image) - image)
        return np.clip(painted, 0.0, 1.0).astype(np.float32)
