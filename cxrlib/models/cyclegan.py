"""CycleGAN networks for grayscale chest X-rays: ResNet and U-Net generators, 70x70 PatchGAN.

Zunair & Hamza (2021) translate Normal -> COVID-19 (``G_NC``) and Pneumonia -> COVID-19
(``G_PC``) with CycleGANs trained on unpaired 256x256 images: a U-Net generator with 32
filters in its first layer (gf=32) and a PatchGAN discriminator with 64 (df=64). The
networks here follow Zhu et al. (2017) and Isola et al. (2017):

- :class:`ResNetGenerator`: 7x7 convolution, two stride-2 down-samplings, ``n_blocks``
  residual blocks, two transposed-convolution up-samplings, 7x7 convolution, ``tanh``.
  Reflection padding keeps image borders free of the dark frame zero padding draws.
- :class:`UNetGenerator`: ``unet_depth`` stride-2 4x4 convolutions (LeakyReLU 0.2), as many
  4x4 transposed convolutions back (ReLU), the encoder features of each level concatenated
  to the decoder's (skip connections), ``tanh``. Level ``i`` (1-based) has
  ``ngf * min(2**(i-1), 8)`` channels. The paper gives gf=32 but not the depth; the default
  ``unet_depth=4`` (a 16x16 bottleneck at 256x256) is the layout of the widely used Keras
  CycleGAN that shares its gf=32 / df=64; ``unet_depth=8`` at 256 (7 at 128) is the
  reference PyTorch implementation's ``unet_256`` (``unet_128``), down to a 1x1 bottleneck.
- :class:`PatchDiscriminator`: the PatchGAN of pix2pix / CycleGAN. Each output value scores
  one 70x70 patch of the input (``n_layers_d=3``; see :func:`patchgan_receptive_field`),
  so a 256x256 image gets a 30x30 map of real / fake scores and a 128x128 image 14x14.

Images are 1-channel ``(N, 1, H, W)`` float tensors in [-1, 1]; generators return the same
shape and range. Normalisation is instance norm without affine parameters (as in the
reference implementation) or none; batch norm is left out on purpose: CycleGAN trains with
batch size 1, where it equals instance norm, and the training loop stacks images of both
domains (or real and fake images) into one forward pass, which per-sample normalisation
allows and batch statistics would not. Convolutions that feed a normalisation have no bias
(the mean subtraction would cancel it). Weights start from N(0, 0.02), biases from 0.

Sizes with 1-channel input and output, ``norm="instance"`` (parameters do not depend on
the image size; :func:`count_parameters` gives them):

=============================================  ==========
network                                        parameters
=============================================  ==========
U-Net, ngf=32, depth 4 (default)               1.54 M
U-Net, ngf=32, depth 8                         13.6 M
U-Net, ngf=64, depth 7 (``unet_128``)          41.8 M
U-Net, ngf=64, depth 8 (``unet_256``)          54.4 M
ResNet, ngf=64, 9 blocks (``resnet_9blocks``)  11.4 M
ResNet, ngf=32, 9 blocks                       2.84 M
PatchGAN, ndf=64, 3 layers (``basic``)         2.76 M
=============================================  ==========

With the same weights, these networks compute what the reference implementation's
``unet_128`` / ``unet_256``, ``resnet_9blocks`` and ``basic`` networks (``norm="instance"``)
compute (to float rounding); they only lack the biases that instance norm cancels (a few
thousand parameters).

``upsample="resize_conv"`` replaces every transposed convolution of either generator by a
nearest-neighbour 2x resize followed by a 3x3 convolution (Odena, Dumoulin & Olah 2016,
"Deconvolution and checkerboard artifacts", Distill). A stride-2 transposed convolution
whose kernel size is not divisible by the stride covers some output pixels with more kernel
taps than their neighbours, which draws a checkerboard texture into generated images; a
resize spreads every input pixel evenly first. The convolution then runs at the higher
resolution, so each up-sampling costs four times the multiply-adds of a 3x3 transposed
convolution (the ResNet generator, ngf 64, 9 blocks: about 15 % more per pass).

``upsample="blurred_transpose"`` keeps transposed convolutions, with a learned 3x3 kernel that
is convolved with a fixed two-tap box filter ``[1/2, 1/2]`` along either axis before use
(:class:`BlurredConvTranspose2d`). The layer computes "transposed convolution, then box
filter", whose response is zero at the highest frequency of its output grid: no pattern of
period two (a checkerboard, or stripes one pixel wide) can come out of it, whatever the weights
learn. The box applied to a zero-interleaved input is a nearest-neighbour resize, so this is
the function class of ``"resize_conv"`` (up to the padding at the borders), computed as a 4x4
transposed convolution: 16 instead of 36 multiply-adds per input pixel and channel pair, the
cost of the U-Net's plain 4x4 transposed convolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cxrlib.settings import setting

GeneratorKind = Literal["unet", "resnet"]
Norm = Literal["instance", "none"]
Upsample = Literal["transpose", "resize_conv", "blurred_transpose"]

#: How the generators up-sample: transposed convolutions, or a resize and a 3x3 convolution.
UPSAMPLE_KINDS: tuple[str, ...] = ("transpose", "resize_conv", "blurred_transpose")


@dataclass
class CycleGANConfig:
    """Settings of the two generators and two discriminators (saved next to checkpoints).

    - ``generator``: ``"unet"`` (:class:`UNetGenerator`, the paper's choice) or ``"resnet"``
      (:class:`ResNetGenerator`, the CycleGAN default).
    - ``in_channels`` / ``out_channels``: image channels (1 for a CXR; both domains alike).
    - ``ngf``: generator channels of the first level (paper: 32); ``ndf``: discriminator
      channels of its first layer (paper: 64).
    - ``n_blocks``: residual blocks of the ResNet generator (9 for 256x256 in CycleGAN).
    - ``unet_depth``: stride-2 levels of the U-Net; image sides must be multiples of
      ``2**unet_depth``.
    - ``n_layers_d``: stride-2 layers of the PatchGAN (3: 70x70 patches).
    - ``norm``: ``"instance"`` (no affine parameters) or ``"none"``.
    - ``dropout``: dropout probability in the residual blocks / U-Net decoder (CycleGAN: 0).
    - ``init_gain``: standard deviation of the N(0, gain) initial convolution weights.
    - ``image_size``: side of the square training images; checked against the networks.
    - ``upsample``: ``"transpose"`` (transposed convolutions, as in the reference),
      ``"resize_conv"`` (nearest 2x resize, then a 3x3 convolution: no checkerboard texture) or
      ``"blurred_transpose"`` (transposed convolutions with box-filtered 3x3 kernels: nothing of
      period two in their output, at the multiply-adds of a 4x4 transposed convolution).
    """

    generator: GeneratorKind = setting("unet", "generator architecture")
    in_channels: int = setting(1, "image channels of both domains")
    out_channels: int = setting(1, "channels the generators make")
    ngf: int = setting(32, "generator channels of the first level")
    ndf: int = setting(64, "discriminator channels of the first layer")
    n_blocks: int = setting(9, "residual blocks of the ResNet generator")
    unet_depth: int = setting(4, "stride-2 levels of the U-Net generator")
    n_layers_d: int = setting(3, "stride-2 layers of the PatchGAN (3: 70x70 patches)")
    norm: Norm = setting("instance", "normalisation of generators and discriminators")
    dropout: float = setting(0.0, "dropout in the residual blocks / U-Net decoder")
    init_gain: float = setting(0.02, "standard deviation of the initial convolution weights")
    image_size: int = setting(256, "side of the square training images")
    upsample: Upsample = setting("transpose", "generator up-sampling: transposed convolution, resize_conv "
                                              "(nearest resize + 3x3 convolution) or blurred_transpose "
                                              "(box-filtered transposed kernels); the last two draw no "
                                              "checkerboard texture")

    def __post_init__(self) -> None:
        if self.upsample not in UPSAMPLE_KINDS:
            raise ValueError(f"upsample must be one of {UPSAMPLE_KINDS}, got {self.upsample!r}")
        if self.generator not in ("unet", "resnet"):
            raise ValueError(f"generator must be 'unet' or 'resnet', got {self.generator!r}")
        if self.norm not in ("instance", "none"):
            raise ValueError(
                f"norm must be 'instance' or 'none', got {self.norm!r} (batch norm is not offered: "
                "the training loop stacks domains into one batch, which batch statistics would mix)"
            )
        positive = ("in_channels", "out_channels", "ngf", "ndf", "unet_depth", "n_layers_d", "image_size")
        bad = {name: getattr(self, name) for name in positive if getattr(self, name) < 1}
        if bad or self.n_blocks < 0:
            raise ValueError(f"sizes must be positive (n_blocks >= 0): {bad or {'n_blocks': self.n_blocks}}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.check_image_size(self.image_size)

    @property
    def size_multiple(self) -> int:
        """Image sides the generator accepts are multiples of this (U-Net ``2**depth``, ResNet 4)."""
        return 2 ** self.unet_depth if self.generator == "unet" else 4

    def check_image_size(self, size: int) -> None:
        """Raise ``ValueError`` unless ``size x size`` images fit both networks."""
        if size % self.size_multiple:
            raise ValueError(
                f"image size {size} is not a multiple of {self.size_multiple}, as the "
                f"{self.generator} generator (unet_depth={self.unet_depth}) needs"
            )
        smallest = 3 * 2 ** self.n_layers_d  # the PatchGAN's output map is at least 1x1
        if size < smallest:
            raise ValueError(f"image size {size} is below {smallest}, the smallest input of a "
                             f"PatchGAN with n_layers_d={self.n_layers_d}")


class InstanceNorm(nn.Module):
    """Instance norm without affine parameters: each channel of each image to mean 0, variance 1.

    ``(N, C, H, W)`` -> same shape. The numbers of ``nn.InstanceNorm2d(C, affine=False)``,
    computed as group norm with one channel per group, which takes about half the time on
    the CPU (instance norm goes through batch norm on a reshaped copy).
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels, self.eps = channels, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.channels, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}"


def _norm_layer(kind: Norm, channels: int) -> nn.Module:
    return InstanceNorm(channels) if kind == "instance" else nn.Identity()


class BlurredConvTranspose2d(nn.ConvTranspose2d):
    """A stride-2 transposed convolution with a learned 3x3 kernel, box-filtered on use.

    Stores ``weight`` ``(in, out, 3, 3)`` and ``bias`` as :class:`torch.nn.ConvTranspose2d` does
    (so :func:`init_weights` treats it alike) and maps ``(N, in, H, W)`` to ``(N, out, 2H, 2W)``.
    The kernel it applies is ``weight`` fully convolved with the box ``[1/2, 1/2]`` along either
    axis, ``(in, out, 4, 4)``, with padding 1: the output is the plain 3x3 layer's output filtered
    by the box, so its response at the Nyquist frequency of either axis is zero (a constant input
    gives a constant output away from the borders), and each input pixel's footprint is centred on
    the two output pixels it becomes (a plain 3x3 kernel with output padding is half a pixel off).
    It computes what a nearest 2x resize followed by a 3x3 convolution computes (the resize is the
    box applied to the zero-interleaved input), up to a factor four in the weights and the
    padding at the borders, at 16 instead of 36 multiply-adds per input pixel and channel pair.
    """

    def __init__(self, in_channels: int, out_channels: int, *, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=bias)
        # the full convolution with the box along one axis maps 3 taps to 4: [a, b, c] -> [a, a + b, b + c, c] / 2
        one_axis = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]) / 2
        self.register_buffer("blur_map", torch.kron(one_axis, one_axis).T.contiguous(), persistent=False)  # (9, 16)

    def blurred_weight(self) -> torch.Tensor:
        """The kernel applied: ``weight`` fully convolved with the 2x2 box, ``(in, out, 4, 4)``."""
        w = self.weight
        # one (in * out, 9) x (9, 16) product: far cheaper on a CPU than a convolution per kernel
        return (w.reshape(-1, 9) @ self.blur_map.to(w.dtype)).reshape(w.shape[0], w.shape[1], 4, 4)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        # output side: (H - 1) * 2 - 2 * 1 + 4 = 2 H
        return F.conv_transpose2d(x, self.blurred_weight(), self.bias, stride=2, padding=1)


def upsampling_layer(kind: Upsample, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                     bias: bool = True, padding_mode: str = "zeros") -> nn.Module:
    """A layer that doubles height and width: ``(N, in, H, W)`` -> ``(N, out, 2H, 2W)``.

    ``"transpose"``: a stride-2 transposed convolution of ``kernel_size`` (3: with output
    padding 1, as in the ResNet generator; 4: as in the U-Net). ``"resize_conv"``: nearest
    2x resize, then a 3x3 convolution with ``padding_mode`` padding (``kernel_size`` unused).
    ``"blurred_transpose"``: :class:`BlurredConvTranspose2d` (``kernel_size`` unused: always a
    learned 3x3 kernel applied as 4x4).
    """
    if kind == "blurred_transpose":
        return BlurredConvTranspose2d(in_channels, out_channels, bias=bias)
    if kind == "resize_conv":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                             nn.Conv2d(in_channels, out_channels, 3, padding=1, padding_mode=padding_mode, bias=bias))
    if kind != "transpose":
        raise ValueError(f"upsample must be one of {UPSAMPLE_KINDS}, got {kind!r}")
    if kernel_size == 3:
        return nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=bias)
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride=2, padding=1, bias=bias)


def init_weights(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """Draw every (transposed) convolution weight from N(0, ``gain``), zero the biases; return ``module``."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(layer.weight, 0.0, gain)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- generators


class ResidualBlock(nn.Module):
    """``x + (pad, conv3x3, norm, ReLU, [dropout], pad, conv3x3, norm)(x)``, reflection padding."""

    def __init__(self, channels: int, norm: Norm = "instance", dropout: float = 0.0) -> None:
        super().__init__()
        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect", bias=bias),
            _norm_layer(norm, channels),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect", bias=bias),
                   _norm_layer(norm, channels)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNetGenerator(nn.Module):
    """Johnson-style generator: ``(N, in, H, W)`` in [-1, 1] -> ``(N, out, H, W)`` in [-1, 1].

    ``H`` and ``W`` must be multiples of 4 (two stride-2 down-samplings). Channels: ``ngf``
    at full resolution, ``2 ngf`` at 1/2, ``4 ngf`` in the ``n_blocks`` residual blocks at 1/4.
    """

    size_multiple = 4

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 64, n_blocks: int = 9,
                 norm: Norm = "instance", dropout: float = 0.0, upsample: Upsample = "transpose") -> None:
        super().__init__()
        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ngf, 7, padding=3, padding_mode="reflect", bias=bias),
            _norm_layer(norm, ngf),
            nn.ReLU(inplace=True),
        ]
        channels = ngf
        for _ in range(2):
            layers += [nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1, bias=bias),
                       _norm_layer(norm, channels * 2), nn.ReLU(inplace=True)]
            channels *= 2
        layers += [ResidualBlock(channels, norm, dropout) for _ in range(n_blocks)]
        for _ in range(2):
            layers += [upsampling_layer(upsample, channels, channels // 2, kernel_size=3, bias=bias,
                                        padding_mode="reflect"),
                       _norm_layer(norm, channels // 2), nn.ReLU(inplace=True)]
            channels //= 2
        layers += [nn.Conv2d(channels, out_channels, 7, padding=3, padding_mode="reflect"), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class UNetGenerator(nn.Module):
    """U-Net generator: ``(N, in, H, W)`` in [-1, 1] -> ``(N, out, H, W)`` in [-1, 1].

    Encoder level ``i`` = 1..depth: 4x4 stride-2 convolution to ``c_i = ngf * min(2**(i-1), 8)``
    channels, normalisation (not at the first and the innermost level), LeakyReLU 0.2.
    Decoder level ``i`` = depth..1: ReLU, 4x4 stride-2 transposed convolution of the
    concatenated ``[encoder_i, decoder_{i+1}]`` features to ``c_{i-1}`` channels,
    normalisation (``tanh`` at the output). The skip connections carry the activated
    encoder features, which is what the reference implementation's in-place LeakyReLU
    makes its skips carry too. ``H`` and ``W`` must be multiples of ``2**depth``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 32, depth: int = 4,
                 norm: Norm = "instance", dropout: float = 0.0, upsample: Upsample = "transpose") -> None:
        super().__init__()
        self.depth = depth
        self.size_multiple = 2 ** depth
        channels = [in_channels] + [ngf * min(2 ** level, 8) for level in range(depth)]  # c_0 .. c_depth
        bias = norm == "none"
        self.down = nn.ModuleList()
        for level in range(1, depth + 1):
            innermost, outermost = level == depth, level == 1
            layers: list[nn.Module] = [nn.Conv2d(channels[level - 1], channels[level], 4, stride=2, padding=1,
                                                 bias=bias or innermost or outermost)]
            if not (innermost or outermost):
                layers.append(_norm_layer(norm, channels[level]))
            if not innermost:
                layers.append(nn.LeakyReLU(0.2, inplace=True))
            self.down.append(nn.Sequential(*layers))
        self.up = nn.ModuleList()  # up[level - 1] is decoder level ``level``
        for level in range(1, depth + 1):
            inputs = channels[level] * (1 if level == depth else 2)
            if level == 1:
                layers = [nn.ReLU(inplace=True),
                          upsampling_layer(upsample, inputs, out_channels, kernel_size=4), nn.Tanh()]
            else:
                layers = [nn.ReLU(inplace=True),
                          upsampling_layer(upsample, inputs, channels[level - 1], kernel_size=4, bias=bias),
                          _norm_layer(norm, channels[level - 1])]
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.size_multiple or x.shape[-2] % self.size_multiple:
            raise ValueError(f"U-Net of depth {self.depth} needs sides that are multiples of "
                             f"{self.size_multiple}, got {tuple(x.shape[-2:])}")
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
        x = self.up[-1](skips.pop())
        for level in range(self.depth - 1, 0, -1):
            x = self.up[level - 1](torch.cat([skips.pop(), x], dim=1))
        return x


# --------------------------------------------------------------------------- discriminator


def patchgan_receptive_field(n_layers: int = 3) -> int:
    """Side of the input patch one PatchGAN output value sees (70 for ``n_layers=3``).

    The layers are ``n_layers`` 4x4 stride-2 convolutions, then two 4x4 stride-1 ones; a
    layer with kernel ``k`` widens the field by ``(k - 1)`` times the product of the strides
    before it: ``1 + 3 * (1 + 2 + ... + 2**(n_layers-1)) + 2 * 3 * 2**n_layers``.
    """
    field, jump = 1, 1
    for stride in [2] * n_layers + [1, 1]:
        field += 3 * jump
        jump *= stride
    return field


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``(N, in, H, W)`` image -> ``(N, 1, h, w)`` raw scores (LSGAN: real 1, fake 0).

    4x4 convolutions: ``ndf`` channels stride 2 (no normalisation), then ``n_layers - 1``
    stride-2 layers doubling the channels (up to ``8 ndf``), one stride-1 layer, and a
    stride-1 layer to one channel; LeakyReLU 0.2 between. Each score sees a
    :func:`patchgan_receptive_field` square (70x70 for ``n_layers=3``); ``h = H / 2**n_layers - 2``
    (14 for a 128 input, 30 for 256).
    """

    def __init__(self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3, norm: Norm = "instance") -> None:
        super().__init__()
        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        channels = ndf
        for layer in range(1, n_layers + 1):
            wider = ndf * min(2 ** layer, 8)
            stride = 2 if layer < n_layers else 1
            layers += [nn.Conv2d(channels, wider, 4, stride=stride, padding=1, bias=bias),
                       _norm_layer(norm, wider), nn.LeakyReLU(0.2, inplace=True)]
            channels = wider
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.receptive_field = patchgan_receptive_field(n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------- factories


def build_generator(cfg: CycleGANConfig) -> nn.Module:
    """A freshly initialised generator (draws from torch's global RNG: seed first)."""
    if cfg.generator == "resnet":
        net: nn.Module = ResNetGenerator(cfg.in_channels, cfg.out_channels, cfg.ngf, cfg.n_blocks, cfg.norm,
                                         cfg.dropout, upsample=cfg.upsample)
    else:
        net = UNetGenerator(cfg.in_channels, cfg.out_channels, cfg.ngf, cfg.unet_depth, cfg.norm, cfg.dropout,
                            upsample=cfg.upsample)
    return init_weights(net, cfg.init_gain)


def build_discriminator(cfg: CycleGANConfig) -> PatchDiscriminator:
    """A freshly initialised PatchGAN for images of ``cfg.out_channels`` channels."""
    return init_weights(PatchDiscriminator(cfg.out_channels, cfg.ndf, cfg.n_layers_d, cfg.norm), cfg.init_gain)


class CycleGAN(nn.Module):
    """The four networks of one CycleGAN, named by what they do (one state dict for all four).

    - ``G_AB``: domain A -> B (e.g. Normal -> COVID-19); ``G_BA``: B -> A.
    - ``D_A``: scores images as real domain-A images (real A vs ``G_BA(B)``);
      ``D_B``: real B vs ``G_AB(A)``.

    (The reference implementation names these G_A, G_B, D_A, D_B with D_A judging domain B.)
    Built in the order G_AB, G_BA, D_A, D_B from torch's global RNG.
    """

    def __init__(self, cfg: CycleGANConfig) -> None:
        super().__init__()
        if cfg.in_channels != cfg.out_channels:
            raise ValueError("a CycleGAN maps both ways: in_channels must equal out_channels")
        self.config = cfg
        self.G_AB = build_generator(cfg)
        self.G_BA = build_generator(cfg)
        self.D_A = build_discriminator(cfg)
        self.D_B = build_discriminator(cfg)
