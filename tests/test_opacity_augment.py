"""Opacities painted inside the lungs keep the lung label and leave the rest of the image alone."""

from __future__ import annotations

import numpy as np
import pytest

from cxrlib.data.transforms import OPACITY_KINDS, OpacityAugment, PairedAugment


def pair(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    image = (0.3 + 0.1 * rng.random((size, size))).astype(np.float32)
    image[:, : size // 8] = 0.8  # bright soft tissue at the side
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[15:80, 15:44] = 2
    labels[15:80, 52:82] = 1
    return image, labels


@pytest.mark.parametrize("kind", OPACITY_KINDS)
def test_each_kind_brightens_the_lung_only(kind):
    image, labels = pair()
    lungs = labels > 0
    painted = OpacityAugment(p=1.0, kinds=(kind,))(image, labels, np.random.default_rng(3))
    assert painted.dtype == np.float32 and painted.shape == image.shape
    assert painted.min() >= 0.0 and painted.max() <= 1.0
    np.testing.assert_array_equal(painted[~lungs], image[~lungs])
    assert (painted >= image - 1e-6).all()
    assert painted[lungs].mean() > image[lungs].mean() + 0.01


def test_probability_zero_and_reproducible_draws():
    image, labels = pair()
    np.testing.assert_array_equal(OpacityAugment(p=0.0)(image, labels, np.random.default_rng(0)), image)
    first = OpacityAugment(p=1.0)(image, labels, np.random.default_rng(7))
    again = OpacityAugment(p=1.0)(image, labels, np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)
    with pytest.raises(ValueError, match="kinds"):
        OpacityAugment(kinds=("snow",))


def test_paired_augment_keeps_geometry_and_labels_with_opacities():
    image, labels = pair()
    image_u8 = (image * 255).astype(np.uint8)
    plain = PairedAugment()(image_u8, labels, np.random.default_rng(11))
    painted = PairedAugment(opacity=OpacityAugment(p=1.0, kinds=("white_out",)))(
        image_u8, labels, np.random.default_rng(11))
    np.testing.assert_array_equal(plain[1], painted[1])  # same geometry, same labels
    lungs = painted[1] > 0
    assert painted[0][lungs].mean() > plain[0][lungs].mean() + 0.05
    # an image without labels gets no opacity (nowhere to put it) and the same draws
    alone = PairedAugment(opacity=OpacityAugment(p=1.0))(image_u8, None, np.random.default_rng(11))
    np.testing.assert_array_equal(alone[0], PairedAugment()(image_u8, None, np.random.default_rng(11))[0])
