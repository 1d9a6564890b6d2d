"""Resizing to a common grid and paired image + label augmentation."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import ellipse

from cxrlib.data.transforms import (
    PairedAugment,
    resize_image,
    resize_mask,
    swap_labels,
    to_common_grid,
)


def _lungs(height: int = 80, width: int = 96) -> np.ndarray:
    """Label map: 1 on the image right, 2 on the image left, 3 (heart) between them."""
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[ellipse(height * 0.5, width * 0.5, height * 0.2, width * 0.12, shape=labels.shape)] = 3
    labels[
        ellipse(height * 0.45, width * 0.72, height * 0.35, width * 0.14, shape=labels.shape)
    ] = 1
    labels[
        ellipse(height * 0.45, width * 0.28, height * 0.35, width * 0.14, shape=labels.shape)
    ] = 2
    return labels


@pytest.mark.parametrize("size", [32, (45, 61), (200, 150)])
def test_resize_mask_keeps_only_existing_labels(size):
    labels = _lungs()
    labels[labels == 3] = 7  # a value that interpolation could never produce by averaging 1 and 2
    resized = resize_mask(labels, size)
    expected_shape = (size, size) if isinstance(size, int) else size
    assert resized.shape == expected_shape and resized.dtype == np.uint8
    assert set(np.unique(resized)) <= set(np.unique(labels))
    assert set(np.unique(resized)) == {0, 1, 2, 7}


def test_resize_mask_bool_and_alignment():
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:48, 8:24] = True
    resized = resize_mask(mask, 128)
    assert resized.dtype == np.bool_
    # exact nearest neighbour: a 2x upscale maps the block to exactly twice its coordinates
    expected = np.zeros((128, 128), dtype=bool)
    expected[32:96, 16:48] = True
    np.testing.assert_array_equal(resized, expected)
    with pytest.raises(TypeError):
        resize_mask(mask.astype(np.float32), 32)


def test_resize_image_dtype_and_range():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (299, 299), dtype=np.uint8)
    small = resize_image(image, 256)
    assert small.shape == (256, 256) and small.dtype == np.uint8
    as_float = resize_image(image.astype(np.float32) / 255, (100, 120))
    assert as_float.dtype == np.float32 and as_float.shape == (100, 120)
    assert 0.0 <= as_float.min() and as_float.max() <= 1.0
    constant = np.full((50, 70), 200, dtype=np.uint8)
    assert (resize_image(constant, 33) == 200).all()
    with pytest.raises(ValueError):
        resize_image(np.zeros((4, 4, 3), dtype=np.uint8), 2)


def test_to_common_grid_mask_of_another_size():
    image = np.full((299, 299), 100, dtype=np.uint8)
    lungs = _lungs(256, 256) > 0
    out_image, out_mask = to_common_grid(image, lungs, 64)
    assert out_image.shape == out_mask.shape == (64, 64)
    _, out_masks = to_common_grid(image, {"lung": lungs, "labels": _lungs(128, 128)}, (32, 48))
    assert {name: m.shape for name, m in out_masks.items()} == {
        "lung": (32, 48),
        "labels": (32, 48),
    }
    assert out_masks["lung"].dtype == np.bool_


GEOMETRY_ONLY = {"brightness": 0.0, "contrast": 0.0, "gamma": (1.0, 1.0)}


@pytest.mark.parametrize("seed", range(5))
def test_augment_keeps_image_and_labels_aligned(seed):
    labels = _lungs()
    image = (labels > 0).astype(np.uint8) * 255
    augment = PairedAugment(rotate_deg=20, scale=(0.8, 1.2), translate=0.1, **GEOMETRY_ONLY)
    out_image, out_labels = augment(image, labels, np.random.default_rng(seed))
    assert out_image.dtype == np.float32 and out_labels.dtype == np.uint8
    assert out_image.shape == out_labels.shape == labels.shape
    # bilinear vs nearest interpolation may only disagree along the boundary
    agreement = ((out_image > 0.5) == (out_labels > 0)).mean()
    assert agreement > 0.98
    assert set(np.unique(out_labels)) <= {0, 1, 2, 3}


def test_flip_swaps_left_and_right_labels():
    labels = _lungs()
    image = np.tile(np.arange(labels.shape[1], dtype=np.uint8), (labels.shape[0], 1))
    flip_only = PairedAugment.identity()
    flip_only.hflip_p = 1.0
    out_image, out_labels = flip_only(image, labels, np.random.default_rng(0))
    np.testing.assert_allclose(out_image, image[:, ::-1] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(out_labels, swap_labels(labels[:, ::-1], (1, 2)))
    # label 1 is still the lung on the image right, and the heart keeps its label
    columns_of_1 = np.nonzero(out_labels == 1)[1]
    assert columns_of_1.mean() > labels.shape[1] / 2
    assert (out_labels == 3).sum() == (labels == 3).sum()

    flip_only.swap_lr_labels = None
    _, unswapped = flip_only(image, labels, np.random.default_rng(0))
    np.testing.assert_array_equal(unswapped, labels[:, ::-1])


def test_augment_is_deterministic_for_a_seeded_rng():
    labels = _lungs()
    image = np.random.default_rng(1).integers(0, 256, labels.shape, dtype=np.uint8)
    augment = PairedAugment()
    first = augment(image, labels, np.random.default_rng(42))
    second = augment(image, labels, np.random.default_rng(42))
    other = augment(image, labels, np.random.default_rng(43))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other[0])


def test_intensity_changes_touch_the_image_only():
    labels = _lungs()
    image = np.random.default_rng(2).integers(0, 256, labels.shape, dtype=np.uint8)
    intensity_only = PairedAugment(hflip_p=0.0, rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0)
    out_image, out_labels = intensity_only(image, labels, np.random.default_rng(3))
    np.testing.assert_array_equal(out_labels, labels)
    assert not np.allclose(out_image, image / 255.0)
    assert 0.0 <= out_image.min() and out_image.max() <= 1.0


def test_zero_magnitudes_are_a_no_op():
    labels = _lungs()
    image = np.random.default_rng(4).integers(0, 256, labels.shape, dtype=np.uint8)
    out_image, out_labels = PairedAugment.identity()(image, labels, np.random.default_rng(5))
    np.testing.assert_array_equal(out_image, image.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(out_labels, labels)
    with pytest.raises(ValueError):
        PairedAugment()(image, labels[:-1], np.random.default_rng(0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_image_alone_is_augmented_as_with_labels(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    augment = PairedAugment(hflip_p=0.5, rotate_deg=15.0, scale=(0.85, 1.15), translate=0.1)
    with_labels, _ = augment(image, np.zeros_like(image), np.random.default_rng(seed))
    alone, labels = augment(image, None, np.random.default_rng(seed))
    assert labels is None and np.array_equal(alone, with_labels)
