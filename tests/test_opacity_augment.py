"""Opacities painted inside the lungs keep the lung label and leave the rest of the image alone."""

from __future__ import annotations

import numpy as np
import pytest

from cxrlib.data.transforms import (
    DEFAULT_OPACITY_KINDS,
    OPACITY_KINDS,
    OpacityAugment,
    PairedAugment,
)


def pair(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    image = (0.3 + 0.1 * rng.random((size, size))).astype(np.float32)
    image[:, : size // 8] = 0.8  # bright soft tissue at the side
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[15:80, 15:44] = 2
    labels[15:80, 52:82] = 1
    return image, labels


@pytest.mark.parametrize("kind", [kind for kind in OPACITY_KINDS if kind != "basal_white_out"])
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
    # by default only the kinds that stay inside the lung are drawn; basal_white_out is asked for
    assert OpacityAugment().kinds == DEFAULT_OPACITY_KINDS
    assert set(OPACITY_KINDS) - set(DEFAULT_OPACITY_KINDS) == {"basal_white_out"}


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


def chest(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Dark lungs in bright soft tissue, with dark air beside the body."""
    rng = np.random.default_rng(2)
    image = (0.7 + 0.02 * rng.random((size, size))).astype(np.float32)  # soft tissue, diaphragm below
    image[:, :8] = image[:, -8:] = 0.05  # air outside the body
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[20:90, 20:58] = 2
    labels[20:90, 70:108] = 1
    image[labels > 0] = 0.25 + 0.02 * rng.random(int((labels > 0).sum()))
    return image, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_basal_white_out_effaces_the_lung_base_and_spares_air_and_upper_lung(seed):
    image, labels = chest()
    lungs = labels > 0
    painted = OpacityAugment(p=1.0, kinds=("basal_white_out",))(image, labels, np.random.default_rng(seed))
    assert painted.dtype == np.float32 and painted.min() >= 0.0 and painted.max() <= 1.0
    # the upper fifth of the lungs lies above the ragged level and is untouched
    np.testing.assert_array_equal(painted[20:34], image[20:34])
    # dark air beside the body and everything far from the lungs are untouched
    np.testing.assert_array_equal(painted[:, :8], image[:, :8])
    far = np.ones_like(lungs)
    far[10:110, 8:120] = False
    np.testing.assert_array_equal(painted[far], image[far])
    # the lung base is painted as densely at its border as inside (no edge left at the
    # diaphragm), and the step across the diaphragm shrinks
    painted_lung = np.flatnonzero((painted[86:90] > image[86:90] + 0.05).any(axis=0) & lungs[89])
    assert painted_lung.size > 0
    gain = painted - image
    assert gain[89, painted_lung].mean() >= 0.95 * gain[85, painted_lung].mean() > 0.2
    step_before = np.abs(image[92, painted_lung] - image[89, painted_lung]).mean()
    step_after = np.abs(painted[92, painted_lung] - painted[89, painted_lung]).mean()
    assert step_after < 0.4 * step_before
