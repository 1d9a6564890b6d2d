"""Images held in memory: manifest rows loaded once into uint8 arrays, and Datasets over them.

The generators and their judges work on whole image sets at one side (the CycleGAN's
training side), so each set is decoded and resized once:

- :func:`real_rows` picks the real rows of a split (and labels); :func:`load_images` /
  :func:`load_masks` read them as ``(N, S, S)`` uint8 images / bool masks;
- :class:`DomainImageDataset`: one domain's images for a generator, items ``(1, S, S)``
  float32 in [-1, 1] (:func:`to_signed_unit`; :func:`to_uint8` goes back);
- :class:`UnpairedImageDataset`: pairs of one domain-A and one domain-B image, re-drawn every
  epoch from ``(seed, epoch)``;
- :class:`ArrayDataset`: labelled uint8 images for a classifier, items ``((1, S, S)`` float32
  in [0, 1], label)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from cxrlib.data import manifest as mf
from cxrlib.data.io import read_image, read_mask
from cxrlib.data.manifest import resolve_path
from cxrlib.data.transforms import resize_image, resize_mask

# ----------------------------------------------------------------------------- rows and arrays


def real_rows(manifest: pd.DataFrame, split: str | Sequence[str], labels: Sequence[str] | None = None, *,
              label_column: str = "label") -> pd.DataFrame:
    """Real (``origin`` ``"real"`` or empty) rows of ``split`` (one name or several), optionally
    only those whose ``label_column`` is one of ``labels``."""
    splits = [split] if isinstance(split, str) else list(split)
    keep = manifest["split"].astype(str).isin(splits)
    if "origin" in manifest.columns:
        keep &= manifest["origin"].astype(str).isin([mf.REAL, ""])
    if labels is not None:
        keep &= manifest[label_column].astype(str).isin(list(labels))
    return manifest[keep]


def load_images(rows: pd.DataFrame, image_size: int) -> np.ndarray:
    """Images of manifest rows as ``(N, image_size, image_size)`` uint8, resized as the CycleGAN's inputs."""
    if len(rows) == 0:
        return np.zeros((0, image_size, image_size), dtype=np.uint8)
    return DomainImageDataset(rows, image_size=image_size).images.numpy()


def load_masks(rows: pd.DataFrame, columns: Sequence[str], image_size: int) -> np.ndarray:
    """Union of the mask files in ``columns`` per row: ``(N, image_size, image_size)`` bool.

    An empty cell adds nothing (e.g. a normal image's lesion mask)."""
    masks = np.zeros((len(rows), image_size, image_size), dtype=bool)
    for slot, (_, row) in enumerate(rows.iterrows()):
        for column in columns:
            value = str(row.get(column, "") or "")
            if value:
                masks[slot] |= resize_mask(read_mask(resolve_path(rows, value)), image_size).astype(bool)
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


# ----------------------------------------------------------------------------- datasets for the generators


def to_signed_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1] (any shape)."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] -> uint8 0..255, rounded and clipped (any shape)."""
    return images.detach().float().add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def first_image(item: Any) -> torch.Tensor:
    """A dataset item or its first element (datasets may yield ``(image, index)`` or ``(image, label)``)."""
    return item[0] if isinstance(item, list | tuple) else item


class DomainImageDataset(Dataset):
    """The images of one domain, decoded and resized once: items ``(1, H, W)`` float32 in [-1, 1].

    ``images``: manifest rows (absolute ``path``, as in every manifest in memory), or a uint8 array ``(N, H, W)`` already at the wanted size. Every file
    is read (:func:`cxrlib.data.io.read_image`: any bit depth, colour or EXIF rotation ->
    8-bit grey) and resized to ``image_size`` x ``image_size`` in ``__init__``; the cache is
    one uint8 tensor ``(N, H, W)`` (64 KiB per image at 256x256), so epochs do no file I/O.
    """

    def __init__(self, images: pd.DataFrame | np.ndarray | torch.Tensor, *, image_size: int = 256) -> None:
        if isinstance(images, pd.DataFrame):
            self.image_ids = ([str(v) for v in images["image_id"]] if "image_id" in images.columns
                              else [str(v) for v in images.index])
            cache = torch.empty((len(images), image_size, image_size), dtype=torch.uint8)
            for slot, relative in enumerate(images["path"]):
                cache[slot] = torch.from_numpy(resize_image(read_image(resolve_path(images, str(relative))),
                                                            image_size))
        else:
            cache = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
            if cache.dtype != torch.uint8 or cache.ndim != 3:
                raise ValueError(f"images must be a manifest or a uint8 (N, H, W) array, got "
                                 f"{cache.dtype} {tuple(cache.shape)}")
            self.image_ids = [str(i) for i in range(len(cache))]
        self.images = cache.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_signed_unit(self.images[index][None])


class UnpairedImageDataset(Dataset):
    """Pairs of one domain-A and one domain-B image that have nothing to do with each other.

    ``domain_a`` / ``domain_b``: Datasets whose items are ``(1, H, W)`` float32 images in
    [-1, 1] (or tuples that start with one), e.g. :class:`DomainImageDataset`. An epoch has
    ``max(len(a), len(b))`` items; each domain is walked through its own random
    permutation (the smaller one through several), so the pairing changes every epoch.
    Flips (``hflip``) are drawn per image. All draws come from ``(seed, epoch)`` through
    :meth:`set_epoch`, so they do not depend on workers, ranks or the order of access.
    Items: ``(image_a, image_b)``.
    """

    def __init__(self, domain_a: Dataset, domain_b: Dataset, *, seed: int = 0, hflip: bool = True) -> None:
        if len(domain_a) == 0 or len(domain_b) == 0:
            raise ValueError(f"both domains need images, got {len(domain_a)} and {len(domain_b)}")
        self.domain_a, self.domain_b = domain_a, domain_b
        self.seed, self.hflip = int(seed), hflip
        self.set_epoch(0)

    def __len__(self) -> int:
        return max(len(self.domain_a), len(self.domain_b))

    def set_epoch(self, epoch: int) -> None:
        """Draw the pairing and flips of ``epoch``."""
        self.epoch = int(epoch)
        rng = np.random.default_rng([self.seed, self.epoch])
        length = len(self)

        def order(size: int) -> np.ndarray:
            rounds = -(-length // size)
            return np.concatenate([rng.permutation(size) for _ in range(rounds)])[:length]

        self.order_a, self.order_b = order(len(self.domain_a)), order(len(self.domain_b))
        self.flip_a = rng.random(length) < 0.5 if self.hflip else np.zeros(length, bool)
        self.flip_b = rng.random(length) < 0.5 if self.hflip else np.zeros(length, bool)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_a = first_image(self.domain_a[int(self.order_a[index])])
        image_b = first_image(self.domain_b[int(self.order_b[index])])
        if self.flip_a[index]:
            image_a = image_a.flip(-1)
        if self.flip_b[index]:
            image_b = image_b.flip(-1)
        return image_a, image_b
