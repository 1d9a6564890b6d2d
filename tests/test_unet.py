"""U-Net: shapes for several configurations, gradients, and overfitting one phantom image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.draw import ellipse

from cxrlib.models.unet import UNet, UNetConfig, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("depth", "norm", "upsample", "height", "width"),
    [
        (4, "batch", "transpose", 64, 64),
        (3, "instance", "bilinear", 48, 80),
        (2, "group", "transpose", 37, 50),  # not a multiple of 2**depth: padded and cropped
        (1, "batch", "bilinear", 9, 16),
    ],
)
def test_output_shape(depth, norm, upsample, height, width):
    model = UNet(depth=depth, norm=norm, upsample=upsample, base_channels=4, num_classes=4)
    logits = model(torch.rand(2, 1, height, width))
    assert logits.shape == (2, 4, height, width)
    assert logits.dtype == torch.float32


def test_config_and_overrides():
    base = UNetConfig(depth=3, base_channels=8)
    model = UNet(base, norm="group", in_channels=2)
    assert model.config == UNetConfig(in_channels=2, depth=3, base_channels=8, norm="group")
    assert base.norm == "batch"  # the caller's config is not modified
    assert UNet().config == UNetConfig()
    assert model(torch.rand(1, 2, 16, 16)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="norm"):
        UNet(norm="layer")
    with pytest.raises(ValueError, match="expected input"):
        UNet(base_channels=4)(torch.rand(1, 3, 16, 16))


def test_parameter_count_matches_docstring():
    assert count_parameters(UNet()) == 1_942_323
    assert count_parameters(UNet(base_channels=8, depth=3)) == 121_051
    frozen = UNet(base_channels=4, depth=1)
    for parameter in frozen.head.parameters():
        parameter.requires_grad_(False)
    assert count_parameters(frozen) < count_parameters(frozen, trainable_only=False)


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_gradients_reach_every_parameter(upsample):
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=3, upsample=upsample, dropout=0.1)
    image = torch.rand(2, 1, 32, 32, requires_grad=True)
    target = torch.randint(0, 3, (2, 32, 32))
    F.cross_entropy(model(image), target).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert image.grad is not None and image.grad.abs().sum() > 0


def _two_ellipses(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A phantom-like image (float (H, W) in [0, 1]) and its label map (1 image right, 2 image left)."""
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[ellipse(size // 2, int(size * 0.7), size * 0.35, size * 0.15, shape=labels.shape)] = 1
    labels[ellipse(size // 2, int(size * 0.3), size * 0.35, size * 0.15, shape=labels.shape)] = 2
    rng = np.random.default_rng(0)
    image = np.where(labels > 0, 0.25, 0.7) + rng.normal(0, 0.05, labels.shape)
    return np.clip(image, 0, 1).astype(np.float32), labels


def test_overfits_one_phantom_image():
    torch.manual_seed(0)
    image, labels = _two_ellipses()
    x = torch.from_numpy(image)[None, None]
    y = torch.from_numpy(labels.astype(np.int64))[None]
    # Instance norm: with one image, batch-norm running averages after a few dozen steps
    # still lag the batch statistics, which would test the schedule rather than the model.
    model = UNet(base_channels=8, depth=3, norm="instance")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)[0].numpy()
    for value in (1, 2):
        p, t = pred == value, labels == value
        assert 2 * (p & t).sum() / (p.sum() + t.sum()) > 0.9
