"""Class activation maps of cxrlib classifiers, through pytorch-grad-cam.

Thin wrappers that fix the things that go wrong with chest X-ray classifiers:

- the target layer is chosen per architecture by name (:func:`cam_layer_names`; the
  default is :attr:`cxrlib.models.classifiers.ArchSpec.cam_layer`, the last convolutional
  block), and any other block can be asked for by name (an earlier block gives a sharper,
  less class-specific map);
- every CAM object is used as a context manager (``with GradCAM(...) as cam``), which
  removes its forward hooks on exit: a CAM made in a loop without it leaves hooks on the
  model that keep every activation alive;
- the model's training / eval mode and gradient switch are restored, and ScoreCAM's
  progress bars are kept out of notebooks;
- grey images are overlaid correctly (:func:`overlay_cam`): ``show_cam_on_image`` expects
  ``(H, W, 3)`` RGB in [0, 1], not the ``(H, W)`` grey image the models take.

Methods (:data:`CAM_METHODS`): ``gradcam`` (Selvaraju et al. 2017, the one Zunair & Hamza
show), ``gradcam++`` (Chattopadhay et al. 2018), ``eigencam`` (first principal component of
the activations: no gradient, not class-specific) and ``scorecam`` (Wang et al. 2020:
channel weights from the class score of the image masked by each channel; one forward
pass per channel, the slowest).

Patch classifiers (Oh, Park & Ye 2020) get :func:`patch_cam`, the probabilistic
Grad-CAM: the CAMs of K lung-centred patches, each weighted by the patch's probability of
the target class, pasted back onto the full image and averaged where they overlap.

.. code-block:: python

    maps = compute_cams(model, images, method="gradcam", target_class=1)   # (N, H, W) in [0, 1]
    rgb = overlay_cam(images[0, 0].numpy(), maps[0])                       # (H, W, 3) uint8
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from cxrlib.data.masks import LungPatchSampler
from cxrlib.data.transforms import resize_image
from cxrlib.models.classifiers import ARCHITECTURES, as_classifier

#: Method name -> pytorch-grad-cam class name (imported when first used).
CAM_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
}

#: Layers offered per architecture, shallow to deep (dotted names inside the Classifier);
#: the last one is the default (``ArchSpec.cam_layer``). VGG16: the ReLU closing each stage;
#: SqueezeNet 1.1: the Fire module closing each stage.
LAYER_CHOICES: dict[str, tuple[str, ...]] = {
    "resnet18": ("backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"),
    "resnet50": ("backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"),
    "densenet121": ("backbone.denseblock1", "backbone.denseblock2", "backbone.denseblock3", "backbone.denseblock4"),
    "vgg16": ("backbone.3", "backbone.8", "backbone.15", "backbone.22", "backbone.29"),
    "squeezenet1_1": ("backbone.4", "backbone.7", "backbone.12"),
}


def cam_layer_names(model: nn.Module) -> list[str]:
    """The layers a CAM can be taken from, shallow to deep; the last is the default.

    SmallCNN: ``backbone.block1`` ... ``backbone.blockK``; ResNets: ``layer1-4``; DenseNet121:
    ``denseblock1-4``; VGG16 and SqueezeNet: the end of each stage (see :data:`LAYER_CHOICES`).
    """
    net = as_classifier(model)
    if net.arch == "small_cnn":
        return [f"backbone.{name}" for name, _ in net.backbone.named_children() if name.startswith("block")]
    return list(LAYER_CHOICES.get(net.arch, (ARCHITECTURES[net.arch].cam_layer,)))


def cam_layer(model: nn.Module, layer: str | None = None) -> nn.Module:
    """The module named ``layer`` (default: the architecture's last convolutional block).

    Raises ``ValueError`` naming the valid choices for an unknown name.
    """
    net = as_classifier(model)
    name = layer or ARCHITECTURES[net.arch].cam_layer
    try:
        return net.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{net.arch} has no layer {name!r}; choose one of {cam_layer_names(net)}") from None


@torch.no_grad()
def cam_resolution(model: nn.Module, image_size: int, layer: str | None = None) -> tuple[int, int]:
    """``(h, w)`` of the feature maps at ``layer`` for ``image_size`` inputs: the CAM's true resolution.

    A CAM is computed on this grid and only upsampled to the image; e.g. SmallCNN's last
    block at 48 px gives 3x3, so no CAM of it can point more finely than a third of the image.
    """
    net = as_classifier(model)
    module = cam_layer(net, layer)
    shapes: list[tuple[int, int]] = []
    handle = module.register_forward_hook(lambda _m, _i, output: shapes.append(tuple(output.shape[-2:])))
    was_training = net.training
    net.eval()
    try:
        device = next(net.parameters()).device
        net(torch.zeros(1, 1, int(image_size), int(image_size), device=device))
    finally:
        handle.remove()
        net.train(was_training)
    return shapes[0]


def _cam_class(method: str):
    import pytorch_grad_cam

    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {list(CAM_METHODS)}")
    return getattr(pytorch_grad_cam, CAM_METHODS[method])


def _as_batch(images: torch.Tensor | npt.ArrayLike) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    tensor = tensor.float()
    if tensor.ndim == 3:
        tensor = tensor[:, None]
    if tensor.ndim != 4:
        raise ValueError(f"images must be (N, 1, H, W) or (N, H, W), got shape {tuple(tensor.shape)}")
    return tensor


def compute_cams(
    model: nn.Module,
    images: torch.Tensor | npt.ArrayLike,
    *,
    method: str = "gradcam",
    target_class: int | Sequence[int] | None = None,
    layer: str | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """CAMs of ``images`` for ``model``: ``(N, H, W)`` float32, each min-max scaled to [0, 1].

    ``images``: ``(N, 1, H, W)`` float in [0, 1] (or ``(N, H, W)``; uint8 is scaled by
    1/255), what the classifier takes. ``target_class``: the class explained, one for all
    images or one per image; ``None`` explains each image's predicted (argmax) class.
    ``layer``: a name from :func:`cam_layer_names` (default: the last block). ``method``:
    a key of :data:`CAM_METHODS`. An all-zero map means the method found no positive
    evidence for the class at that layer. Hooks are removed on return, also on error; the
    parameter gradients the backward passes leave are cleared.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net = as_classifier(model)
    cam_class = _cam_class(method)
    target_layer = cam_layer(net, layer)
    batch = _as_batch(images)
    n = len(batch)
    if target_class is None:
        classes: list[int | None] = [None] * n
    elif isinstance(target_class, int | np.integer):
        classes = [int(target_class)] * n
    else:
        classes = [int(c) for c in target_class]
        if len(classes) != n:
            raise ValueError(f"{len(classes)} target classes for {n} images")
    bad = [c for c in classes if c is not None and not 0 <= c < net.num_classes]
    if bad:
        raise ValueError(f"target classes {sorted(set(bad))} outside 0..{net.num_classes - 1}")
    device = next(net.parameters()).device
    was_training = net.training
    # A hooked in-place ReLU would be overwritten by the next in-place op: switch it off meanwhile.
    inplace = getattr(target_layer, "inplace", None)
    if inplace:
        target_layer.inplace = False
    maps = []
    try:
        with torch.enable_grad(), cam_class(model=net, target_layers=[target_layer]) as cam:
            cam.batch_size = max(1, batch_size)  # ScoreCAM's forward batch (channels per pass)
            for start in range(0, n, batch_size):
                chunk = batch[start:start + batch_size].to(device)
                chunk_classes = classes[start:start + batch_size]
                if all(c is None for c in chunk_classes):
                    targets = None  # pytorch-grad-cam explains the argmax class
                else:
                    predicted = _argmax(net, chunk) if None in chunk_classes else chunk_classes
                    targets = [ClassifierOutputTarget(c if c is not None else int(p))
                               for c, p in zip(chunk_classes, predicted, strict=True)]
                # ScoreCAM prints a tqdm bar per image; keep it out of notebooks and logs
                with contextlib.redirect_stderr(io.StringIO()):
                    maps.append(np.asarray(cam(input_tensor=chunk, targets=targets), dtype=np.float32))
    finally:
        if inplace:
            target_layer.inplace = True
        net.train(was_training)
        net.zero_grad(set_to_none=True)
    if not maps:
        if n:  # pytorch-grad-cam's __exit__ swallows an IndexError raised inside the block
            raise RuntimeError(f"{method} produced no map for {n} image(s) at layer {layer or 'default'}")
        return np.zeros((0, *batch.shape[-2:]), dtype=np.float32)
    result = np.concatenate(maps)
    if len(result) != n:
        raise RuntimeError(f"{method} produced {len(result)} maps for {n} images at layer {layer or 'default'}")
    return np.nan_to_num(result, nan=0.0).clip(0.0, 1.0)


@torch.no_grad()
def _argmax(net: nn.Module, batch: torch.Tensor) -> list[int]:
    return net(batch).argmax(dim=1).tolist()


@torch.no_grad()
def predict_classes(model: nn.Module, images: torch.Tensor | npt.ArrayLike, batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities ``(N, C)`` float64 of ``images`` (``(N, 1, H, W)`` in [0, 1]), eval mode."""
    net = as_classifier(model)
    batch = _as_batch(images)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    try:
        parts = [torch.softmax(net(batch[s:s + batch_size].to(device)), dim=1).double().cpu().numpy()
                 for s in range(0, len(batch), batch_size)]
    finally:
        net.train(was_training)
    return np.concatenate(parts) if parts else np.zeros((0, net.num_classes))


def overlay_cam(image: npt.ArrayLike, cam: npt.ArrayLike, *, image_weight: float = 0.5) -> np.ndarray:
    """A CAM drawn over a grey image: ``(H, W, 3)`` uint8 RGB (jet colour map, pytorch-grad-cam's blend).

    ``image``: ``(H, W)`` uint8 (0..255) or float in [0, 1]; ``cam``: ``(h, w)`` in [0, 1],
    resized to the image (bilinear). The grey image is copied into R, G and B first:
    ``show_cam_on_image`` needs an RGB float image and would otherwise broadcast a 2-D image
    wrongly. ``image_weight``: share of the image in the blend (1 shows the image alone).
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    grey = np.asarray(image)
    if grey.ndim != 2:
        raise ValueError(f"image must be a grey (H, W) array, got shape {grey.shape}")
    grey = grey.astype(np.float32) / 255.0 if grey.dtype == np.uint8 else grey.astype(np.float32)
    if grey.size and (grey.min() < 0 or grey.max() > 1):
        raise ValueError("a float image must lie in [0, 1]")
    heat = np.asarray(cam, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"cam must be (h, w), got shape {heat.shape}")
    if heat.shape != grey.shape:
        heat = resize_image(heat, grey.shape)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    return show_cam_on_image(rgb, np.clip(heat, 0.0, 1.0), use_rgb=True, image_weight=image_weight)


# --------------------------------------------------------------------------- patches


@dataclass
class PatchCAM:
    """Probabilistic patch CAM of one image (Oh et al. 2020).

    ``cam``: ``(S, S)`` float64 on the patch dataset's ``source_size`` grid, min-max scaled
    to [0, 1] (all 0 when no patch has evidence); ``centres``: ``(K, 2)`` patch centres;
    ``probabilities``: ``(K,)`` each patch's probability of the target class;
    ``patch_maps``: ``(K, p, p)`` the per-patch CAMs at the patch's side ``p`` on that grid.
    """

    cam: np.ndarray
    centres: np.ndarray
    probabilities: np.ndarray
    patch_maps: np.ndarray


def patch_cam(
    model: nn.Module,
    dataset,
    index: int,
    *,
    target_class: int,
    k: int = 20,
    method: str = "gradcam",
    layer: str | None = None,
    weight_by_probability: bool = True,
    seed: int | None = None,
) -> PatchCAM:
    """Probabilistic Grad-CAM of image ``index`` of a patch-mode ``ClassificationDataset``.

    K lung-centred patches are drawn as at test time (``dataset.patches(index, k, seed)``),
    one CAM is computed per patch at the network's input size, resized to the patch's
    side on the ``source_size`` grid, multiplied by the patch's probability of
    ``target_class`` (``weight_by_probability``; Oh et al. weight each patch map by it) and
    pasted back with :meth:`~cxrlib.data.masks.LungPatchSampler.paste_back`, which averages
    overlapping patches. Pixels no patch covers stay 0.
    """
    if getattr(dataset, "input_mode", None) != "patch":
        raise ValueError("patch_cam needs a ClassificationDataset with input_mode='patch'")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    patches, centres = dataset.patches(index, k, seed)
    maps = compute_cams(model, patches, method=method, target_class=target_class, layer=layer)
    probabilities = predict_classes(model, patches)[:, int(target_class)]
    image, _ = dataset.stored(index)
    side = dataset.patch_sampler.patch_size_for(image.shape)
    patch_maps = np.stack([resize_image(m, side) for m in maps]).astype(np.float64)
    weighted = patch_maps * (probabilities[:, None, None] if weight_by_probability else 1.0)
    full = LungPatchSampler.paste_back(weighted, centres, image.shape)
    peak = full.max()
    return PatchCAM(cam=full / peak if peak > 0 else full, centres=centres, probabilities=probabilities,
                    patch_maps=patch_maps)


__all__ = ["CAM_METHODS", "LAYER_CHOICES", "PatchCAM", "cam_layer", "cam_layer_names", "cam_resolution", "compute_cams",
           "overlay_cam", "patch_cam", "predict_classes"]
