"""Image classifiers for grey-level chest X-rays: torchvision backbones behind one interface.

Every model built by :func:`build_classifier` is a :class:`Classifier`: ``backbone`` (the
convolutional part of a torchvision network, or :class:`SmallCNN`), global average pooling
(``pool``, giving the feature vector) and a linear ``head``. The works reproduced here
use exactly this shape: Zunair & Hamza 2021 put global average pooling and one dense layer
on VGG16 / ResNet50 / DenseNet121; Minaee et al. 2020 fine-tune ResNet18 / ResNet50 /
SqueezeNet / DenseNet121; Oh et al. 2020 use ResNet-18 on lung patches.

.. code-block:: python

    model = build_classifier("resnet18", num_classes=2, weights="imagenet")
    logits = model(images)                        # images (N, 1, H, W) float in [0, 1]
    features = penultimate_features(model, images)   # (N, 512) GAP features (UMAP, FID)
    layer = cam_target_layer(model)               # last conv block, for Grad-CAM

Input convention: images are ``(N, 1, H, W)`` float in [0, 1]; the model standardises
them itself with the grey-level ImageNet statistics (:data:`GREY_MEAN`, :data:`GREY_STD`),
so datasets, Grad-CAM and inference all pass plain [0, 1] images.

ImageNet weights (``weights="imagenet"``) are read from the torch hub cache,
``torch.hub.get_dir()/checkpoints/<file>`` (:func:`imagenet_weights_file` names it); nothing
is downloaded. Their first convolution sees RGB; its kernels are summed over the three
channels for one grey channel (a grey image copied to R, G and B gives the same response).
When the file is missing, the model starts from random weights with one warning
(:class:`PretrainedWeightsWarning`) saying where to put it.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from cxrlib.models.modules import unwrap

#: Grey-level ImageNet statistics: the mean of the RGB means and of the RGB standard deviations.
GREY_MEAN: float = (0.485 + 0.456 + 0.406) / 3
GREY_STD: float = (0.229 + 0.224 + 0.225) / 3

Weights = str | PathLike | Mapping[str, Any] | None


class PretrainedWeightsWarning(UserWarning):
    """Pretrained weights were asked for but are not available offline; random init is used."""


# --------------------------------------------------------------------------- model


class Classifier(nn.Module):
    """``head(pool(backbone(standardise(x))))`` for grey-level images.

    - ``backbone``: ``(N, in_channels, H, W)`` -> feature maps ``(N, D, h, w)``;
    - ``pool``: global average pooling + flatten -> ``(N, D)`` float (the "GAP features");
    - ``head``: dropout (``p = dropout``, identity when 0) + ``Linear(D, num_classes)``.

    ``forward(x)``: ``x`` ``(N, in_channels, H, W)`` float in [0, 1] -> logits
    ``(N, num_classes)``. ``arch`` names the :data:`ARCHITECTURES` entry it was built from.
    """

    def __init__(self, arch: str, backbone: nn.Module, feature_dim: int, num_classes: int,
                 *, dropout: float = 0.0, mean: float = GREY_MEAN, std: float = GREY_STD) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.backbone = backbone
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head = nn.Sequential(OrderedDict(
            dropout=nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            fc=nn.Linear(feature_dim, num_classes),
        ))
        # Not saved in checkpoints: fixed constants, not learned.
        self.register_buffer("input_mean", torch.tensor(float(mean)), persistent=False)
        self.register_buffer("input_std", torch.tensor(float(std)), persistent=False)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` with the grey ImageNet statistics; ``x`` in [0, 1]."""
        return (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """GAP features ``(N, D)`` float of images ``(N, C, H, W)`` in [0, 1]."""
        return self.pool(self.backbone(self.standardise(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallCNN(nn.Sequential):
    """A few ``conv3x3-BN-ReLU`` blocks that halve the resolution: trains in seconds on a CPU.

    ``widths`` gives the channels of each block. Block 1 halves the resolution with a
    stride-2 convolution (cheaper than convolving the full-resolution image and pooling),
    the others with a 2x2 max-pool, so the default ``(16, 32, 64, 128)`` turns a 224x224
    image into 128 maps of 14x14 (a 32x32 image into 2x2). Blocks are named ``block1`` ...
    ``blockK``; the last is the Grad-CAM target.
    """

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for index, width in enumerate(widths, start=1):
            first = index == 1
            layers: OrderedDict[str, nn.Module] = OrderedDict(
                conv=nn.Conv2d(channels, width, 3, stride=2 if first else 1, padding=1, bias=False),
                bn=nn.BatchNorm2d(width),
                relu=nn.ReLU(inplace=True),
            )
            if not first:
                layers["pool"] = nn.MaxPool2d(2)
            blocks[f"block{index}"] = nn.Sequential(layers)
            channels = width
        super().__init__(blocks)
        self.out_channels = channels


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ArchSpec:
    """How to turn one torchvision network into a :class:`Classifier` backbone.

    ``torchvision_name``: the builder in ``torchvision.models`` (``None`` for SmallCNN);
    ``first_conv``: dotted name of the RGB input convolution in the torchvision model;
    ``backbone``: callable that takes the torchvision model and returns the backbone;
    ``feature_dim``: channels of the backbone output; ``cam_layer``: dotted name, inside
    ``Classifier``, of the last convolutional block (Grad-CAM target); ``note``: where it is
    used in the reproduced works; ``source``: builds the randomly initialised torchvision
    model (default ``torchvision.models.get_model(torchvision_name)``).
    """

    name: str
    torchvision_name: str | None
    first_conv: str | None
    backbone: Callable[[nn.Module], nn.Module] | None
    feature_dim: int
    cam_layer: str
    note: str = ""
    source: Callable[[], nn.Module] | None = None

    def build_source(self) -> nn.Module:
        """The randomly initialised torchvision network the backbone is cut from."""
        if self.source is not None:
            return self.source()
        return torchvision.models.get_model(self.torchvision_name, weights=None)


def _resnet_backbone(model: nn.Module) -> nn.Module:
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((name, getattr(model, name)) for name in names))


def _densenet_backbone(model: nn.Module) -> nn.Module:
    features = model.features
    # torchvision applies this ReLU functionally (in place) in forward(); as a module it is
    # part of the backbone and hooks on earlier layers see unmodified activations.
    features.add_module("relu5", nn.ReLU())
    return features


def _features_backbone(model: nn.Module) -> nn.Module:
    return model.features


def _vgg16_source() -> nn.Module:
    """torchvision's VGG16 convolutional part alone, initialised as ``torchvision.models.VGG`` does.

    Building the whole VGG16 would allocate and initialise its 120M-parameter fully
    connected head (about 2 s), only for the head to be replaced by pooling.
    """
    from torchvision.models.vgg import cfgs, make_layers

    holder = nn.Module()
    holder.features = make_layers(cfgs["D"], batch_norm=False)
    for module in holder.features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(module.bias, 0)
    return holder


ARCHITECTURES: dict[str, ArchSpec] = {
    "small_cnn": ArchSpec("small_cnn", None, None, None, 128, "backbone.block4",
                          "fast CPU baseline for the phantom data and the tests"),
    "resnet18": ArchSpec("resnet18", "resnet18", "conv1", _resnet_backbone, 512, "backbone.layer4",
                         "Oh et al. 2020 (patches), Minaee et al. 2020"),
    "resnet50": ArchSpec("resnet50", "resnet50", "conv1", _resnet_backbone, 2048, "backbone.layer4",
                         "Zunair & Hamza 2021, Minaee et al. 2020"),
    "densenet121": ArchSpec("densenet121", "densenet121", "features.conv0", _densenet_backbone, 1024,
                            "backbone.denseblock4", "Zunair & Hamza 2021, Minaee et al. 2020"),
    "vgg16": ArchSpec("vgg16", "vgg16", "features.0", _features_backbone, 512,
                      # features.29 is the ReLU after the last convolution (before the last max-pool)
                      "backbone.29", "Zunair & Hamza 2021 (VGG16 + global average pooling)",
                      source=_vgg16_source),
    "squeezenet1_1": ArchSpec("squeezenet1_1", "squeezenet1_1", "features.0", _features_backbone, 512,
                              "backbone.12", "Minaee et al. 2020 (SqueezeNet)"),
}


def _spec(arch: str) -> ArchSpec:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


# --------------------------------------------------------------------------- weights


def adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of ``conv`` (built for RGB) that takes ``in_channels`` channels.

    Its pretrained kernels ``(out, 3, k, k)`` are summed over RGB for one channel (a grey
    image copied into R, G and B gives exactly the original response); for other channel
    counts they are tiled and rescaled by ``3 / in_channels``. Bias and geometry are kept.
    """
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    with torch.no_grad():
        weight = conv.weight.detach()
        if in_channels == 1:
            new.weight.copy_(weight.sum(dim=1, keepdim=True))
        else:
            repeats = -(-in_channels // weight.shape[1])
            new.weight.copy_(weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach())
    return new


def _weight_enums(torchvision_name: str) -> list[Any]:
    """ImageNet classification weights of a torchvision builder, the default one first."""
    enum = torchvision.models.get_model_weights(torchvision_name)
    members = [enum.DEFAULT] + [m for m in enum if m is not enum.DEFAULT]
    # IMAGENET1K_FEATURES (VGG) has no usable classifier and a different recipe.
    return [m for m in members if m.name.startswith("IMAGENET1K_V")]


def imagenet_weights_file(arch: str) -> Path:
    """Where ``weights="imagenet"`` looks for ``arch``'s default ImageNet file (torch hub cache)."""
    spec = _spec(arch)
    if spec.torchvision_name is None:
        raise ValueError(f"arch {arch!r} has no ImageNet weights")
    url = _weight_enums(spec.torchvision_name)[0].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _cached_imagenet_file(torchvision_name: str) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The first ImageNet weights file already in the hub cache, and every (path, url) looked for."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    looked = []
    for member in _weight_enums(torchvision_name):
        path = checkpoints / member.url.rsplit("/", 1)[-1]
        looked.append((path, member.url))
        if path.is_file():
            return path, looked
    return None, looked


# Old DenseNet checkpoints (the ImageNet files) name layers 'norm.1' instead of 'norm1'.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _describe(source: object) -> str:
    """A weights source for messages: the file name, never a dict's contents."""
    return str(source) if isinstance(source, str | PathLike) else "the given state dict"


def _read_state_dict(source: Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict from a file (``weights_only=True``) or a dict: plain, or under ``"model"`` / ``"state_dict"``.

    Keys are normalised: a DDP ``module.`` prefix is dropped, old DenseNet names are renamed.
    """
    if isinstance(source, Mapping):
        payload: Any = source
    else:
        if not source.is_file():
            raise FileNotFoundError(f"weights file {source} does not exist")
        payload = torch.load(source, map_location="cpu", weights_only=True)
    path = _describe(source)
    for key in ("model", "state_dict"):
        if isinstance(payload, Mapping) and isinstance(payload.get(key), Mapping):
            payload = payload[key]
    if not isinstance(payload, Mapping) or not all(torch.is_tensor(v) for v in payload.values()):
        raise ValueError(f"{path} does not hold a state dict (name -> tensor)")
    state = {}
    for key, value in payload.items():
        key = key.removeprefix("module.")  # saved from a DataParallel / DDP wrapper
        match = _DENSENET_OLD_KEY.match(key)
        state[match.group(1) + match.group(2) if match else key] = value
    return state


def _load_torchvision_state(model: nn.Module, state: Mapping[str, torch.Tensor], spec: ArchSpec,
                            source: object) -> None:
    """Load the backbone part of a torchvision-format state dict into ``model`` (still RGB).

    Head weights (``fc``, ``classifier``) are skipped: the head is replaced anyway. Every
    other parameter must be present with the right shape (BatchNorm step counters, absent
    from older files, may be missing).
    """
    head_prefixes = ("fc.", "classifier.")
    own = model.state_dict()
    wanted = {k for k in own if not k.startswith(head_prefixes) and not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not k.startswith(head_prefixes)}
    missing = sorted(wanted - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong_shape = sorted(k for k in wanted & set(given) if tuple(given[k].shape) != tuple(own[k].shape)
                         and k != f"{spec.first_conv}.weight")
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{_describe(source)} does not fit torchvision {spec.torchvision_name}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]} (first 5 of each shown)"
        )
    first = f"{spec.first_conv}.weight"
    if given[first].shape[1] != own[first].shape[1]:
        # A checkpoint of an already grey network: rebuild the input conv to match, it is adapted below.
        conv = model.get_submodule(spec.first_conv)
        conv_grey = nn.Conv2d(given[first].shape[1], conv.out_channels, conv.kernel_size, stride=conv.stride,
                              padding=conv.padding, bias=conv.bias is not None)
        _set_submodule(model, spec.first_conv, conv_grey)
    model.load_state_dict(given, strict=False)


def _set_submodule(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _load_classifier_state(model: Classifier, state: Mapping[str, torch.Tensor], source: object) -> None:
    """Load a cxrlib ``Classifier`` state dict (keys ``backbone.*``); a head of another size is skipped."""
    own = model.state_dict()
    head_fits = all(k in state and tuple(state[k].shape) == tuple(v.shape)
                    for k, v in own.items() if k.startswith("head."))
    filtered = {k: v for k, v in state.items() if head_fits or not k.startswith("head.")}
    result = model.load_state_dict(filtered, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{_describe(source)} does not fit a {model.arch} classifier: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")


# --------------------------------------------------------------------------- factory


def build_classifier(
    arch: str,
    num_classes: int,
    *,
    weights: Weights = None,
    in_channels: int = 1,
    dropout: float = 0.0,
) -> Classifier:
    """A :class:`Classifier` for ``in_channels``-channel images and ``num_classes`` classes.

    ``arch``: a key of :data:`ARCHITECTURES` (``small_cnn``, ``resnet18``, ``resnet50``,
    ``densenet121``, ``vgg16``, ``squeezenet1_1``). The torchvision head is replaced by
    global average pooling + ``Linear(D, num_classes)`` (for VGG16 this drops the three
    fully connected layers, as Zunair & Hamza do; for SqueezeNet the 1x1 conv classifier).

    ``weights``:
    - ``None``: random initialisation (torchvision's defaults);
    - ``"imagenet"``: torchvision's ImageNet weights from the torch hub cache
      (:func:`imagenet_weights_file`); never downloaded. Missing -> random initialisation
      and one :class:`PretrainedWeightsWarning` naming the file to place there;
    - a path: a state dict file (``torch.load(weights_only=True)``) in torchvision layout
      (e.g. the hub file itself; head weights are ignored), or a cxrlib classifier
      checkpoint / state dict of the same ``arch`` (keys ``backbone.*``; the head is kept when
      its shape fits). A missing or unfitting file raises;
    - a state dict (``Mapping``) already in memory, read like a file.

    With pretrained weights the input convolution's RGB kernels are summed for one grey
    channel (:func:`adapt_first_conv`). ``dropout``: dropout probability before the last
    linear layer. Returns the model in training mode, on the CPU.
    """
    spec = _spec(arch)
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
    weights_source: Path | Mapping[str, Any] | None = None
    use_imagenet = False
    if isinstance(weights, Mapping):
        weights_source = weights
    elif isinstance(weights, str) and weights.lower() == "imagenet":
        use_imagenet = True
        if spec.torchvision_name is None:
            raise ValueError(f"arch {arch!r} has no ImageNet weights; use weights=None or a checkpoint path")
    elif weights is not None:
        weights_source = Path(weights).expanduser()
        if not weights_source.is_file():
            raise FileNotFoundError(f"weights file {weights_source} does not exist")

    if spec.torchvision_name is None:
        model = Classifier(arch, SmallCNN(in_channels), spec.feature_dim, num_classes, dropout=dropout)
        if weights_source is not None:
            _load_classifier_state(model, _read_state_dict(weights_source), weights_source)
        return model

    source_model = spec.build_source()
    state: dict[str, torch.Tensor] | None = None
    state_source: Path | Mapping[str, Any] | None = weights_source
    if use_imagenet:
        state_source, looked = _cached_imagenet_file(spec.torchvision_name)
        if state_source is None:
            path, url = looked[0]
            warnings.warn(
                f"ImageNet weights for {arch} are not in the torch hub cache, so {arch} starts from "
                f"random weights. To use them offline, download {url} and save it as {path} "
                f"(the folder is torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it), "
                f"or pass weights='/path/to/{path.name}'.",
                PretrainedWeightsWarning, stacklevel=2,
            )
    if state_source is not None:
        state = _read_state_dict(state_source)
    # A cxrlib classifier's own state dict (fine-tuning from another run) vs torchvision layout.
    is_classifier_state = state is not None and any(k.startswith("backbone.") for k in state)
    if state is not None and not is_classifier_state:
        _load_torchvision_state(source_model, state, spec, state_source)

    first_conv = source_model.get_submodule(spec.first_conv)
    _set_submodule(source_model, spec.first_conv, adapt_first_conv(first_conv, in_channels))
    model = Classifier(arch, spec.backbone(source_model), spec.feature_dim, num_classes, dropout=dropout)
    if is_classifier_state:
        _load_classifier_state(model, state, state_source)
    cam_layer = model.get_submodule(spec.cam_layer)
    if isinstance(cam_layer, nn.ReLU):
        cam_layer.inplace = False  # Grad-CAM hooks its output; an in-place op would overwrite its input
    return model


# --------------------------------------------------------------------------- introspection


def as_classifier(model: nn.Module) -> Classifier:
    """The :class:`Classifier` inside ``model`` (DDP / compile wrappers removed); TypeError otherwise."""
    net = unwrap(model)
    if not isinstance(net, Classifier):
        raise TypeError(f"expected a cxrlib Classifier (from build_classifier), got {type(net).__name__}")
    return net


def feature_layer(model: nn.Module, arch: str | None = None) -> nn.Module:
    """The module whose output is the GAP feature vector ``(N, D)`` (``model.pool``).

    A forward hook on it captures the features of any forward pass; ``arch`` (optional)
    is checked against the model's own.
    """
    net = as_classifier(model)
    if arch is not None and arch != net.arch:
        raise ValueError(f"model is a {net.arch}, not a {arch}")
    return net.pool


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GAP features ``(N, D)`` float32 of images ``x`` ``(N, 1, H, W)`` in [0, 1] (eval mode, no grad).

    ``D`` is ``ARCHITECTURES[arch].feature_dim`` (512 for ResNet18, 1024 for DenseNet121...).
    These vectors feed the linear head; UMAP and Frechet distances are computed on them.
    """
    net = as_classifier(model)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    try:
        return net.features(x.to(device)).float()
    finally:
        net.train(was_training)


def cam_target_layer(model: nn.Module, arch: str | None = None) -> nn.Module:
    """The last convolutional block of the backbone, the usual Grad-CAM target.

    ``layer4`` for ResNets, ``denseblock4`` for DenseNet121, the ReLU after the last
    convolution for VGG16, the last Fire module for SqueezeNet, ``block4`` for SmallCNN
    (names in :attr:`ArchSpec.cam_layer`).
    """
    net = as_classifier(model)
    arch = arch or net.arch
    if arch != net.arch:
        raise ValueError(f"model is a {net.arch}, not a {arch}")
    return net.get_submodule(_spec(arch).cam_layer)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
