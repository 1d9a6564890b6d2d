"""CycleGAN training on unpaired chest X-rays: LSGAN + cycle + identity losses, resumable, torchrun-ready.

Zunair & Hamza (2021) train two CycleGANs, Normal -> COVID-19 (``G_NC``) and Pneumonia ->
COVID-19 (``G_PC``). Domain A is the source class, domain B is COVID-19; ``G_AB`` is the
generator that makes the synthetic images. In a notebook::

    result = train_cyclegan(normal_df, covid_df, RUN_DIR / "cyclegan_normal_covid",
                            CycleGANTrainConfig(epochs=EPOCHS, epochs_decay=EPOCHS,
                                                image_size=IMAGE_SIZE, seed=SEED))
    result.history.plot(x="epoch", y=["cycle_A", "cycle_B"])
    synthetic = translate(result.G_AB, normal_images_uint8, batch_size=16)   # (N, H, W) uint8

On several GPUs (or CPU processes), unchanged::

    torchrun --nproc_per_node 4 -m cxrlib.train.cyclegan --manifest data/phantom/manifest.csv \\
        --domain-a Normal --domain-b COVID-19 --run-dir runs/cyclegan_nc

One training step (:meth:`CycleGANTrainer.train_step`) follows the reference
implementation (Zhu et al. 2017, junyanz/pytorch-CycleGAN-and-pix2pix):

1. Generators, discriminators frozen: ``fake_B = G_AB(A)``, ``fake_A = G_BA(B)``,
   ``rec_A = G_BA(fake_B)``, ``rec_B = G_AB(fake_A)``, and the identity images
   ``G_AB(B)``, ``G_BA(A)``. Loss: LSGAN ``(D_B(fake_B) - 1)^2 + (D_A(fake_A) - 1)^2``
   (means over the score maps) + ``lambda_cyc * (|rec_A - A| + |rec_B - B|)`` +
   ``lambda_id * lambda_cyc * (|G_BA(A) - A| + |G_AB(B) - B|)`` (L1 means). The identity
   weight is relative to the cycle weight, as in the reference (``lambda_identity``), so the
   paper's ``lambda_id=1.0`` weighs identity as much as the cycle (10); a Keras-style
   absolute identity weight ``w`` corresponds to ``lambda_id = w / lambda_cyc``.
2. Discriminators: ``D_A`` learns real A -> 1 and ``G_BA(B)`` -> 0, ``D_B`` real B -> 1 and
   ``G_AB(A)`` -> 0, each loss halved; the fakes come through a 50-image
   :class:`ImagePool` (half the time an older fake is shown instead), computed before the
   generator update and detached.

Instance norm is per image, so each generator translates and reproduces (identity) in one
stacked forward pass, and each discriminator scores real and pooled fake images in one; the
results equal separate passes. Adam (2e-4, betas 0.5 / 0.999); the learning rate stays
constant for ``epochs`` epochs, then falls linearly over ``epochs_decay`` more (the
reference's ``niter`` / ``niter_decay`` schedule).

The run folder holds ``last.pt`` (every epoch: the four networks, both optimizers and
schedules, the AMP scaler, both image pools), ``config.json``, ``history.jsonl`` (mean loss
terms per epoch) and ``samples/epoch_NNN.png`` (input / translated / reconstructed images,
both directions). Calling :func:`train_cyclegan` again on the folder resumes after the last
finished epoch, or only loads when every epoch is done.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cxrlib.config import seed_everything
from cxrlib.data.arrays import DomainImageDataset, UnpairedImageDataset, first_image, real_rows
from cxrlib.models.cyclegan import CycleGAN, CycleGANConfig
from cxrlib.settings import add_arguments, from_arguments, from_mapping, setting
from cxrlib.train.cyclegan_inference import load_generator, translate, translation_grid  # noqa: F401 (notebook 03)
from cxrlib.train.engine import (
    PRECISION_HELP,
    PRECISIONS,
    CheckpointError,
    DistContext,
    MetricLogger,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    cleanup_distributed,
    init_distributed,
    load_checkpoint,
    make_loader,
    progress_bar,
    read_checkpoint,
    resolve_precision,
    save_checkpoint,
    seed_epoch,
    set_loader_epoch,
    to_plain,
    wrap_ddp,
)

#: Names of the loss terms a training step returns, in order (also the history columns).
LOSS_TERMS = ("loss_G", "adv_AB", "adv_BA", "cycle_A", "cycle_B", "idt_A", "idt_B", "D_A", "D_B")

# Changing these between a checkpoint and a resumed run changes what the weights mean.
_MODEL_FIELDS = ("model", "image_size")
# Changing these on resume is expected (more epochs, another machine, quieter output).
_HARMLESS_FIELDS = ("epochs", "epochs_decay", "device", "num_workers", "progress", "max_steps_per_epoch",
                    "sample_every", "n_samples", "log_every", "precision", "amp")


@dataclass
class CycleGANTrainConfig:
    """Knobs of :func:`train_cyclegan` (saved as ``config.json`` next to checkpoints).

    Defaults follow Zunair & Hamza (2021) where they report a value (U-Net gf=32, PatchGAN
    df=64, LSGAN, lambda_cyc 10, lambda_id 1.0, Adam 2e-4 / 0.5, batch 16, 100 epochs,
    horizontal flips, 256x256) and the reference implementation where they do not (image
    pool of 50, the constant-then-linear schedule, split here 50 + 50 epochs).

    - ``epochs``: epochs at the full learning rate; ``epochs_decay``: further epochs over
      which it falls linearly towards 0 (total ``epochs + epochs_decay``).
    - ``batch_size`` (per process), ``lr``, ``beta1`` (Adam; beta2 is 0.999).
    - ``lambda_cyc``: weight of each cycle-consistency L1 term; ``lambda_id``: identity
      L1 weight relative to ``lambda_cyc`` (0 switches the identity term off and saves two
      generator passes per step).
    - ``pool_size``: fakes kept for the discriminators (0: always the newest).
    - ``image_size``: side of the square training images (both domains).
    - ``model``: :class:`~cxrlib.models.cyclegan.CycleGANConfig` fields (``image_size``
      follows the field above).
    - ``hflip``: random horizontal flips of training images.
    - ``seed``: weights, pairing, flips and pool draws all follow it.
    - ``device``: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"`` (under torchrun each process
      takes the GPU of its local rank); ``num_workers``: DataLoader worker processes.
    - ``precision``: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"auto"``
      (:func:`~cxrlib.train.engine.resolve_precision`; ``config.json`` holds the resolved one);
      ``amp``: with ``precision="fp32"``, the former CUDA float16 switch; ``channels_last``:
      NHWC layout, CUDA only.
    - ``max_steps_per_epoch``: cap on steps per epoch (quick runs); ``None``: all.
    - ``log_every``: steps between progress-bar updates (the only host synchronisations
      inside an epoch); ``progress``: tqdm bars.
    - ``sample_every``: epochs between sample grids (the last epoch always gets one; 0:
      none); ``n_samples``: images per direction in a grid.
    """

    epochs: int = setting(50, "epochs at the full learning rate")
    epochs_decay: int = setting(50, "further epochs over which the learning rate falls linearly to 0")
    batch_size: int = setting(16, "image pairs per step and process")
    lr: float = setting(2e-4, "Adam learning rate of generators and discriminators")
    beta1: float = setting(0.5, "Adam beta1 (beta2 is 0.999)")
    lambda_cyc: float = setting(10.0, "weight of each cycle-consistency L1 loss")
    lambda_id: float = setting(1.0, "identity L1 weight relative to --lambda-cyc (0: no identity loss)")
    pool_size: int = setting(50, "generated images kept for the discriminators")
    image_size: int = setting(256, "side of the square training images")
    model: dict[str, Any] = setting(factory=dict, help="CycleGANConfig fields (image_size follows the above)")
    hflip: bool = setting(True, "random horizontal flips of training images")
    seed: int = setting(0, "random seed for weights, pairing, flips and pools")
    device: str = setting("auto", "auto, cpu, cuda or mps (torchrun: GPU of the local rank)")
    num_workers: int = setting(0, "DataLoader worker processes per process")
    precision: str = setting("fp32", PRECISION_HELP, choices=PRECISIONS)
    amp: bool = setting(True, "with --precision fp32: float16 autocast and gradient scaling on CUDA")
    channels_last: bool = setting(True, "NHWC memory layout (CUDA only)")
    max_steps_per_epoch: int | None = setting(None, "cap on steps per epoch (quick runs)")
    log_every: int = setting(10, "steps between progress-bar loss updates")
    progress: bool = setting(True, "progress bars")
    sample_every: int = setting(1, "epochs between sample grids in RUN_DIR/samples (0: none)")
    n_samples: int = setting(4, "images per direction in a sample grid")

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.epochs < 0 or self.epochs_decay < 0 or self.epochs + self.epochs_decay < 1:
            raise ValueError(f"need epochs, epochs_decay >= 0 and at least one epoch in all: {self}")
        if self.batch_size < 1 or self.log_every < 1 or self.n_samples < 0 or self.sample_every < 0:
            raise ValueError(f"batch_size and log_every must be positive, n_samples and sample_every >= 0: {self}")
        if self.pool_size < 0 or self.lambda_cyc < 0 or self.lambda_id < 0 or self.lr <= 0:
            raise ValueError(f"pool_size, lambda_cyc and lambda_id must be >= 0 and lr > 0: {self}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be None or >= 1, got {self.max_steps_per_epoch}")
        unknown = set(self.model) - {f.name for f in fields(CycleGANConfig)}
        if unknown:
            raise ValueError(f"unknown CycleGANConfig fields in model: {sorted(unknown)}")
        self.model_config()  # fail early on contradictory settings

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.epochs_decay

    def model_config(self) -> CycleGANConfig:
        """The network settings, with ``image_size`` taken from this config."""
        if "image_size" in self.model and self.model["image_size"] != self.image_size:
            raise ValueError(f"model['image_size']={self.model['image_size']} contradicts "
                             f"image_size={self.image_size}; leave it out of model")
        return CycleGANConfig(**{**self.model, "image_size": self.image_size})

    def resolved(self) -> CycleGANTrainConfig:
        """A copy whose ``model`` lists every CycleGANConfig field (what ``config.json`` shows)."""
        return replace(self, model=asdict(self.model_config()))


def lr_factor(epoch_index: int, epochs: int, epochs_decay: int) -> float:
    """Learning-rate multiplier during the 0-based epoch ``epoch_index`` (the reference rule).

    1 for the first ``epochs`` epochs, then ``1 - k / (epochs_decay + 1)`` in the ``k``-th
    decay epoch, reaching 0 just after the last one (never negative).
    """
    return max(0.0, 1.0 - max(0, epoch_index + 1 - epochs) / float(epochs_decay + 1))


@dataclass
class CycleGANResult:
    """What :func:`train_cyclegan` returns.

    ``G_AB`` (A -> B) and ``G_BA`` (B -> A): the generators after the last epoch, in eval
    mode; ``model``: all four networks; ``history``: one row per epoch (``epoch``, ``lr``,
    the :data:`LOSS_TERMS` means, ``time_s``); ``checkpoint_path``: ``last.pt``; ``precision``:
    the resolved precision it ran in (for ``metrics.json``).
    """

    G_AB: nn.Module
    G_BA: nn.Module
    history: pd.DataFrame
    checkpoint_path: Path
    model: CycleGAN
    precision: str = "fp32"


# --------------------------------------------------------------------------- image pool


class ImagePool:
    """A history of generated images for the discriminator (Shrivastava et al. 2017).

    :meth:`query` takes a batch of fakes ``(N, C, H, W)`` and returns a batch of the same
    shape: while the pool holds fewer than ``size`` images each new fake is stored and
    returned as it is; once full, each fake is returned with probability 1/2, otherwise an
    image drawn uniformly from the pool is returned and the fake takes its place. The pool
    is one preallocated float32 tensor on the device of the first batch; the draws come from
    torch's global CPU generator (seeded per epoch by the training loop), so no value
    crosses from the device to the host. ``size=0`` returns every batch unchanged.
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"pool size must be >= 0, got {size}")
        self.size = int(size)
        self.count = 0
        self.images: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.count

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Fakes for the discriminator: ``(N, C, H, W)`` in, ``(N, C, H, W)`` out (detached)."""
        images = images.detach()
        if self.size == 0:
            return images
        if self.images is None:
            self.images = torch.empty((self.size, *images.shape[1:]), dtype=torch.float32, device=images.device)
        fill = min(images.shape[0], self.size - self.count)
        if fill:
            self.images[self.count:self.count + fill] = images[:fill]
            self.count += fill
        rest = images.shape[0] - fill
        if rest == 0:
            return images
        swaps = (torch.rand(rest) > 0.5).tolist()  # CPU generator: no device synchronisation
        slots = torch.randint(self.size, (rest,)).tolist()
        mixed: torch.Tensor | None = None
        for offset, (swap, slot) in enumerate(zip(swaps, slots, strict=True)):
            if swap:
                if mixed is None:
                    mixed = images.clone()
                mixed[fill + offset] = self.images[slot]
                self.images[slot] = images[fill + offset]
        return images if mixed is None else mixed

    def state_dict(self) -> dict[str, Any]:
        """``{"size", "count", "images": (count, C, H, W) float32 on the CPU}``."""
        stored = self.images[:self.count].cpu() if self.images is not None else torch.empty(0)
        return {"size": self.size, "count": self.count, "images": stored}

    def load_state_dict(self, state: Mapping[str, Any], device: str | torch.device = "cpu") -> None:
        """Restore a :meth:`state_dict` (the pool size must match)."""
        if int(state["size"]) != self.size:
            raise ValueError(f"image pool of size {self.size} cannot take a saved pool of size {state['size']}")
        self.count = int(state["count"])
        self.images = None
        if self.count:
            stored = state["images"]
            self.images = torch.empty((self.size, *stored.shape[1:]), dtype=torch.float32, device=device)
            self.images[:self.count] = stored.to(device)


# --------------------------------------------------------------------------- one training step


def set_requires_grad(nets: Iterable[nn.Module], requires_grad: bool) -> None:
    """Switch gradients of every parameter of ``nets`` on or off (frozen nets cost no weight gradients)."""
    for net in nets:
        for parameter in net.parameters():
            parameter.requires_grad_(requires_grad)


def _adam(parameters: Iterable[nn.Parameter], config: CycleGANTrainConfig, device: torch.device
          ) -> torch.optim.Adam:
    # Fused Adam runs the whole update in a few kernels, and on CUDA it takes the GradScaler's
    # inf check on the device, which saves a host synchronisation per step.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.Adam(parameters, lr=config.lr, betas=(config.beta1, 0.999), fused=fused)


class CycleGANTrainer:
    """The optimisers, schedules, pools and the training step of one CycleGAN.

    ``model``: the four networks, already on ``ctx.device`` (and in channels-last layout
    when used). Under DDP each network is wrapped on its own, so gradients of both
    generators and both discriminators are averaged across ranks; the discriminators are
    called unwrapped while frozen in the generator update. :meth:`train_step` returns the
    detached loss terms (:data:`LOSS_TERMS`) without synchronising with the device.
    """

    def __init__(self, model: CycleGAN, config: CycleGANTrainConfig, ctx: DistContext | None = None) -> None:
        self.config = config
        self.ctx = ctx or DistContext(device=next(model.parameters()).device)
        device = self.ctx.device
        self.model = model
        self.precision = resolve_precision(config.precision, device, amp=config.amp)
        self.G_AB, self.G_BA = wrap_ddp(model.G_AB, self.ctx), wrap_ddp(model.G_BA, self.ctx)
        self.D_A, self.D_B = wrap_ddp(model.D_A, self.ctx), wrap_ddp(model.D_B, self.ctx)
        self.optimizer_G = _adam(itertools.chain(model.G_AB.parameters(), model.G_BA.parameters()), config, device)
        self.optimizer_D = _adam(itertools.chain(model.D_A.parameters(), model.D_B.parameters()), config, device)

        def factor(epoch_index: int) -> float:
            return lr_factor(epoch_index, config.epochs, config.epochs_decay)

        self.scheduler_G = torch.optim.lr_scheduler.LambdaLR(self.optimizer_G, factor)
        self.scheduler_D = torch.optim.lr_scheduler.LambdaLR(self.optimizer_D, factor)
        self.scaler = self.precision.grad_scaler()
        self.pool_A = ImagePool(config.pool_size)  # fake domain-A images G_BA(B), for D_A
        self.pool_B = ImagePool(config.pool_size)  # fake domain-B images G_AB(A), for D_B

    def train(self) -> None:
        self.model.train()

    def train_step(self, real_A: torch.Tensor, real_B: torch.Tensor) -> torch.Tensor:
        """One update of both generators, then of both discriminators.

        ``real_A``, ``real_B``: ``(N, 1, H, W)`` float32 in [-1, 1] on the training device
        (both domains the same shape). Returns the detached loss terms, float32 ``(9,)`` in
        :data:`LOSS_TERMS` order, still on the device.
        """
        config, n = self.config, real_A.shape[0]
        plain_D_A, plain_D_B = self.model.D_A, self.model.D_B
        with_identity = config.lambda_id > 0
        device = real_A.device

        # Generators: the discriminators are frozen (no weight gradients) and used without DDP.
        set_requires_grad((plain_D_A, plain_D_B), False)
        with self.precision.autocast():
            if with_identity:
                fake_B, idt_B = self.G_AB(torch.cat([real_A, real_B])).split(n)
                fake_A, idt_A = self.G_BA(torch.cat([real_B, real_A])).split(n)
            else:
                fake_B, fake_A = self.G_AB(real_A), self.G_BA(real_B)
            rec_A = self.G_BA(fake_B)
            rec_B = self.G_AB(fake_A)
            score_fake_B = plain_D_B(fake_B)
            score_fake_A = plain_D_A(fake_A)
        adv_AB = (score_fake_B.float() - 1.0).square().mean()
        adv_BA = (score_fake_A.float() - 1.0).square().mean()
        cycle_A = (rec_A.float() - real_A).abs().mean()
        cycle_B = (rec_B.float() - real_B).abs().mean()
        loss_G = adv_AB + adv_BA + config.lambda_cyc * (cycle_A + cycle_B)
        if with_identity:
            idt_loss_A = (idt_A.float() - real_A).abs().mean()
            idt_loss_B = (idt_B.float() - real_B).abs().mean()
            loss_G = loss_G + config.lambda_id * config.lambda_cyc * (idt_loss_A + idt_loss_B)
        else:
            idt_loss_A = idt_loss_B = torch.zeros((), device=device)
        self.optimizer_G.zero_grad(set_to_none=True)
        self.scaler.scale(loss_G).backward()
        self.scaler.step(self.optimizer_G)

        # Discriminators: real and (pooled, detached) fake images in one pass each.
        set_requires_grad((plain_D_A, plain_D_B), True)
        pooled_A = self.pool_A.query(fake_A.float()).to(real_A.dtype)  # the pools keep float32 images
        pooled_B = self.pool_B.query(fake_B.float()).to(real_B.dtype)
        with self.precision.autocast():
            score_real_A, score_pooled_A = self.D_A(torch.cat([real_A, pooled_A])).split(n)
            score_real_B, score_pooled_B = self.D_B(torch.cat([real_B, pooled_B])).split(n)
        loss_D_A = 0.5 * ((score_real_A.float() - 1.0).square().mean() + score_pooled_A.float().square().mean())
        loss_D_B = 0.5 * ((score_real_B.float() - 1.0).square().mean() + score_pooled_B.float().square().mean())
        self.optimizer_D.zero_grad(set_to_none=True)
        self.scaler.scale(loss_D_A + loss_D_B).backward()
        self.scaler.step(self.optimizer_D)
        self.scaler.update()
        return torch.stack([loss_G, adv_AB, adv_BA, cycle_A, cycle_B, idt_loss_A, idt_loss_B,
                            loss_D_A, loss_D_B]).detach()

    def end_epoch(self) -> None:
        """Advance both learning-rate schedules by one epoch."""
        self.scheduler_G.step()
        self.scheduler_D.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer_G.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """Optimizers, schedules and pools (the networks and the scaler are saved on their own)."""
        return {"optimizer_G": self.optimizer_G.state_dict(), "optimizer_D": self.optimizer_D.state_dict(),
                "scheduler_G": self.scheduler_G.state_dict(), "scheduler_D": self.scheduler_D.state_dict(),
                "pool_A": self.pool_A.state_dict(), "pool_B": self.pool_B.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.optimizer_G.load_state_dict(state["optimizer_G"])
        self.optimizer_D.load_state_dict(state["optimizer_D"])
        self.scheduler_G.load_state_dict(state["scheduler_G"])
        self.scheduler_D.load_state_dict(state["scheduler_D"])
        self.pool_A.load_state_dict(state["pool_A"], self.ctx.device)
        self.pool_B.load_state_dict(state["pool_B"], self.ctx.device)


# --------------------------------------------------------------------------- sample grids


def _sample_images(dataset: Dataset, count: int, device: torch.device) -> torch.Tensor:
    count = min(count, len(dataset))
    return torch.stack([first_image(dataset[i]) for i in range(count)]).to(device)


# --------------------------------------------------------------------------- training loop


def _as_domain(data: pd.DataFrame | Dataset, config: CycleGANTrainConfig) -> Dataset:
    """A manifest DataFrame becomes a DomainImageDataset; a Dataset is used as it is."""
    if isinstance(data, pd.DataFrame):
        return DomainImageDataset(data, image_size=config.image_size)
    return data


def _config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {key: (saved.get(key), value) for key, value in current.items()
            if key in saved and saved[key] != value}


def _to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def train_cyclegan(
    domain_a: pd.DataFrame | Dataset,
    domain_b: pd.DataFrame | Dataset,
    run_dir: str | Path,
    config: CycleGANTrainConfig | Mapping[str, Any] | None = None,
    *,
    resume: bool = True,
    ctx: DistContext | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> CycleGANResult:
    """Train a CycleGAN between two unpaired image sets; resume if possible.

    ``domain_a`` / ``domain_b``: manifest rows (read once through
    :class:`DomainImageDataset`, paths absolute) or Datasets yielding ``(1, H, W)`` float32
    images in [-1, 1] at ``config.image_size``. Use training-split images only: every image
    the generator sees here must stay out of the classifiers' test split. With
    ``resume=True`` and a ``last.pt`` in ``run_dir``, training continues at the epoch after
    it with the saved optimizers, schedules, scaler and image pools; a run whose epochs are
    all done is only loaded. ``resume=False`` starts over and overwrites the folder's
    checkpoint and history.

    Under ``torchrun`` every process calls this unchanged: the four networks are wrapped in
    DDP, each rank trains on its shard of the pairs (with its own image pools), the loss
    means are all-reduced and only rank 0 writes files. ``ctx`` defaults to
    :func:`~cxrlib.train.engine.init_distributed` (``config.device``). ``on_epoch_end(record)``
    is called after each epoch's checkpoint is written (raising from it stops training with
    the checkpoint kept).
    """
    if config is None:
        config = CycleGANTrainConfig()
    elif isinstance(config, Mapping):
        config = from_mapping(CycleGANTrainConfig, config, strict=False)
    config = config.resolved()
    ctx = ctx or init_distributed(config.device)
    device = ctx.device
    precision = resolve_precision(config.precision, device, amp=config.amp)
    config = replace(config, precision=precision.name)  # config.json records what ran
    channels_last = config.channels_last and device.type == "cuda"
    run_dir = Path(run_dir)
    last_path = run_dir / "last.pt"
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(config.seed)  # identical initial weights on every rank
    model = CycleGAN(config.model_config()).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainer = CycleGANTrainer(model, config, ctx)
    saved_config = to_plain(asdict(config))
    run_info = {"world_size": ctx.world_size, "device": str(device), "amp": precision.enabled,
                **precision.record(),
                "channels_last": channels_last, "torch_version": str(torch.__version__)}

    start_epoch, step = 1, 0
    if resume and last_path.is_file():
        checkpoint = read_checkpoint(last_path)
        saved = dict(checkpoint.get("config") or {})
        if isinstance(saved.get("model"), Mapping):  # fields added since (upsample) take their defaults
            saved["model"] = {**{f.name: f.default for f in fields(CycleGANConfig)}, **saved["model"]}
        changed = _config_differences(saved, saved_config)
        clashing = {k: v for k, v in changed.items() if k in _MODEL_FIELDS}
        if clashing:
            raise ValueError(f"{last_path} was trained with other model settings {clashing} (saved, now); "
                             "use another run_dir or resume=False")
        noted = {k: v for k, v in changed.items() if k not in _HARMLESS_FIELDS}
        if noted and ctx.is_main:
            warnings.warn(f"resuming {last_path} with changed settings (saved, now): {noted}; "
                          "optimizer, schedule and pool state come from the checkpoint", stacklevel=2)
        load_checkpoint(checkpoint, model=model, scaler=trainer.scaler)
        try:
            trainer.load_state_dict(checkpoint["state"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {last_path} does not hold a CycleGAN training state: {exc}") from exc
        start_epoch = int(checkpoint["epoch"]) + 1
        step = int(checkpoint["step"])
    logger = MetricLogger(run_dir, enabled=ctx.is_main)
    logger.drop_after(start_epoch - 1)  # epochs logged after the checkpoint will be redone

    if start_epoch <= config.total_epochs:
        set_a, set_b = _as_domain(domain_a, config), _as_domain(domain_b, config)
        pairs = UnpairedImageDataset(set_a, set_b, seed=config.seed, hflip=config.hflip)
        # The dataset draws the pairing per epoch; the sampler only shards it across ranks.
        loader = make_loader(pairs, config.batch_size, shuffle=False, seed=config.seed, ctx=ctx,
                             num_workers=config.num_workers)
        samples = None
        if ctx.is_main and config.sample_every and config.n_samples:
            samples = (_sample_images(set_a, config.n_samples, device), _sample_images(set_b, config.n_samples, device))
        epochs_bar = progress_bar(range(start_epoch, config.total_epochs + 1), ctx=ctx, enabled=config.progress,
                                  desc="cyclegan", unit="epoch", initial=start_epoch - 1, total=config.total_epochs)
        for epoch in epochs_bar:
            started = time.perf_counter()
            seed_epoch(config.seed, epoch, ctx.rank)
            set_loader_epoch(loader, epoch)
            lr = trainer.lr
            stats, steps = _train_one_epoch(trainer, loader, config, ctx, channels_last=channels_last, epoch=epoch)
            step += steps
            trainer.end_epoch()
            broadcast_buffers(model, ctx)  # no-op for instance norm; keeps ranks equal if buffers appear
            record = {"epoch": epoch, "step": step, "lr": lr, **stats,
                      "time_s": round(time.perf_counter() - started, 3)}
            record = logger.log(record)
            if ctx.is_main:
                if samples is not None and (epoch % config.sample_every == 0 or epoch == config.total_epochs):
                    from cxrlib.data.io import write_png

                    grid = translation_grid(model.G_AB, model.G_BA, *samples, precision=precision)
                    write_png(run_dir / "samples" / f"epoch_{epoch:03d}.png", grid)
                save_checkpoint(last_path, model=model, scaler=trainer.scaler, epoch=epoch, step=step,
                                config=saved_config, extra={"run": run_info, "loss_terms": list(LOSS_TERMS)},
                                state=trainer.state_dict())
            barrier()
            epochs_bar.set_postfix(cycle=f"{stats['cycle_A'] + stats['cycle_B']:.3f}",
                                   D=f"{stats['D_A'] + stats['D_B']:.3f}")
            if on_epoch_end is not None:
                on_epoch_end(record)
        epochs_bar.close()

    model.eval()
    return CycleGANResult(G_AB=model.G_AB, G_BA=model.G_BA, history=logger.frame(), checkpoint_path=last_path,
                          model=model, precision=precision.name)


def _train_one_epoch(trainer: CycleGANTrainer, loader: DataLoader, config: CycleGANTrainConfig,
                     ctx: DistContext, *, channels_last: bool, epoch: int) -> tuple[dict[str, float], int]:
    """One pass over ``loader`` (at most ``max_steps_per_epoch`` steps); all-reduced mean loss terms."""
    trainer.train()
    total_steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
    # Sums stay on the device; the host reads them every log_every steps only.
    sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=ctx.device)
    bar = progress_bar(loader, ctx=ctx, enabled=config.progress, desc=f"epoch {epoch}", total=total_steps,
                       leave=False)
    steps = 0
    for real_A, real_B in bar:
        terms = trainer.train_step(_to_device(real_A, ctx.device, channels_last),
                                   _to_device(real_B, ctx.device, channels_last))
        sums += terms
        steps += 1
        if bar.disable is False and (steps % config.log_every == 0 or steps == total_steps):
            means = (sums / steps).tolist()
            bar.set_postfix({name: f"{value:.3f}" for name, value in zip(LOSS_TERMS, means, strict=True)
                             if name in ("adv_AB", "adv_BA", "cycle_A", "cycle_B", "idt_A", "idt_B", "D_A", "D_B")})
        if steps >= total_steps:
            break
    bar.close()
    counts = torch.tensor([float(steps)], dtype=torch.float64, device=ctx.device)
    reduced = all_reduce_sum(torch.cat([sums, counts]), ctx).cpu()
    count = max(float(reduced[-1]), 1.0)
    return {name: float(reduced[i]) / count for i, name in enumerate(LOSS_TERMS)}, steps


# --------------------------------------------------------------------------- command line


def domain_rows(manifest: pd.DataFrame, label: str, split: str = "train", label_column: str = "label"
                ) -> pd.DataFrame:
    """The real (not synthetic) rows of ``manifest`` with ``label`` in ``split``."""
    return real_rows(manifest, split, [label], label_column=label_column)


#: CycleGANConfig fields the command line does not offer (one grey channel; the size is the config's).
_CLI_MODEL_EXCLUDED = ("in_channels", "out_channels", "image_size")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m cxrlib.train.cyclegan``: the data options, then one per
    :class:`CycleGANTrainConfig` and :class:`~cxrlib.models.cyclegan.CycleGANConfig` field."""
    parser = argparse.ArgumentParser(
        prog="python -m cxrlib.train.cyclegan",
        description="Train a CycleGAN between two labels of a manifest (e.g. Normal -> COVID-19) on its "
                    "training split. Runs unchanged under `torchrun --nproc_per_node N -m cxrlib.train.cyclegan "
                    "...`. Re-running on the same --run-dir resumes.",
    )
    add = parser.add_argument
    add("--manifest", required=True, type=Path, help="manifest CSV or Parquet (image_id, path, label, split, ...)")
    add("--domain-a", required=True, help="label of the source domain A (e.g. Normal); G_AB translates it to B")
    add("--domain-b", required=True, help="label of the target domain B (e.g. COVID-19)")
    add("--run-dir", required=True, type=Path, help="folder for last.pt, config.json, history.jsonl, samples/")
    add("--allow-root", "--root", dest="allow_root", type=Path, action="append", default=[],
        help="data folder outside the manifest's own that its paths may point into (repeatable; "
        "--root is the old spelling)")
    add("--split", default="train", help="value of the split column whose images are used")
    add("--label-column", default="label", help="manifest column that holds the domain labels")
    add_arguments(parser, CycleGANTrainConfig, exclude=("model",))
    add_arguments(parser, CycleGANConfig, exclude=_CLI_MODEL_EXCLUDED)
    add("--no-resume", action="store_true", help="start over even if --run-dir holds last.pt")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cxrlib.train.cyclegan`` (and of torchrun)."""
    args = build_parser().parse_args(argv)
    model = {f.name: getattr(args, f.name) for f in fields(CycleGANConfig) if f.name not in _CLI_MODEL_EXCLUDED}
    config = from_arguments(CycleGANTrainConfig, args, model=model)
    from cxrlib.data.manifest import read_manifest

    # rows are picked by the domain labels given; other labels are left alone, whatever they are
    manifest = read_manifest(args.manifest, allowed_roots=args.allow_root, labels=None)
    rows_a = domain_rows(manifest, args.domain_a, args.split, args.label_column)
    rows_b = domain_rows(manifest, args.domain_b, args.split, args.label_column)
    if len(rows_a) == 0 or len(rows_b) == 0:
        raise SystemExit(f"no {args.split} images for {args.domain_a!r} ({len(rows_a)}) or "
                         f"{args.domain_b!r} ({len(rows_b)}) in {args.manifest}")
    ctx = init_distributed(config.device)
    try:
        result = train_cyclegan(rows_a, rows_b, args.run_dir, config, resume=not args.no_resume, ctx=ctx)
    finally:
        cleanup_distributed()
    if ctx.is_main:
        last = result.history.iloc[-1] if len(result.history) else None
        summary = "" if last is None else f"; last epoch cycle A {last['cycle_A']:.4f}, B {last['cycle_B']:.4f}"
        print(f"{len(rows_a)} {args.domain_a} / {len(rows_b)} {args.domain_b} images{summary}; "
              f"checkpoint {result.checkpoint_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
