"""A small 2-D U-Net for lung segmentation (Ronneberger et al. 2015).

Oh, Park & Ye (2020) segment the lungs with an FC-DenseNet before patch-based
classification; a plain U-Net is the common baseline for lung fields, and at this size it
trains on a CPU, which is what a teaching repository needs.

Sizes (``in_channels=1``, ``num_classes=3``, ``norm="batch"``, ``upsample="transpose"``):

============  =====  ==========
base_channels depth  parameters
============  =====  ==========
8             3      121 k
8             4      486 k
16            4      1.94 M
32            4      7.76 M
============  =====  ==========

``upsample="bilinear"`` has about 7% fewer parameters (1x1 instead of 2x2 up-convolutions).
With the defaults (``base_channels=16``, ``depth=4``) a 256x256 image costs about 6 GFLOP
forward and 18 GFLOP forward + backward (about 0.6 s on one CPU core), so an epoch of a
few hundred images takes minutes on a laptop CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cxrlib.settings import setting

Norm = Literal["batch", "instance", "group"]
Upsample = Literal["transpose", "bilinear"]


@dataclass
class UNetConfig:
    """Settings of :class:`UNet` (saved next to checkpoints via :func:`dataclasses.asdict`).

    - ``in_channels``: image channels (1 for a CXR).
    - ``num_classes``: output channels = label values 0..num_classes-1
      (3: background, left lung, right lung; 4 when the heart is included).
    - ``depth``: number of 2x down-samplings; inputs are padded to a multiple of ``2**depth``.
    - ``base_channels``: channels of the first level; level ``i`` has ``base_channels * 2**i``.
    - ``norm``: ``"batch"``, ``"instance"`` (affine) or ``"group"`` (up to 8 groups);
      instance / group norm behave the same in train and eval mode, useful for batch size 1.
    - ``dropout``: ``Dropout2d`` probability in the bottleneck and decoder blocks.
    - ``upsample``: ``"transpose"`` (learned 2x2 transposed conv) or ``"bilinear"``
      (bilinear 2x up-sampling + 1x1 conv; avoids checkerboard artefacts).
    """

    in_channels: int = setting(1, "image channels")
    num_classes: int = setting(3, "output channels (label values 0..num_classes-1)")
    depth: int = setting(4, "U-Net down-sampling steps")
    base_channels: int = setting(16, "U-Net channels of the first level")
    norm: Norm = setting("batch", "U-Net normalisation")
    dropout: float = setting(0.0, "U-Net channel dropout in the decoder")
    upsample: Upsample = setting("transpose", "U-Net up-sampling: learned transposed conv or bilinear + 1x1 conv")

    def __post_init__(self) -> None:
        if self.norm not in ("batch", "instance", "group"):
            raise ValueError(f"norm must be 'batch', 'instance' or 'group', got {self.norm!r}")
        if self.upsample not in ("transpose", "bilinear"):
            raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {self.upsample!r}")
        if self.depth < 1 or self.base_channels < 1 or self.in_channels < 1 or self.num_classes < 1:
            raise ValueError(f"depth, channels and num_classes must be positive: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _norm_layer(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.GroupNorm(math.gcd(8, channels), channels)


class _DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) x 2, optionally followed by channel dropout."""

    def __init__(self, in_ch: int, out_ch: int, norm: Norm, dropout: float = 0.0) -> None:
        # The conv bias is redundant before a normalisation layer with its own shift.
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            _norm_layer(norm, out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            _norm_layer(norm, out_ch),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class _Up(nn.Module):
    """2x up-sampling that halves the channels, concatenation with the skip, double conv."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig) -> None:
        super().__init__()
        if cfg.upsample == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_ch, out_ch, kernel_size=1),
            )
        self.conv = _DoubleConv(2 * out_ch, out_ch, cfg.norm, cfg.dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net: image ``(N, in_channels, H, W)`` float -> logits ``(N, num_classes, H, W)``.

    Any ``H, W`` is accepted: inputs are padded (edge replication) up to a multiple of
    ``2**depth`` and the logits cropped back, so no size has to be chosen for the network.
    The parameter count for each configuration is in the module docstring
    (defaults: 1.94 M); :func:`count_parameters` gives it for an instance.

    ``UNet()`` uses :class:`UNetConfig` defaults; ``UNet(cfg, depth=3)`` overrides fields.
    """

    def __init__(self, config: UNetConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = replace(config or UNetConfig(), **overrides)
        self.config = cfg
        widths = [cfg.base_channels * 2**level for level in range(cfg.depth + 1)]
        self.encoder = nn.ModuleList([_DoubleConv(cfg.in_channels, widths[0], cfg.norm)])
        for level in range(1, cfg.depth):
            self.encoder.append(_DoubleConv(widths[level - 1], widths[level], cfg.norm))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _DoubleConv(widths[-2], widths[-1], cfg.norm, cfg.dropout)
        self.decoder = nn.ModuleList(
            [_Up(widths[level + 1], widths[level], cfg) for level in reversed(range(cfg.depth))]
        )
        self.head = nn.Conv2d(widths[0], cfg.num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, in_channels, H, W)`` float (e.g. in [0, 1]) -> logits ``(N, num_classes, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        multiple = 2**self.config.depth
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, skip in zip(self.decoder, reversed(skips), strict=True):
            x = up(x, skip)
        return self.head(x)[..., :height, :width]

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in asdict(self.config).items())


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
