"""PyTorch Datasets over a manifest: lung segmentation pairs and images for inference.

A manifest row has ``path`` (the image) and its lung masks in one of two layouts, paths
absolute (as :func:`cxrlib.data.manifest.read_manifest` and the adapters give them):

- per structure: ``mask_lung_left``, ``mask_lung_right`` (and ``mask_heart``), 0/255 PNGs,
  as the project's phantom writes them and as JSRT/SCR provides them;
- one union lung mask in ``mask_path`` (0/255), as in the COVID-19 Radiography Database
  (its masks are 256x256 while the images are 299x299); left and right are recovered by
  connected components (:func:`cxrlib.data.masks.split_union_lung_mask`).

When a row has both, the per-structure masks are used. Labels follow
:mod:`cxrlib.data.masks`: 0 background, 1 patient's left lung (image right),
2 patient's right lung, 3 heart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from cxrlib.data.io import read_image, read_mask
from cxrlib.data.manifest import resolve_path
from cxrlib.data.masks import labels_from_masks, split_union_lung_mask
from cxrlib.data.transforms import PairedAugment, Size, resize_image, resize_mask

PER_KIND_COLUMNS = ("mask_lung_left", "mask_lung_right")
HEART_COLUMN = "mask_heart"
UNION_COLUMN = "mask_path"

#: Most image ids an error message lists.
_MAX_LISTED = 10

def has_path(row: Mapping[str, Any], column: str) -> bool:
    """Whether ``row[column]`` holds a path (not missing, NaN, None or empty)."""
    value = row.get(column)
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return False
    return bool(str(value).strip())


def mask_layout(row: Mapping[str, Any]) -> str | None:
    """``"per_kind"``, ``"union"`` or ``None`` (no usable lung mask) for a manifest row."""
    if all(has_path(row, column) for column in PER_KIND_COLUMNS):
        return "per_kind"
    if has_path(row, UNION_COLUMN):
        return "union"
    return None


def image_ids_of(manifest: pd.DataFrame) -> list[str]:
    """The ``image_id`` column as strings, or the index when the manifest has none."""
    if "image_id" in manifest.columns:
        return [str(image_id) for image_id in manifest["image_id"]]
    return [str(index) for index in manifest.index]


def listed_ids(ids: list[str]) -> str:
    """The first few ``ids`` for an error message, with how many more there are."""
    shown = ", ".join(ids[:_MAX_LISTED])
    return shown + (f" (and {len(ids) - _MAX_LISTED} more)" if len(ids) > _MAX_LISTED else "")


def load_label_map(
    row: Mapping[str, Any], size: Size | None = 256, include_heart: bool = False
) -> np.ndarray:
    """Read the lung (and heart) masks of one manifest row (absolute paths) as a uint8 label map.

    Masks are combined at their own resolution, then resized by nearest neighbour to
    ``size`` (``None`` keeps it). Returns ``(H, W)`` uint8 with values 0..2 (0..3 with
    ``include_heart``). Raises ``ValueError`` when the row has no usable mask, or no heart
    mask while ``include_heart`` is set.
    """
    layout = mask_layout(row)
    image_id = row.get("image_id", row.get("path"))
    if layout is None:
        raise ValueError(
            f"image {image_id}: no lung mask (need {' + '.join(PER_KIND_COLUMNS)}, or {UNION_COLUMN})"
        )
    if include_heart and not (layout == "per_kind" and has_path(row, HEART_COLUMN)):
        raise ValueError(f"image {image_id}: include_heart=True but the row has no {HEART_COLUMN}")

    def mask(column: str) -> np.ndarray:
        return read_mask(resolve_path(None, str(row[column])))

    if layout == "per_kind":
        heart = mask(HEART_COLUMN) if include_heart else None
        labels = labels_from_masks(mask("mask_lung_left"), mask("mask_lung_right"), heart)
    else:
        labels = split_union_lung_mask(mask(UNION_COLUMN))
    return labels if size is None else resize_mask(labels, size)


def _load_image(row: Mapping[str, Any], size: Size | None) -> np.ndarray:
    image = read_image(resolve_path(None, str(row["path"])))
    return image if size is None else resize_image(image, size)


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W)`` uint8 or float in [0, 1] -> ``(1, H, W)`` float32 tensor in [0, 1]."""
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]


class SegmentationDataset(Dataset):
    """Image + lung label-map pairs for training and evaluating the U-Net.

    Every image and label map is decoded and resized to ``size`` once, in ``__init__``,
    and kept in memory as uint8 (``cache=True``; 256x256 costs 128 KiB per pair), so
    epochs do no file I/O. ``cache=False`` decodes in ``__getitem__`` instead.

    Items are ``(image, labels)``: ``(1, H, W)`` float32 in [0, 1] and ``(H, W)`` int64
    (0..2, or 0..3 with ``include_heart``), ready for ``cross_entropy``.

    ``augment`` draws its randomness from a generator seeded by ``(seed, epoch, index)``,
    so an item is the same whatever the number of DataLoader workers or the order of
    access. Call :meth:`set_epoch` before each epoch to get new draws (with
    ``persistent_workers=True`` the workers keep their own copy, so it would not reach them).

    Rows without a usable mask are rejected in ``__init__`` with an error naming them.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        *,
        size: Size = 256,
        include_heart: bool = False,
        augment: PairedAugment | None = None,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        self.manifest = manifest.reset_index(drop=True)
        self.size = size
        self.include_heart = include_heart
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.image_ids = image_ids_of(manifest)
        self._check_masks()
        self._images: list[np.ndarray] | None = None
        self._labels: list[np.ndarray] | None = None
        if cache:
            pairs = [self._load(index) for index in range(len(self))]
            self._images = [image for image, _ in pairs]
            self._labels = [labels for _, labels in pairs]

    @property
    def num_classes(self) -> int:
        """Number of label values (3, or 4 with the heart): the U-Net's ``num_classes``."""
        return 4 if self.include_heart else 3

    def _check_masks(self) -> None:
        rows = self.manifest.to_dict("records")
        missing = [
            i for i, row in zip(self.image_ids, rows, strict=True) if mask_layout(row) is None
        ]
        if missing:
            raise ValueError(
                f"{len(missing)} image(s) have no lung mask (need {' + '.join(PER_KIND_COLUMNS)}, "
                f"or {UNION_COLUMN}): {listed_ids(missing)}"
            )
        if self.include_heart:
            no_heart = [
                i
                for i, row in zip(self.image_ids, rows, strict=True)
                if not (mask_layout(row) == "per_kind" and has_path(row, HEART_COLUMN))
            ]
            if no_heart:
                raise ValueError(
                    f"include_heart=True but {len(no_heart)} image(s) have no {HEART_COLUMN}: "
                    f"{listed_ids(no_heart)}"
                )

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        row = self.manifest.iloc[index].to_dict()
        row.setdefault("image_id", self.image_ids[index])
        image = _load_image(row, self.size)
        labels = load_label_map(row, self.size, self.include_heart)
        return image, labels

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before iterating)."""
        self.epoch = int(epoch)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The un-augmented ``(image uint8 (H, W), labels uint8 (H, W))`` of item ``index``."""
        if self._images is not None and self._labels is not None:
            return self._images[index], self._labels[index]
        return self._load(index)

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = self.pair(index)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
            image, labels = self.augment(image, labels, rng)
        return _image_tensor(image), torch.from_numpy(labels.astype(np.int64))


class ImageDataset(Dataset):
    """Images of a manifest for inference: items are ``(image (1, H, W) float32 in [0, 1], index)``.

    ``index`` is the row position in ``manifest``, to write predictions back. No mask
    columns are needed. ``cache=True`` keeps the resized uint8 images in memory.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        *,
        size: Size = 256,
        cache: bool = False,
    ) -> None:
        self.manifest = manifest.reset_index(drop=True)
        self.size = size
        self.image_ids = image_ids_of(manifest)
        self._images = [self._load(index) for index in range(len(self))] if cache else None

    def _load(self, index: int) -> np.ndarray:
        return _load_image(self.manifest.iloc[index].to_dict(), self.size)

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self._images[index] if self._images is not None else self._load(index)
        return _image_tensor(image), int(index)
