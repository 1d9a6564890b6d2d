"""Test-time zooms of the lung segmenter: views zoomed about the centre, mapped back and averaged
over the pixels each view covers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cxrlib.stages import lung_segmentation as seg


class Pointwise(nn.Module):
    """Each pixel's class from its own intensity only: zooming the input and mapping the output
    back gives the unzoomed prediction, up to interpolation."""

    def forward(self, x):
        return torch.cat([4 * (0.5 - x), 4 * (x - 0.5), torch.zeros_like(x), torch.zeros_like(x)], dim=1)


class FrameRing(nn.Module):
    """Class 3 on a 2-pixel ring along the border of whatever it is shown, background elsewhere:
    a zoomed view puts its ring inside the image, where only that view says class 3."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 4, *x.shape[-2:])
        ring = torch.ones(x.shape[-2:], dtype=torch.bool)
        ring[2:-2, 2:-2] = False
        logits[:, 3] = 10.0 * ring
        logits[:, 0] = 10.0 * ~ring
        return logits


def smooth_image(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    return (255 * (0.5 + 0.4 * np.sin(3 * x) * np.cos(2 * y))).astype(np.uint8)


def test_no_zoom_is_the_plain_prediction_and_a_pointwise_network_is_unchanged_by_zooms(one_thread):
    image = smooth_image()
    plain = seg.predict_probabilities(Pointwise(), [image], input_size=64, device="cpu")[0]
    same = seg.predict_probabilities(Pointwise(), [image], input_size=64, zooms=(1.0,), device="cpu")[0]
    np.testing.assert_array_equal(plain, same)
    for flips in (False, True):  # the mirror image's lungs are exchanged back in every view alike
        unzoomed = seg.predict_probabilities(Pointwise(), [image], input_size=64, flips=flips, device="cpu")[0]
        zoomed = seg.predict_probabilities(Pointwise(), [image], input_size=64, zooms=(1.0, 1.15, 1.3),
                                           flips=flips, device="cpu")[0]
        assert zoomed.shape == unzoomed.shape == (4, 64, 64)
        np.testing.assert_allclose(zoomed.sum(axis=0), 1.0, atol=1e-5)  # still probabilities
        assert np.abs(zoomed - unzoomed)[:, 8:-8, 8:-8].max() < 0.02
    labels = seg.predict_label_maps(Pointwise(), [image], input_size=64, zooms=(1.0, 1.3), device="cpu",
                                    postprocess=False)[0]
    assert (labels == plain.argmax(axis=0)).mean() > 0.99


def test_each_pixel_averages_only_the_views_that_cover_it(one_thread):
    image = np.full((32, 32), 128, dtype=np.uint8)
    plain = seg.predict_probabilities(FrameRing(), [image], input_size=32, device="cpu")[0]
    zoomed = seg.predict_probabilities(FrameRing(), [image], input_size=32, zooms=(1.0, 1.3), device="cpu")[0]
    # the frame itself is seen by the unzoomed view only: its ring is kept whole, not diluted
    assert plain[3, 0, 16] > 0.99 and zoomed[3, 0, 16] > 0.99 and zoomed[3, 16, 0] > 0.99
    # the zoomed view's ring falls 1/1.3 of the way out from the centre: about column 3.7
    assert plain[3, 16, 4] < 0.01 and zoomed[3, 16, 3:6].max() > 0.3
    assert zoomed[3, 12:20, 12:20].max() < 0.01  # the centre is background in both views


@pytest.mark.parametrize("zooms, problem", [((), "positive finite"), ((0.0, 1.0), "positive finite"),
                                            ((1.0, float("nan")), "positive finite"),
                                            ((1.15, 1.3), "at most 1")])
def test_bad_zooms_are_refused_with_the_reason(zooms, problem):
    with pytest.raises(ValueError, match=problem):
        seg.check_zooms(zooms)
    with pytest.raises(ValueError, match=problem):
        seg.DiseasedLungRecipe(zooms=zooms)


def test_the_recipe_zooms_no_further_than_its_training_zoom():
    recipe = seg.DiseasedLungRecipe()
    assert recipe.zooms[0] == 1.0 and max(recipe.zooms) <= recipe.scale_max
    assert seg.DiseasedLungRecipe(zooms=[1, 1.2]).zooms == (1.0, 1.2)
