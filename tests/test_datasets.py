"""SegmentationDataset / ImageDataset on a tiny manifest of ellipse images written to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage.draw import ellipse
from torch.utils.data import DataLoader

from cxrlib.data import manifest as mf
from cxrlib.data.datasets import ImageDataset, SegmentationDataset, load_label_map
from cxrlib.data.transforms import PairedAugment

IMAGE_SIZE = 60


def _ellipse(shape, centre_frac, radii_frac) -> np.ndarray:
    height, width = shape
    mask = np.zeros(shape, dtype=bool)
    rows, cols = ellipse(
        centre_frac[0] * height,
        centre_frac[1] * width,
        radii_frac[0] * height,
        radii_frac[1] * width,
        shape=shape,
    )
    mask[rows, cols] = True
    return mask


def _structures(shape) -> dict[str, np.ndarray]:
    """Patient-left lung on the image right, right lung on the image left, heart in between."""
    return {
        "mask_lung_left": _ellipse(shape, (0.45, 0.7), (0.33, 0.15)),
        "mask_lung_right": _ellipse(shape, (0.45, 0.3), (0.33, 0.15)),
        "mask_heart": _ellipse(shape, (0.65, 0.5), (0.15, 0.12)),
    }


def _save(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return path.name


@pytest.fixture
def manifest(tmp_path: Path) -> pd.DataFrame:
    """Three rows with per-structure masks and one with a 48x48 union mask for a 60x60 image."""
    rows = []
    shape = (IMAGE_SIZE, IMAGE_SIZE)
    for i in range(3):
        masks = _structures(shape)
        image = np.full(shape, 180 - 20 * i, dtype=np.uint8)
        image[masks["mask_lung_left"] | masks["mask_lung_right"]] = 40
        row = {
            "image_id": f"img{i}",
            "path": _save(tmp_path / f"img{i}.png", image),
            "mask_path": "",
        }
        for column, mask in masks.items():
            row[column] = _save(tmp_path / f"img{i}_{column}.png", mask.astype(np.uint8) * 255)
        rows.append(row)
    union_masks = _structures((48, 48))
    union = union_masks["mask_lung_left"] | union_masks["mask_lung_right"]
    rows.append(
        {
            "image_id": "union",
            "path": _save(tmp_path / "union.png", np.full(shape, 90, dtype=np.uint8)),
            "mask_path": _save(tmp_path / "union_mask.png", union.astype(np.uint8) * 255),
            "mask_lung_left": None,
            "mask_lung_right": np.nan,
            "mask_heart": None,
        }
    )
    return mf.absolute_paths(pd.DataFrame(rows), tmp_path)


def test_items_shapes_dtypes_and_labels(manifest):
    dataset = SegmentationDataset(manifest, size=32)
    assert len(dataset) == 4 and dataset.num_classes == 3
    image, labels = dataset[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert labels.shape == (32, 32) and labels.dtype == torch.int64
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(labels.unique().tolist()) == {0, 1, 2}
    # the union row: left / right recovered by connected components, on the 32 px grid
    _, union_labels = dataset[3]
    columns = np.arange(32)[None, :].repeat(32, 0)
    assert (
        columns[union_labels.numpy() == 1].mean() > 16 > columns[union_labels.numpy() == 2].mean()
    )
    # the union labels agree with the per-structure labels of the same geometry
    agreement = (union_labels == labels).float().mean().item()
    assert agreement > 0.95
    # lungs are dark in the images: image and labels are aligned
    assert image[0][labels > 0].mean() < image[0][labels == 0].mean()


def test_heart_and_errors_name_the_images(manifest):
    with_heart = SegmentationDataset(manifest.iloc[:3], size=32, include_heart=True)
    assert with_heart.num_classes == 4
    assert set(with_heart[1][1].unique().tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="union"):
        SegmentationDataset(manifest, size=32, include_heart=True)
    no_masks = manifest.copy()
    no_masks.loc[[1, 3], ["mask_lung_left", "mask_lung_right", "mask_path"]] = ""
    with pytest.raises(ValueError, match=r"2 image\(s\).*img1, union"):
        SegmentationDataset(no_masks, size=32)


def test_relative_paths_are_refused_and_load_label_map(manifest, tmp_path):
    relative = manifest.assign(path=[Path(value).name for value in manifest["path"]])
    with pytest.raises(ValueError, match="absolute in memory"):
        SegmentationDataset(relative, size=32)[2]
    row = manifest.iloc[3].to_dict()
    native = load_label_map(row, size=None)
    assert native.shape == (48, 48) and native.dtype == np.uint8
    assert load_label_map(row, size=(20, 30)).shape == (20, 30)


def test_cache_matches_lazy_loading(manifest):
    cached = SegmentationDataset(manifest, size=32, cache=True)
    lazy = SegmentationDataset(manifest, size=32, cache=False)
    for index in range(len(cached)):
        assert all(torch.equal(a, b) for a, b in zip(cached[index], lazy[index], strict=True))


def test_augmentation_is_reproducible_across_workers_and_epochs(manifest):
    dataset = SegmentationDataset(manifest, size=32, augment=PairedAugment(), seed=7)
    first = dataset[1]
    assert all(torch.equal(a, b) for a, b in zip(first, dataset[1], strict=True))
    plain = SegmentationDataset(manifest, size=32)
    assert not torch.equal(first[0], plain[1][0])

    def epoch_batches(num_workers: int) -> list[torch.Tensor]:
        loader = DataLoader(dataset, batch_size=2, num_workers=num_workers)
        return [images for images, _ in loader]

    in_process, two_workers = epoch_batches(0), epoch_batches(2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, two_workers, strict=True))
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1][0], first[0])
    dataset.set_epoch(0)
    assert torch.equal(dataset[1][0], first[0])


def test_image_dataset_needs_no_masks(manifest):
    images_only = manifest[["image_id", "path"]].copy()
    dataset = ImageDataset(images_only, size=(24, 40))
    image, index = dataset[3]
    assert image.shape == (1, 24, 40) and image.dtype == torch.float32 and index == 3
    assert image.max() == pytest.approx(90 / 255)
    assert [i for _, i in ImageDataset(images_only, size=16, cache=True)] == [0, 1, 2, 3]
