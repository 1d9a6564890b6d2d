"""Classification datasets: what part of the chest X-ray a classifier gets to see.

:class:`ClassificationDataset` reads manifest rows (``path``, ``label``) and gives
``(image, label)`` items for one of five input modes:

- ``"whole"``: the whole image, resized (Zunair & Hamza 2021, Minaee et al. 2020);
- ``"lung_masked"``: everything outside the lungs set to 0;
- ``"lung_crop"``: the lungs' bounding box (plus a margin), resized;
- ``"lungs_removed"``: the lungs themselves set to 0 - a shortcut control: a classifier
  that still separates the classes without lungs reads text, devices or source borders;
- ``"patch"``: random square patches centred on lung pixels (Oh, Park & Ye 2020), through
  :class:`~cxrlib.data.masks.LungPatchSampler`; at test time K patches per image are
  classified and aggregated (:meth:`ClassificationDataset.patches`,
  :func:`cxrlib.train.classifier.predict_patches`).

Lung masks come from the segmentation stage (notebook 02): images it already cropped or
masked (columns ``path_lung_crop`` / ``path_lung_masked``) are read as they are; otherwise
the predicted lung mask (column ``mask_pred_lung``, or ``pred_lung_mask``) is applied with
:func:`~cxrlib.data.masks.mask_lungs` / :func:`~cxrlib.data.masks.crop_to_lungs`.
``mask_column="ground_truth"`` uses the manifest's reference masks instead (phantom data).

Every image is decoded, transformed and resized once, in ``__init__``, into a uint8
array in memory (224x224 costs 49 KiB per image; patch mode keeps the image at
``source_size``, 256 KiB at 512 and 1 MiB at Oh et al.'s 1024, plus a bit-packed lung
mask); epochs only augment.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from cxrlib.data.datasets import (
    has_path,
    image_ids_of,
    listed_ids,
    load_label_map,
    mask_layout,
)
from cxrlib.data.io import read_image, read_mask
from cxrlib.data.manifest import resolve_path
from cxrlib.data.masks import LungPatchSampler, crop_to_lungs, lung_mask_from_labels, mask_lungs
from cxrlib.data.transforms import PairedAugment, resize_image, resize_mask

InputMode = Literal["whole", "lung_masked", "lung_crop", "lungs_removed", "patch"]
INPUT_MODES: tuple[str, ...] = ("whole", "lung_masked", "lung_crop", "lungs_removed", "patch")
#: Columns written by the segmentation stage with ready-made images for two modes.
PRECOMPUTED_COLUMNS: dict[str, str] = {"lung_masked": "path_lung_masked", "lung_crop": "path_lung_crop"}
#: Predicted lung-mask columns, in the order they are looked for.
PRED_MASK_COLUMNS: tuple[str, ...] = ("mask_pred_lung", "pred_lung_mask")
#: ``mask_column`` value that selects the manifest's reference masks (``mask_path`` / per-lung).
GROUND_TRUTH = "ground_truth"

#: Augmentation presets: ``"light"`` (flip, +-10 deg, +-10 % zoom, +-5 % shift, mild
#: intensity) and ``"heavy"`` (Minaee et al.-style: stronger geometry and intensity).
AUGMENT_PRESETS: dict[str, PairedAugment | None] = {
    "none": None,
    "light": PairedAugment(swap_lr_labels=None),
    "heavy": PairedAugment(hflip_p=0.5, rotate_deg=15.0, scale=(0.85, 1.15), translate=0.1,
                           brightness=0.25, contrast=0.25, gamma=(0.7, 1.4), swap_lr_labels=None),
}


def make_augment(augment: str | bool | PairedAugment | None) -> PairedAugment | None:
    """An augmentation from a preset name (``"none"``, ``"light"``, ``"heavy"``), a bool or itself."""
    if augment is None or augment is False:
        return None
    if augment is True:
        return AUGMENT_PRESETS["light"]
    if isinstance(augment, PairedAugment):
        return augment
    if augment not in AUGMENT_PRESETS:
        raise ValueError(f"augment must be one of {sorted(AUGMENT_PRESETS)} or a PairedAugment, got {augment!r}")
    return AUGMENT_PRESETS[augment]


def make_label_map(classes: Sequence[str]) -> dict[str, int]:
    """``["Normal", "COVID-19"]`` -> ``{"Normal": 0, "COVID-19": 1}`` (binary: index 1 is positive)."""
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes repeat: {list(classes)}")
    return {str(name): index for index, name in enumerate(classes)}


class ClassificationDataset(Dataset):
    """Manifest images as ``(image, label)`` for a classifier, decoded once into memory.

    ``manifest``: rows with ``path`` and ``label`` (and the mask columns a mode needs),
    paths absolute (as every manifest holds them in memory). ``label_map``: class
    name -> index; rows with other labels raise, or get label ``-1`` with
    ``strict_labels=False`` (for prediction on unlabelled rows).

    Items: ``image`` ``(1, image_size, image_size)`` float32 in [0, 1] (the classifier
    standardises it itself) and ``label`` int. ``input_mode``: see the module docstring.
    ``augment``: preset name or :class:`~cxrlib.data.transforms.PairedAugment`, drawn from
    a generator seeded by ``(seed, epoch, index)`` (the same item whatever the worker count;
    :meth:`set_epoch` gives new draws). In ``"patch"`` mode each item is one random patch
    (side from ``patch_sampler``, cut from the image cached at ``source_size``) resized to
    ``image_size``; :meth:`patches` gives K of them for test-time voting.

    ``mask_column``: column with the lung mask files (default: the first of
    :data:`PRED_MASK_COLUMNS` present) or ``"ground_truth"``; ``use_precomputed``: read
    ``path_lung_masked`` / ``path_lung_crop`` where a row has them. ``crop_margin``: lung
    box margin as a fraction of the image side. ``cache=False`` decodes in ``__getitem__``.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        *,
        image_size: int = 224,
        label_map: Mapping[str, int],
        input_mode: InputMode = "whole",
        augment: str | bool | PairedAugment | None = None,
        seed: int = 0,
        cache: bool = True,
        mask_column: str | None = None,
        use_precomputed: bool = True,
        crop_margin: float = 0.05,
        patch_sampler: LungPatchSampler | None = None,
        source_size: int = 512,
        strict_labels: bool = True,
        progress: bool = False,
    ) -> None:
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
        self.manifest = manifest.reset_index(drop=True)
        self.image_size = int(image_size)
        self.label_map = {str(k): int(v) for k, v in label_map.items()}
        self.input_mode = input_mode
        self.augment = make_augment(augment)
        self.seed = int(seed)
        self.epoch = 0
        self.use_precomputed = use_precomputed
        self.crop_margin = float(crop_margin)
        self.patch_sampler = patch_sampler or LungPatchSampler()
        self.source_size = int(source_size)
        self.image_ids = image_ids_of(self.manifest)
        self.labels = self._labels(strict_labels)
        self.mask_column = self._mask_column(mask_column)
        self._check_inputs()
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None
        if cache:
            self._fill_cache(progress)

    # ------------------------------------------------------------------ setup

    def _labels(self, strict: bool) -> np.ndarray:
        if "label" not in self.manifest.columns:
            if strict:
                raise ValueError("the manifest has no 'label' column (pass strict_labels=False to predict)")
            return np.full(len(self.manifest), -1, dtype=np.int64)
        names = self.manifest["label"].astype(str)
        unknown = sorted(set(names) - set(self.label_map))
        if unknown and strict:
            raise ValueError(f"labels {unknown} are not in label_map {self.label_map}; filter the rows "
                             "or extend the map")
        return np.array([self.label_map.get(name, -1) for name in names], dtype=np.int64)

    def _needs_mask(self, row: Mapping[str, Any]) -> bool:
        if self.input_mode == "whole":
            return False
        column = PRECOMPUTED_COLUMNS.get(self.input_mode)
        return not (column and self.use_precomputed and has_path(row, column))

    def _mask_column(self, requested: str | None) -> str | None:
        rows = self.manifest.to_dict("records")
        if not any(self._needs_mask(row) for row in rows):
            return requested
        if requested is not None:
            if requested != GROUND_TRUTH and requested not in self.manifest.columns:
                raise ValueError(f"mask_column {requested!r} is not a manifest column")
            return requested
        for column in PRED_MASK_COLUMNS:
            if column in self.manifest.columns:
                return column
        written = [repr(PRED_MASK_COLUMNS[0])]
        if self.input_mode in PRECOMPUTED_COLUMNS:
            written.append(repr(PRECOMPUTED_COLUMNS[self.input_mode]))
        raise ValueError(
            f"input_mode {self.input_mode!r} needs lung masks: run the segmentation stage (it adds "
            f"{' and '.join(written)}), or pass mask_column='{GROUND_TRUTH}' to use the manifest's "
            "reference masks"
        )

    def _check_inputs(self) -> None:
        missing = []
        for image_id, row in zip(self.image_ids, self.manifest.to_dict("records"), strict=True):
            if not self._needs_mask(row):
                continue
            has_mask = (mask_layout(row) is not None if self.mask_column == GROUND_TRUTH
                        else has_path(row, str(self.mask_column)))
            if not has_mask:
                missing.append(image_id)
        if missing:
            raise ValueError(f"input_mode {self.input_mode!r}: {len(missing)} image(s) have no lung mask in "
                             f"{self.mask_column!r}: {listed_ids(missing)}")

    def _fill_cache(self, progress: bool) -> None:
        indices: Iterator[int] | range = range(len(self))
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc="decoding images", unit="img")
        side = self.source_size if self.input_mode == "patch" else self.image_size
        self._images = np.empty((len(self), side, side), dtype=np.uint8)
        if self.input_mode == "patch":
            # Lung masks bit-packed along rows: 1/8 of a byte per pixel.
            self._masks = np.empty((len(self), side, (side + 7) // 8), dtype=np.uint8)
        for index in indices:
            image, mask = self._load(index)
            self._images[index] = image
            if self._masks is not None:
                self._masks[index] = np.packbits(mask, axis=-1)
        if self._masks is not None:
            empty = [self.image_ids[i] for i in range(len(self)) if not self._masks[i].any()]
            if empty:
                warnings.warn(f"{len(empty)} image(s) have an empty lung mask; their patches are drawn from the "
                              f"whole image: {listed_ids(empty)}", stacklevel=3)

    # ------------------------------------------------------------------ decoding

    def _row(self, index: int) -> dict[str, Any]:
        row = self.manifest.iloc[index].to_dict()
        row.setdefault("image_id", self.image_ids[index])
        return row

    def _read(self, row: Mapping[str, Any], column: str) -> np.ndarray:
        return read_image(resolve_path(None, str(row[column])))

    def _lung_mask(self, row: Mapping[str, Any], shape: tuple[int, int]) -> np.ndarray:
        """The row's lung mask as ``(H, W)`` bool on the grid ``shape`` (nearest neighbour)."""
        if self.mask_column == GROUND_TRUTH:
            mask = lung_mask_from_labels(load_label_map(row, size=None))
        else:
            mask = read_mask(resolve_path(None, str(row[self.mask_column])))
        return resize_mask(mask, shape) if mask.shape != shape else mask

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(image uint8 (S, S), lung mask bool (S, S) in patch mode else None)`` of row ``index``."""
        row = self._row(index)
        mode = self.input_mode
        if not self._needs_mask(row):
            column = PRECOMPUTED_COLUMNS[mode] if mode in PRECOMPUTED_COLUMNS else "path"
            return resize_image(self._read(row, column), self.image_size), None
        image = self._read(row, "path")
        mask = self._lung_mask(row, image.shape)
        if mode == "patch":
            size = self.source_size
            return resize_image(image, size), resize_mask(mask, size)
        if mode == "lung_crop":
            return crop_to_lungs(image, mask, self.image_size, margin=self.crop_margin), None
        inside = "inside" if mode == "lung_masked" else "outside"
        return resize_image(mask_lungs(image, mask, mode=inside), self.image_size), None

    def stored(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The un-augmented cached ``(image uint8 (S, S), lung mask bool or None)`` of item ``index``.

        ``S`` is ``image_size``, or ``source_size`` in patch mode (the mask is given only there).
        """
        if self._images is not None:
            if self._masks is None:
                return self._images[index], None
            side = self._images.shape[-1]
            return self._images[index], np.unpackbits(self._masks[index], axis=-1, count=side).astype(bool)
        return self._load(index)

    # ------------------------------------------------------------------ items

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation (and patch) draws of ``epoch``; call before iterating."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.manifest)

    def _finish(self, image: np.ndarray, rng: np.random.Generator | None) -> torch.Tensor:
        """uint8 ``(S, S)`` -> (augmented) float32 ``(1, S, S)`` in [0, 1]."""
        if self.augment is not None and rng is not None:
            image, _ = self.augment(image, None, rng)  # no label map to move along
            return torch.from_numpy(np.ascontiguousarray(image))[None]
        return torch.from_numpy(image.astype(np.float32) * (1.0 / 255.0))[None]

    def _sample_patches(self, index: int, k: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
        image, mask = self.stored(index)
        if not mask.any():
            mask = np.ones_like(mask)
        patches, centres = self.patch_sampler.sample(image, mask, k, rng)
        resized = [resize_image(patch, self.image_size) for patch in patches]
        return resized, centres

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        if self.input_mode == "patch":
            patches, _ = self._sample_patches(index, 1, rng)
            image = patches[0]
        else:
            image, _ = self.stored(index)
        return self._finish(image, rng if self.augment is not None else None), int(self.labels[index])

    def patches(self, index: int, k: int, seed: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """``k`` lung-centred patches of image ``index`` for test-time voting (never augmented).

        Returns ``patches`` ``(k, 1, image_size, image_size)`` float32 in [0, 1] and
        ``centres`` ``(k, 2)`` int64 ``(row, col)`` on the ``source_size`` grid (for
        :meth:`~cxrlib.data.masks.LungPatchSampler.paste_back`). The draw depends only on
        ``(seed, index)`` (default seed: the dataset's).
        """
        if self.input_mode != "patch":
            raise ValueError(f"patches() needs input_mode='patch', this dataset is {self.input_mode!r}")
        rng = np.random.default_rng([self.seed if seed is None else int(seed), 2**31, int(index)])
        patches, centres = self._sample_patches(index, k, rng)
        stack = np.stack(patches).astype(np.float32) * (1.0 / 255.0)
        return torch.from_numpy(stack)[:, None], centres

    def class_counts(self, num_classes: int | None = None) -> np.ndarray:
        """Images per class index ``(C,)`` int64 (labels ``-1`` not counted)."""
        num_classes = num_classes or (max(self.label_map.values()) + 1)
        return np.bincount(self.labels[self.labels >= 0], minlength=num_classes)


class PatchStack(Dataset):
    """Items ``(patches (k, 1, S, S) float32 in [0, 1], label int, index int)`` of a patch dataset.

    Wraps a ``ClassificationDataset`` in patch mode for evaluation: each item holds ``k``
    fixed (seeded) patches of one image, to be classified and aggregated.
    """

    def __init__(self, dataset: ClassificationDataset, k: int, seed: int | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.dataset, self.k, self.seed = dataset, int(k), seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        patches, _ = self.dataset.patches(index, self.k, self.seed)
        return patches, int(self.dataset.labels[index]), int(index)


class BalancedClassSampler(Sampler[int]):
    """Indices drawn with replacement so that every class is equally likely; DDP-ready.

    Each epoch draws ``num_samples`` indices (default: the dataset length, rounded up to a
    multiple of ``num_replicas``) with probability proportional to ``1 / count(class)``,
    from a generator seeded by ``(seed, epoch)`` - the same draw on every rank - and
    rank ``r`` keeps draws ``r, r + num_replicas, ...``. So one process sees balanced
    batches, and under DDP the ranks together see one balanced epoch without overlap.
    This is minority oversampling (Minaee et al. 2020) as a sampler. ``labels``:
    ``(N,)`` int class indices (negative ones are never drawn).
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, num_samples: int | None = None) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        valid = labels >= 0
        if not valid.any():
            raise ValueError("no labelled sample to draw from")
        counts = np.bincount(labels[valid])
        weights = np.zeros(len(labels), dtype=np.float64)
        weights[valid] = 1.0 / counts[labels[valid]]
        self.weights = torch.from_numpy(weights)
        self.num_replicas, self.rank, self.seed = int(num_replicas), int(rank), int(seed)
        total = int(num_samples) if num_samples is not None else len(labels)
        self.total = int(math.ceil(total / self.num_replicas) * self.num_replicas)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        draws = torch.multinomial(self.weights, self.total, replacement=True, generator=generator)
        return iter(draws[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.total // self.num_replicas


def evaluation_view(dataset: ClassificationDataset) -> ClassificationDataset:
    """A shallow copy of ``dataset`` that shares its image cache but never augments (for prediction)."""
    if dataset.augment is None:
        return dataset
    view = object.__new__(type(dataset))
    view.__dict__.update(dataset.__dict__)
    view.augment = None
    return view


__all__ = [
    "AUGMENT_PRESETS", "BalancedClassSampler", "ClassificationDataset", "GROUND_TRUTH", "INPUT_MODES",
    "PRECOMPUTED_COLUMNS", "PRED_MASK_COLUMNS", "PatchStack", "evaluation_view", "make_augment",
    "make_label_map",
]
