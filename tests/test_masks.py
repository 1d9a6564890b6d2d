"""Label maps from masks, union-mask splitting, post-processing, cropping and lung patches."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import ellipse

from cxrlib.data.masks import (
    LungPatchSampler,
    crop_to_lungs,
    labels_from_masks,
    lung_bbox,
    lung_mask_from_labels,
    mask_lungs,
    postprocess_labels,
    split_union_lung_mask,
)
from cxrlib.evaluate.segmentation import dice


def _ellipse_mask(shape, centre, radii) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[ellipse(*centre, *radii, shape=shape)] = True
    return mask


def _two_lungs(shape=(100, 120)) -> tuple[np.ndarray, np.ndarray]:
    """(patient-left lung = image right, patient-right lung = image left) bool masks."""
    height, width = shape
    left = _ellipse_mask(shape, (height // 2, int(width * 0.72)), (height * 0.35, width * 0.14))
    right = _ellipse_mask(shape, (height // 2, int(width * 0.28)), (height * 0.35, width * 0.14))
    return left, right


def test_labels_from_masks_values_and_overlap():
    left, right = _two_lungs()
    heart = _ellipse_mask(left.shape, (60, 60), (20, 30))  # overlaps both lungs
    labels = labels_from_masks(left.astype(np.uint8) * 255, right, heart)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2, 3}
    assert (labels[left] == 1).all() and (labels[right] == 2).all()  # lungs win over heart
    assert (labels[heart & ~left & ~right] == 3).all()
    assert set(np.unique(labels_from_masks(left, right))) == {0, 1, 2}
    with pytest.raises(ValueError, match="shape"):
        labels_from_masks(left, right[:-1])
    np.testing.assert_array_equal(lung_mask_from_labels(labels), left | right)


def test_split_union_mask_two_blobs():
    left, right = _two_lungs()
    split = split_union_lung_mask((left | right).astype(np.uint8) * 255)
    np.testing.assert_array_equal(split, labels_from_masks(left, right))


def test_split_union_mask_touching_lungs_are_cut_at_the_midline():
    left, right = _two_lungs()
    union = left | right
    union[70:74, 20:100] = True  # a bridge joins both lungs into one component
    split = split_union_lung_mask(union)
    assert set(np.unique(split)) == {0, 1, 2}
    assert (split[left] == 1).all() and (split[right] == 2).all()
    assert not split_union_lung_mask(np.zeros((8, 8), dtype=bool)).any()


def test_postprocess_removes_island_fills_hole_and_improves_dice():
    left, right = _two_lungs()
    truth = labels_from_masks(left, right)
    corrupted = truth.copy()
    corrupted[5:10, 5:10] = 1  # a small island of "left lung" in the image's left corner
    corrupted[45:52, 30:37] = 0  # a hole inside the right lung
    corrupted[30:33, 85:88] = 2  # a speck of the wrong lung inside the left lung
    cleaned = postprocess_labels(corrupted)
    np.testing.assert_array_equal(cleaned, truth)
    for value in (1, 2):
        assert dice(cleaned == value, truth == value) > dice(corrupted == value, truth == value)
    heart = truth.copy()
    heart[90:95, 50:60] = 3  # non-lung labels are left alone
    assert (postprocess_labels(heart)[90:95, 50:60] == 3).all()


def test_lung_bbox_crop_and_mask():
    mask = np.zeros((100, 200), dtype=bool)
    mask[20:60, 50:150] = True
    assert lung_bbox(mask, margin=0.0) == (20, 60, 50, 150)
    assert lung_bbox(mask, margin=0.1) == (10, 70, 30, 170)
    assert lung_bbox(mask, margin=0.5) == (0, 100, 0, 200)  # clipped to the image
    assert lung_bbox(np.zeros((10, 12), dtype=bool)) == (0, 10, 0, 12)

    image = np.arange(100 * 200, dtype=np.float32).reshape(100, 200)
    assert crop_to_lungs(image, mask, margin=0.0).shape == (40, 100)
    assert crop_to_lungs(image, mask, size=64).shape == (64, 64)

    inside = mask_lungs(image, mask, "inside", fill=-1)
    outside = mask_lungs(image, mask, "outside")
    np.testing.assert_array_equal(inside[mask], image[mask])
    assert (inside[~mask] == -1).all() and (outside[mask] == 0).all()
    np.testing.assert_array_equal(outside[~mask], image[~mask])
    with pytest.raises(ValueError, match="resize_mask"):
        mask_lungs(image, mask[:50])


def test_patch_size_scales_with_image():
    sampler = LungPatchSampler()
    assert sampler.patch_size_for((1024, 1024)) == 224
    assert sampler.patch_size_for((256, 256)) == 56
    assert LungPatchSampler(scale_with_image=False).patch_size_for((256, 256)) == 224


def test_patches_are_centred_on_lung_pixels():
    left, right = _two_lungs((128, 128))
    lungs = left | right
    image = np.random.default_rng(0).integers(0, 256, lungs.shape, dtype=np.uint8)
    sampler = LungPatchSampler()  # 28 px on a 128 px image
    patches, centres = sampler.sample(image, lungs, 50, np.random.default_rng(1))
    assert patches.shape == (50, 28, 28) and patches.dtype == np.uint8
    assert centres.shape == (50, 2)
    assert lungs[centres[:, 0], centres[:, 1]].all()
    np.testing.assert_array_equal(patches[:, 14, 14], image[centres[:, 0], centres[:, 1]])
    again, _ = sampler.sample(image, lungs, 50, np.random.default_rng(1))
    np.testing.assert_array_equal(patches, again)
    with pytest.raises(ValueError, match="empty"):
        sampler.sample(image, np.zeros_like(lungs), 3, np.random.default_rng(0))


def test_patches_are_zero_padded_at_the_border():
    image = np.ones((64, 64), dtype=np.float32)
    corner = np.zeros_like(image, dtype=bool)
    corner[0, 0] = True
    patches, centres = LungPatchSampler(patch_size=10, scale_with_image=False).sample(
        image, corner, 2, np.random.default_rng(0)
    )
    assert (centres == 0).all()
    assert patches[0, :5].sum() == 0 and patches[0, :, :5].sum() == 0
    assert (patches[0, 5:, 5:] == 1).all()


def test_paste_back_averages_over_covering_patches():
    left, right = _two_lungs((96, 96))
    lungs = left | right
    sampler = LungPatchSampler(patch_size=16, scale_with_image=False)
    patches, centres = sampler.sample(np.zeros(lungs.shape), lungs, 30, np.random.default_rng(0))
    pasted = sampler.paste_back(np.full(patches.shape, 0.7), centres, lungs.shape, fill=-1.0)
    covered = pasted != -1.0
    assert covered[centres[:, 0], centres[:, 1]].all()
    np.testing.assert_allclose(pasted[covered], 0.7)

    # two overlapping patches with values 0 and 1 average to 0.5 where both lie
    two = sampler.paste_back(
        np.stack([np.zeros((16, 16)), np.ones((16, 16))]), np.array([[40, 40], [40, 48]]), (96, 96)
    )
    assert two[40, 44] == 0.5 and two[40, 34] == 0.0 and two[40, 54] == 1.0
    assert two.shape == (96, 96) and two[0, 0] == 0.0
