"""Using a trained CycleGAN: load one generator, translate images, draw sample grids.

::

    G_NC = load_generator(stage.path_of("03", "G_NC"), "G_AB")  # in a notebook after open_stage
    synthetic = translate(G_NC, normal_images_uint8, batch_size=16)   # (N, H, W) uint8

Training (:mod:`cxrlib.train.cyclegan`) draws its per-epoch sample grids with
:func:`translation_grid`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cxrlib.config import resolve_device
from cxrlib.data.arrays import first_image, to_signed_unit, to_uint8
from cxrlib.models.cyclegan import CycleGANConfig, build_generator
from cxrlib.models.modules import unwrap
from cxrlib.train.engine import CheckpointError, Precision, as_precision, read_checkpoint


def load_generator(ckpt_or_run_dir: str | Path, which: str = "G_AB", device: str | torch.device = "cpu"
                   ) -> nn.Module:
    """One generator of a CycleGAN run (``last.pt``) or checkpoint file, in eval mode.

    ``which``: ``"G_AB"`` (domain A -> B, e.g. Normal -> COVID-19) or ``"G_BA"``. The
    architecture comes from the config stored in the checkpoint; loading uses
    ``weights_only=True`` and leaves torch's global random state untouched.
    """
    if which not in ("G_AB", "G_BA"):
        raise ValueError(f"which must be 'G_AB' or 'G_BA', got {which!r}")
    checkpoint = read_checkpoint(ckpt_or_run_dir)
    settings = (checkpoint.get("config") or {}).get("model")
    if not settings or not isinstance(settings, Mapping) or "generator" not in settings:
        raise ValueError(f"checkpoint {checkpoint['path']} has no CycleGAN 'model' settings in its config")
    with torch.random.fork_rng(devices=[]):
        generator = build_generator(CycleGANConfig(**settings))
    prefix = f"{which}."
    weights = {key[len(prefix):]: value for key, value in checkpoint["model"].items() if key.startswith(prefix)}
    try:
        generator.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {checkpoint['path']}: {which} does not fit its config: {exc}") from exc
    return generator.to(resolve_device(str(device))).eval()


def _translation_batches(images: np.ndarray | torch.Tensor | Dataset, batch_size: int) -> Iterable[torch.Tensor]:
    """Yield float32 ``(B, 1, H, W)`` batches in [-1, 1] from an array / tensor or a Dataset."""
    if isinstance(images, Dataset):
        for batch in DataLoader(images, batch_size=batch_size, shuffle=False):
            yield first_image(batch).float()
        return
    array = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if array.ndim == 3:
        array = array.unsqueeze(1)
    if array.ndim != 4 or array.shape[1] != 1:
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W), got {tuple(array.shape)}")
    for start in range(0, array.shape[0], batch_size):
        chunk = array[start:start + batch_size]
        # uint8 images are 0..255; float images are taken to be in [-1, 1] already.
        yield to_signed_unit(chunk) if chunk.dtype == torch.uint8 else chunk.float()


@torch.no_grad()
def translate(
    generator: nn.Module,
    images: np.ndarray | torch.Tensor | Dataset,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    amp: bool = False,
    precision: str | Precision = "fp32",
) -> np.ndarray:
    """Translate images with one generator: uint8 ``(N, H, W)`` out.

    ``images``: uint8 ``(N, H, W)`` or ``(N, 1, H, W)`` (0..255), a float tensor / array of
    that shape in [-1, 1], or a Dataset whose items are (or start with) ``(1, H, W)`` float
    images in [-1, 1] (:class:`DomainImageDataset`). Sides must suit the generator (a
    multiple of ``2**unet_depth`` for the U-Net). ``device``: where to run (``None``: where
    the generator is; it is moved there). ``precision``: the autocast of the forward passes
    (:func:`~cxrlib.train.engine.resolve_precision`; ``amp=True`` with ``"fp32"``: float16 on CUDA).
    """
    net = unwrap(generator)
    target = next(net.parameters()).device if device is None else resolve_device(str(device))
    net.to(target)
    precision = as_precision(precision, target, amp=amp)
    was_training = net.training
    net.eval()
    outputs = []
    try:
        for batch in _translation_batches(images, batch_size):
            with precision.autocast():
                translated = net(batch.to(target))
            outputs.append(to_uint8(translated[:, 0]).cpu().numpy())
    finally:
        net.train(was_training)
    if not outputs:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    return np.concatenate(outputs)


# --------------------------------------------------------------------------- sample grids


@torch.no_grad()
def translation_grid(G_AB: nn.Module, G_BA: nn.Module, images_A: torch.Tensor, images_B: torch.Tensor, *,
                     amp: bool = False, gap: int = 2, precision: str | Precision = "fp32") -> np.ndarray:
    """A uint8 picture of both translations: one column per image, six rows.

    Rows: A, ``G_AB(A)``, ``G_BA(G_AB(A))``, B, ``G_BA(B)``, ``G_AB(G_BA(B))``. ``images_A``,
    ``images_B``: ``(K, 1, H, W)`` float in [-1, 1] (the same K, H, W), on the generators'
    device. Returns ``(6 H + 5 gap, K W + (K - 1) gap)`` uint8 with white gaps. ``precision``,
    ``amp``: as in :func:`translate`.
    """
    nets = [unwrap(G_AB), unwrap(G_BA)]
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    with as_precision(precision, images_A.device, amp=amp).autocast():
        fake_B = nets[0](images_A)
        rec_A = nets[1](fake_B)
        fake_A = nets[1](images_B)
        rec_B = nets[0](fake_A)
    for net, mode in zip(nets, modes, strict=True):
        net.train(mode)
    rows = [to_uint8(t[:, 0]).cpu().numpy() for t in (images_A, fake_B, rec_A, images_B, fake_A, rec_B)]
    count, height, width = rows[0].shape
    grid = np.full((6 * height + 5 * gap, count * width + (count - 1) * gap), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c in range(count):
            top, left = r * (height + gap), c * (width + gap)
            grid[top:top + height, left:left + width] = row[c]
    return grid
