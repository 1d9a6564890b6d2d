"""U-Net lung segmentation training: Dice + cross-entropy, resumable, ready for ``torchrun``.

In a notebook::

    result = train_segmentation(train_df, val_df, RUN_DIR / "segmentation",
                                SegTrainConfig(epochs=EPOCHS, image_size=IMAGE_SIZE, seed=SEED))
    result.history.plot(x="epoch", y=["train_loss", "val_dice"])
    masks = predict_masks(result.model, images, batch_size=16)

On several GPUs (or CPU processes), unchanged::

    torchrun --nproc_per_node 4 -m cxrlib.train.segmentation \\
        --manifest data/phantom/manifest.csv --run-dir runs/seg --epochs 30

The run folder holds ``last.pt`` (every epoch), ``best.pt`` (best validation Dice),
``config.json`` (the resolved settings) and ``history.jsonl`` (one line per epoch).
Calling :func:`train_segmentation` again on the same folder resumes after the last
finished epoch, or only loads when every epoch is done.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cxrlib.config import resolve_device, seed_everything
from cxrlib.models.unet import UNet, UNetConfig
from cxrlib.settings import add_arguments, from_arguments, from_mapping, setting
from cxrlib.train.engine import (
    PRECISION_HELP,
    PRECISIONS,
    DistContext,
    MetricLogger,
    Precision,
    all_reduce_sum,
    as_precision,
    barrier,
    broadcast_buffers,
    cleanup_distributed,
    init_distributed,
    load_checkpoint,
    lr_factor,
    make_loader,
    progress_bar,
    read_checkpoint,
    resolve_precision,
    save_checkpoint,
    seed_epoch,
    set_loader_epoch,
    to_plain,
    unwrap,
    wrap_ddp,
)

#: Names of the foreground label values, used for per-class metric columns.
CLASS_NAMES: dict[int, str] = {1: "lung_left", 2: "lung_right", 3: "heart"}

# Changing these between a checkpoint and a resumed run changes what the weights mean.
_MODEL_FIELDS = ("unet", "include_heart")
# Changing these on resume is expected (more epochs, another machine, quieter output).
_HARMLESS_FIELDS = ("epochs", "device", "num_workers", "progress", "max_steps_per_epoch", "precision", "amp")


@dataclass
class SegTrainConfig:
    """Knobs of :func:`train_segmentation` (saved as ``config.json`` next to checkpoints).

    - ``epochs``, ``batch_size`` (per process), ``lr``, ``weight_decay`` (AdamW).
    - ``schedule``: ``"cosine"`` (learning rate follows half a cosine from ``lr`` towards
      0 over ``epochs``) or ``"step"`` (divided by 10 after 50 % and 75 % of the epochs).
    - ``dice_weight``, ``ce_weight``: loss = ce_weight * cross-entropy + dice_weight *
      (1 - soft Dice averaged over the foreground classes).
    - ``image_size``: images and masks are resized to ``image_size`` x ``image_size``.
    - ``include_heart``: segment the heart as label 3 (4 classes instead of 3).
    - ``unet``: :class:`~cxrlib.models.unet.UNetConfig` fields; ``num_classes`` follows
      ``include_heart`` and ``in_channels`` is 1.
    - ``augment``: random flips, affine and intensity changes of training pairs.
    - ``seed``: weights, data order and augmentation all follow it.
    - ``device``: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"`` (under torchrun each
      process takes the GPU of its local rank).
    - ``num_workers``: DataLoader worker processes; ``progress``: tqdm bars.
    - ``precision``: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"auto"``
      (:func:`~cxrlib.train.engine.resolve_precision`); ``config.json`` records the resolved one.
    - ``amp``: with ``precision="fp32"``, float16 autocast + gradient scaling on CUDA (the
      former switch, kept so existing settings run as before).
    - ``channels_last``: NHWC memory layout (faster convolutions on recent GPUs), CUDA only.
    - ``max_steps_per_epoch``: cap on optimizer steps per epoch (quick runs); ``None``: all.
    - ``partial_labels``: label values beyond the classes that stand for "one of these
      classes" (e.g. ``{4: [0, 3]}``: background or class 3, for a mask source that never drew
      class 3). The loss gives such a pixel the summed probability of its classes and leaves
      it out of those classes' soft Dice (:func:`segmentation_loss`); validation Dice does
      the same (:func:`per_image_dice`).
    """

    epochs: int = setting(10, "number of epochs")
    batch_size: int = setting(8, "images per step and process")
    lr: float = setting(1e-3, "AdamW learning rate")
    weight_decay: float = setting(1e-4, "AdamW weight decay")
    schedule: Literal["cosine", "step"] = setting(
        "cosine", "learning-rate schedule: cosine decay, or /10 after half and three quarters of the epochs")
    dice_weight: float = setting(1.0, "weight of the soft Dice loss")
    ce_weight: float = setting(1.0, "weight of the cross-entropy loss")
    image_size: int = setting(256, "side of the square training images")
    include_heart: bool = setting(False, "also segment the heart (label 3)")
    unet: dict[str, Any] = setting(factory=dict, help="UNetConfig fields (num_classes, in_channels follow the task)")
    augment: bool = setting(True, "random flips, affine and intensity changes of training pairs")
    seed: int = setting(0, "random seed for weights, data order, augmentation")
    device: str = setting("auto", "auto, cpu, cuda or mps (torchrun: GPU of the local rank)")
    num_workers: int = setting(0, "DataLoader worker processes per process")
    progress: bool = setting(True, "progress bars")
    precision: str = setting("fp32", PRECISION_HELP, choices=PRECISIONS)
    amp: bool = setting(True, "with --precision fp32: float16 autocast and gradient scaling on CUDA")
    channels_last: bool = setting(True, "NHWC memory layout (CUDA only)")
    max_steps_per_epoch: int | None = setting(None, "cap on steps per epoch (quick runs)")
    partial_labels: dict[int, list[int]] = setting(
        factory=dict, help="label values that mean 'one of these classes', e.g. {4: [0, 3]}")

    def __post_init__(self) -> None:
        self.partial_labels = check_partial_labels(self.partial_labels, self.num_classes)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"schedule must be 'cosine' or 'step', got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.image_size < 1:
            raise ValueError(f"epochs, batch_size and image_size must be positive: {self}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be None or >= 1, got {self.max_steps_per_epoch}")
        unknown = set(self.unet) - {f.name for f in fields(UNetConfig)}
        if unknown:
            raise ValueError(f"unknown UNetConfig fields in unet: {sorted(unknown)}")
        self.unet_config()  # fail early on contradictory settings

    @property
    def num_classes(self) -> int:
        """Label values 0..num_classes-1: background, two lungs, and the heart if included."""
        return 4 if self.include_heart else 3

    def unet_config(self) -> UNetConfig:
        """The U-Net settings, with ``num_classes`` and ``in_channels`` fixed by the task."""
        for name, wanted in (("num_classes", self.num_classes), ("in_channels", 1)):
            if name in self.unet and self.unet[name] != wanted:
                raise ValueError(
                    f"unet[{name!r}]={self.unet[name]} contradicts the task ({name}={wanted}, "
                    f"include_heart={self.include_heart}); leave it out"
                )
        return UNetConfig(**{**self.unet, "num_classes": self.num_classes, "in_channels": 1})

    def resolved(self) -> SegTrainConfig:
        """A copy whose ``unet`` lists every UNetConfig field (what ``config.json`` shows)."""
        return replace(self, unet=asdict(self.unet_config()))


@dataclass
class SegTrainResult:
    """What :func:`train_segmentation` returns.

    ``model``: the U-Net with the weights of the best validation epoch, in eval mode;
    ``history``: one row per epoch (``epoch``, ``train_loss``, ``val_dice``, ...);
    ``checkpoint_path``: ``best.pt`` of the run; ``precision``: the resolved precision it ran in
    (for ``metrics.json``).
    """

    model: UNet
    history: pd.DataFrame
    best_val_dice: float
    best_epoch: int
    checkpoint_path: Path
    precision: str = "fp32"


# --------------------------------------------------------------------------- loss and metric


def check_partial_labels(partial_labels: Mapping[Any, Sequence[int]] | None,
                         num_classes: int) -> dict[int, list[int]]:
    """``partial_labels`` with int keys (JSON gives strings) and sorted class lists, checked:
    each value is a label value >= ``num_classes`` standing for at least two classes in
    ``0..num_classes-1``."""
    checked: dict[int, list[int]] = {}
    for value, classes in (partial_labels or {}).items():
        value, classes = int(value), sorted({int(c) for c in classes})
        if value < num_classes:
            raise ValueError(f"partial label {value} is a class of its own (classes 0..{num_classes - 1}); "
                             f"use a value >= {num_classes}")
        if len(classes) < 2 or classes[0] < 0 or classes[-1] >= num_classes:
            raise ValueError(f"partial label {value} must stand for two or more of the classes "
                             f"0..{num_classes - 1}, got {classes}")
        checked[value] = classes
    return checked


def allowed_classes(labels: torch.Tensor, num_classes: int,
                    partial_labels: Mapping[int, Sequence[int]] | None = None) -> torch.Tensor:
    """``(N, C, H, W)`` bool: the classes each pixel of ``labels`` ``(N, H, W)`` may belong to
    (one for a class label, several for a partial label). Unknown label values are refused."""
    partial = check_partial_labels(partial_labels, num_classes)
    exact = labels < num_classes
    allowed = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).bool()
    allowed &= exact.unsqueeze(1)
    covered = exact.clone()
    for value, classes in partial.items():
        where = labels == value
        covered |= where
        for c in classes:
            allowed[:, c] |= where
    if not bool(covered.all()) or bool((labels < 0).any()):
        bad = sorted(set(labels[~covered | (labels < 0)].unique().tolist()))
        raise ValueError(f"label values {bad[:5]} are neither classes 0..{num_classes - 1} "
                         f"nor partial labels {sorted(partial)}")
    return allowed


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, dice_weight: float = 1.0,
    ce_weight: float = 1.0, smooth: float = 1.0,
    partial_labels: Mapping[int, Sequence[int]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy plus soft Dice loss over the foreground classes.

    ``logits`` ``(N, C, H, W)`` float, ``labels`` ``(N, H, W)`` int64 in ``0..C-1``, or a
    value of ``partial_labels`` (``{value: [classes]}``: the pixel is one of those classes,
    the source does not say which). A partial pixel's cross-entropy is ``-log`` of the summed
    probability of its classes (the likelihood of what is known), and it is left out of the
    soft Dice of those classes (for every other class it is a negative).
    Soft Dice per foreground class is computed over the whole batch (stable when a class
    is absent from one image), ``smooth`` avoids 0/0. Returns ``(loss, parts)`` with the
    detached ``"ce"`` and ``"dice_loss"`` terms.
    """
    logits = logits.float()  # the loss in float32 even under autocast
    num_classes = logits.shape[1]
    dims = (0, 2, 3)
    if not partial_labels:
        ce = F.cross_entropy(logits, labels)
        probs = logits.softmax(dim=1)
        onehot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
        intersection = (probs * onehot).sum(dims)[1:]
        denominator = probs.sum(dims)[1:] + onehot.sum(dims)[1:]
    else:
        allowed = allowed_classes(labels, num_classes, partial_labels)
        log_probs = logits.log_softmax(dim=1)
        ce = -torch.logsumexp(log_probs.masked_fill(~allowed, float("-inf")), dim=1).mean()
        probs = log_probs.exp()
        exact = (labels < num_classes).unsqueeze(1)
        onehot = (allowed & exact).to(probs.dtype)
        known = (exact | ~allowed).to(probs.dtype)  # is the pixel's membership of class c known?
        intersection = (probs * onehot).sum(dims)[1:]
        denominator = (probs * known).sum(dims)[1:] + onehot.sum(dims)[1:]
    dice_loss = 1.0 - ((2.0 * intersection + smooth) / (denominator + smooth)).mean()
    loss = ce_weight * ce + dice_weight * dice_loss
    return loss, {"ce": ce.detach(), "dice_loss": dice_loss.detach()}


def per_image_dice(pred: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   partial_labels: Mapping[int, Sequence[int]] | None = None) -> torch.Tensor:
    """Dice of each foreground class in each image: ``(N, num_classes - 1)`` float64.

    ``pred``, ``labels``: ``(N, H, W)`` integer label maps. A class absent from both the
    prediction and the truth scores 1 (nothing to find, nothing found). A pixel with a
    partial label (:func:`segmentation_loss`) is left out of the classes it may be.
    """
    known = None
    if partial_labels:
        allowed = allowed_classes(labels, num_classes, partial_labels)
        known = (labels < num_classes).unsqueeze(1) | ~allowed
    scores = []
    for value in range(1, num_classes):
        predicted, true = pred == value, labels == value
        if known is not None:
            predicted = predicted & known[:, value]
        intersection = (predicted & true).sum(dim=(1, 2)).double()
        total = (predicted.sum(dim=(1, 2)) + true.sum(dim=(1, 2))).double()
        scores.append(torch.where(total > 0, 2.0 * intersection / total.clamp(min=1), 1.0))
    return torch.stack(scores, dim=1)


@torch.no_grad()
def evaluate_dice(model: nn.Module, loader: DataLoader, ctx: DistContext, num_classes: int, *,
                  precision: str | Precision = "fp32", channels_last: bool = False,
                  progress: bool = False,
                  partial_labels: Mapping[int, Sequence[int]] | None = None) -> dict[str, float]:
    """Mean foreground Dice of argmax predictions over every sample of ``loader``.

    ``precision``: the autocast of the forward passes (:func:`~cxrlib.train.engine.resolve_precision`);
    ``partial_labels``: as in :func:`per_image_dice`.

    A class is scored on the images whose reference holds it (a reference without the class is
    left out, as ``ignore_empty`` does in MONAI's ``DiceMetric``): otherwise a class that most
    images lack (the lung behind the heart, absent from a visible-convention source) scores 1 on
    each of them while the network predicts nothing, and an untrained network looks best.

    Each rank scores its shard; sums and counts are all-reduced, so every rank returns the
    same numbers. Returns ``{"val_dice": mean over images of the mean over the classes their
    reference holds, "val_dice_<class>": mean over the images that hold it (NaN for none), ...}``.
    """
    net = unwrap(model)  # no DDP hooks: shards may differ in length, no collective inside
    precision = as_precision(precision, ctx.device)
    was_training = net.training
    net.eval()
    n_fg = num_classes - 1
    # [per-class score sums, per-class counts, sum of image means, images with a class]
    totals = torch.zeros(2 * n_fg + 2, dtype=torch.float64, device=ctx.device)
    for images, labels in progress_bar(loader, ctx=ctx, enabled=progress, desc="val", leave=False):
        images = _to_device(images, ctx.device, channels_last)
        labels = labels.to(ctx.device, non_blocking=True)
        with precision.autocast():
            logits = net(images)
        scores = per_image_dice(logits.argmax(dim=1), labels, num_classes, partial_labels)
        present = torch.stack([(labels == value).flatten(1).any(dim=1) for value in range(1, num_classes)],
                              dim=1).to(scores.dtype)
        n_present = present.sum(dim=1)
        totals[:n_fg] += (scores * present).sum(dim=0)
        totals[n_fg:2 * n_fg] += present.sum(dim=0)
        has_any = n_present > 0
        totals[-2] += ((scores * present).sum(dim=1)[has_any] / n_present[has_any]).sum()
        totals[-1] += has_any.sum()
    net.train(was_training)
    reduced = all_reduce_sum(totals, ctx).cpu()
    metrics = {"val_dice": float(reduced[-2]) / max(float(reduced[-1]), 1.0)}
    for value in range(1, num_classes):
        count = float(reduced[n_fg + value - 1])
        metrics[f"val_dice_{CLASS_NAMES.get(value, value)}"] = (float(reduced[value - 1]) / count if count
                                                                 else float("nan"))
    return metrics


def _to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


# --------------------------------------------------------------------------- training


def _as_dataset(data: pd.DataFrame | Dataset, config: SegTrainConfig, root: str | Path | None,
                *, train: bool) -> Dataset:
    """A manifest DataFrame becomes a SegmentationDataset; a Dataset is used as it is."""
    if not isinstance(data, pd.DataFrame):
        return data
    from cxrlib.data.manifest import absolute_paths

    if root is not None:  # deprecated: relative paths given with their folder
        data = absolute_paths(data, root)
    from cxrlib.data.datasets import SegmentationDataset
    from cxrlib.data.transforms import PairedAugment

    augment = PairedAugment() if (train and config.augment) else None
    return SegmentationDataset(data, size=config.image_size, include_heart=config.include_heart,
                               augment=augment, seed=config.seed, cache=True)


def _config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {key: (saved.get(key), value) for key, value in current.items()
            if key in saved and saved[key] != value}


def train_segmentation(
    train_df: pd.DataFrame | Dataset,
    val_df: pd.DataFrame | Dataset,
    run_dir: str | Path,
    config: SegTrainConfig | Mapping[str, Any] | None = None,
    *,
    root: str | Path | None = None,
    resume: bool = True,
    ctx: DistContext | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> SegTrainResult:
    """Train a U-Net to segment the lungs (and optionally the heart); resume if possible.

    ``train_df`` / ``val_df``: manifest rows with masks, paths absolute (read through
    :class:`~cxrlib.data.datasets.SegmentationDataset`), or Datasets that
    yield ``(image float32 (1, H, W) in [0, 1], labels int64 (H, W))``. The validation set
    chooses ``best.pt`` (never the test split). With ``resume=True`` and a ``last.pt`` in
    ``run_dir``, training continues at the epoch after it with the saved optimizer,
    schedule and scaler state; a run whose epochs are all done is only loaded.
    ``resume=False`` starts over and overwrites the folder's checkpoints and history.

    Under ``torchrun`` every process calls this unchanged: the model is wrapped in DDP,
    each rank trains on its shard, metrics are all-reduced and only rank 0 writes files.
    ``ctx`` defaults to :func:`~cxrlib.train.engine.init_distributed` (``config.device``).
    ``on_epoch_end(record)`` is called after each epoch's checkpoint is written (e.g. to
    plot live; raising from it stops training with the checkpoint kept).
    ``root``: deprecated (paths are absolute in memory); relative paths resolve against it.
    """
    if config is None:
        config = SegTrainConfig()
    elif isinstance(config, Mapping):
        config = from_mapping(SegTrainConfig, config, strict=False)
    config = config.resolved()
    ctx = ctx or init_distributed(config.device)
    device = ctx.device
    precision = resolve_precision(config.precision, device, amp=config.amp)
    config = replace(config, precision=precision.name)  # config.json records what ran
    channels_last = config.channels_last and device.type == "cuda"
    run_dir = Path(run_dir)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(config.seed)  # identical initial weights on every rank
    model: nn.Module = UNet(config.unet_config()).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, config.epochs))
    scaler = precision.grad_scaler()
    saved_config = to_plain(asdict(config))
    run_info = {"world_size": ctx.world_size, "device": str(device), "amp": precision.enabled,
                **precision.record(),
                "channels_last": channels_last, "torch_version": str(torch.__version__)}

    start_epoch, step, best_dice, best_epoch = 1, 0, -math.inf, 0
    if resume and last_path.is_file():
        checkpoint = read_checkpoint(last_path)
        changed = _config_differences(checkpoint.get("config") or {}, saved_config)
        clashing = {k: v for k, v in changed.items() if k in _MODEL_FIELDS}
        if clashing:
            raise ValueError(f"{last_path} was trained with other model settings {clashing} (saved, now); "
                             "use another run_dir or resume=False")
        noted = {k: v for k, v in changed.items() if k not in _HARMLESS_FIELDS}
        if noted and ctx.is_main:
            warnings.warn(f"resuming {last_path} with changed settings (saved, now): {noted}; "
                          "optimizer and schedule state come from the checkpoint", stacklevel=2)
        load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start_epoch = int(checkpoint["epoch"]) + 1
        step = int(checkpoint["step"])
        if checkpoint.get("best_metric") is not None:
            best_dice = float(checkpoint["best_metric"])
        best_epoch = int((checkpoint.get("extra") or {}).get("best_epoch", 0))
    logger = MetricLogger(run_dir, enabled=ctx.is_main)
    logger.drop_after(start_epoch - 1)  # epochs logged after the checkpoint will be redone

    best_state: dict[str, torch.Tensor] | None = None
    if start_epoch <= config.epochs:
        train_set = _as_dataset(train_df, config, root, train=True)
        val_set = _as_dataset(val_df, config, root, train=False)
        if len(train_set) == 0 or len(val_set) == 0:
            raise ValueError(f"need training and validation images, got {len(train_set)} and {len(val_set)}")
        train_loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed, ctx=ctx,
                                   num_workers=config.num_workers)
        val_loader = make_loader(val_set, config.batch_size, shuffle=False, seed=config.seed, ctx=ctx,
                                 num_workers=config.num_workers, pad_to_even=False)
        model = wrap_ddp(model, ctx)
        epochs_bar = progress_bar(range(start_epoch, config.epochs + 1), ctx=ctx, enabled=config.progress,
                                  desc="segmentation", unit="epoch", initial=start_epoch - 1,
                                  total=config.epochs)
        for epoch in epochs_bar:
            started = time.perf_counter()
            seed_epoch(config.seed, epoch, ctx.rank)
            set_loader_epoch(train_loader, epoch)
            lr = optimizer.param_groups[0]["lr"]
            train_stats, steps = _train_one_epoch(model, train_loader, optimizer, scaler, config, ctx,
                                                  precision=precision, channels_last=channels_last, epoch=epoch)
            step += steps
            scheduler.step()
            broadcast_buffers(model, ctx)  # every rank evaluates and keeps rank 0's weights
            val_stats = evaluate_dice(model, val_loader, ctx, config.num_classes, precision=precision,
                                      channels_last=channels_last, progress=config.progress,
                                      partial_labels=config.partial_labels)
            improved = val_stats["val_dice"] > best_dice
            if improved:
                best_dice, best_epoch = val_stats["val_dice"], epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}
            record = logger.log({"epoch": epoch, "step": step, "lr": lr, **train_stats, **val_stats,
                                 "best_val_dice": best_dice, "time_s": round(time.perf_counter() - started, 3)})
            if ctx.is_main:
                state = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, epoch=epoch,
                             step=step, best_metric=best_dice, config=saved_config,
                             extra={"best_epoch": best_epoch, "run": run_info})
                save_checkpoint(last_path, **state)
                if improved:
                    save_checkpoint(best_path, **state)
            barrier()
            epochs_bar.set_postfix(loss=f"{train_stats['train_loss']:.3f}", val_dice=f"{val_stats['val_dice']:.3f}")
            if on_epoch_end is not None:
                on_epoch_end(record)
        epochs_bar.close()

    net = unwrap(model)
    if best_state is None and best_path.is_file():  # best epoch came before this session
        best_state = read_checkpoint(best_path)["model"]
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return SegTrainResult(model=net, history=logger.frame(), best_val_dice=float(best_dice),
                          best_epoch=best_epoch, checkpoint_path=best_path, precision=precision.name)


def _train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, config: SegTrainConfig, ctx: DistContext, *,
                     precision: Precision, channels_last: bool, epoch: int) -> tuple[dict[str, float], int]:
    """One pass over ``loader`` (at most ``max_steps_per_epoch`` steps); all-reduced mean losses."""
    model.train()
    total_steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
    # Sums stay on the device: no host synchronisation per step.
    sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # samples, loss, ce, dice_loss
    bar = progress_bar(loader, ctx=ctx, enabled=config.progress, desc=f"epoch {epoch}", total=total_steps,
                       leave=False)
    steps = 0
    for images, labels in bar:
        images = _to_device(images, ctx.device, channels_last)
        labels = labels.to(ctx.device, non_blocking=True).long()
        with precision.autocast():
            logits = model(images)
        # The loss in float32 (a no-op for fp32): soft Dice sums many small terms.
        loss, parts = segmentation_loss(logits.float(), labels, dice_weight=config.dice_weight,
                                        ce_weight=config.ce_weight, partial_labels=config.partial_labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        steps += 1
        batch = images.shape[0]
        sums += torch.stack([torch.tensor(float(batch), device=ctx.device, dtype=torch.float64),
                             loss.detach().double() * batch, parts["ce"].double() * batch,
                             parts["dice_loss"].double() * batch])
        if steps % 10 == 0 or steps == total_steps:
            bar.set_postfix(loss=f"{sums[1].item() / sums[0].item():.3f}")
        if steps >= total_steps:
            break
    bar.close()
    reduced = all_reduce_sum(sums, ctx).cpu()
    count = max(float(reduced[0]), 1.0)
    stats = {"train_loss": float(reduced[1]) / count, "train_ce": float(reduced[2]) / count,
             "train_dice_loss": float(reduced[3]) / count}
    return stats, steps


# --------------------------------------------------------------------------- inference


def load_segmenter(run_dir_or_ckpt: str | Path, device: str | torch.device = "cpu") -> UNet:
    """The U-Net of a run (``best.pt``, else ``last.pt``) or of a checkpoint file, in eval mode.

    The architecture comes from the config stored in the checkpoint; loading uses
    ``weights_only=True``.
    """
    path = Path(run_dir_or_ckpt)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    checkpoint = read_checkpoint(path)
    unet_settings = (checkpoint.get("config") or {}).get("unet")
    if not unet_settings:
        raise ValueError(f"checkpoint {path} has no 'unet' settings in its config; not a segmentation run")
    model = UNet(UNetConfig(**unet_settings))
    model.load_state_dict(checkpoint["model"])
    return model.to(resolve_device(str(device))).eval()


def _image_batches(images: torch.Tensor | np.ndarray | Dataset, batch_size: int):
    """Yield float32 ``(B, 1, H, W)`` batches from an array / tensor or a Dataset."""
    if isinstance(images, Dataset):
        loader = DataLoader(images, batch_size=batch_size, shuffle=False)
        for batch in loader:
            yield (batch[0] if isinstance(batch, list | tuple) else batch).float()
        return
    array = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if array.ndim == 3:
        array = array.unsqueeze(1)
    if array.ndim != 4 or array.shape[1] != 1:
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W), got {tuple(array.shape)}")
    # uint8 images are 0..255; the network was trained on [0, 1].
    array = array.float() / 255.0 if array.dtype == torch.uint8 else array.float()
    for start in range(0, array.shape[0], batch_size):
        yield array[start:start + batch_size]


@torch.no_grad()
def predict_masks(
    model: nn.Module,
    images: torch.Tensor | np.ndarray | Dataset,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    postprocess: bool = True,
    precision: str | Precision = "fp32",
) -> np.ndarray:
    """Label maps ``(N, H, W)`` uint8 (0 background, 1 left lung, 2 right lung, 3 heart).

    ``images``: ``(N, H, W)`` or ``(N, 1, H, W)`` float in [0, 1] or uint8, or a Dataset
    whose items start with such an image (``SegmentationDataset``, ``ImageDataset``).
    ``device``: where to run (``None``: where the model is; the model is moved there).
    ``postprocess`` keeps the largest component of each lung and fills its holes
    (:func:`cxrlib.data.masks.postprocess_labels`). ``precision``: the autocast of the forward
    passes (:func:`~cxrlib.train.engine.resolve_precision`).
    """
    from cxrlib.data.masks import postprocess_labels

    net = unwrap(model)
    target = next(net.parameters()).device if device is None else resolve_device(str(device))
    net.to(target)
    precision = as_precision(precision, target)
    was_training = net.training
    net.eval()
    outputs = []
    for batch in _image_batches(images, batch_size):
        with precision.autocast():
            logits = net(batch.to(target))
        outputs.append(logits.argmax(dim=1).to(torch.uint8).cpu().numpy())
    net.train(was_training)
    if not outputs:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    label_maps = np.concatenate(outputs)
    if postprocess:
        label_maps = np.stack([postprocess_labels(label_map) for label_map in label_maps]).astype(np.uint8)
    return label_maps


# --------------------------------------------------------------------------- command line


def _rows_with_masks(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows with per-lung masks or a union lung mask (others cannot be trained on)."""
    from cxrlib.data.datasets import mask_layout

    keep = [mask_layout(row) is not None for row in manifest.to_dict("records")]
    return manifest[keep]


#: UNetConfig fields the command line does not offer (fixed by the task: one grey channel, the labels).
_CLI_UNET_EXCLUDED = ("in_channels", "num_classes")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m cxrlib.train.segmentation``: the data options, then one
    per :class:`SegTrainConfig` and :class:`~cxrlib.models.unet.UNetConfig` field."""
    parser = argparse.ArgumentParser(
        prog="python -m cxrlib.train.segmentation",
        description="Train the U-Net lung segmenter on the manifest's train split, choose the best epoch "
                    "on its val split. Runs unchanged under `torchrun --nproc_per_node N -m "
                    "cxrlib.train.segmentation ...`. Re-running on the same --run-dir resumes.",
    )
    add = parser.add_argument
    add("--manifest", required=True, type=Path, help="manifest CSV or Parquet (image_id, path, split, mask_path, ...)")
    add("--run-dir", required=True, type=Path, help="folder for last.pt, best.pt, config.json, history.jsonl")
    add("--allow-root", "--root", dest="allow_root", type=Path, action="append", default=[],
        help="data folder outside the manifest's own that its paths may point into (repeatable; "
        "--root is the old spelling)")
    add("--train-split", default="train", help="value of the split column used for training")
    add("--val-split", default="val", help="value of the split column used to choose the best epoch")
    add_arguments(parser, SegTrainConfig, exclude=("unet", "partial_labels"))
    add_arguments(parser, UNetConfig, exclude=_CLI_UNET_EXCLUDED)
    add("--no-resume", action="store_true", help="start over even if --run-dir holds last.pt")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cxrlib.train.segmentation`` (and of torchrun)."""
    args = build_parser().parse_args(argv)
    unet = {f.name: getattr(args, f.name) for f in fields(UNetConfig) if f.name not in _CLI_UNET_EXCLUDED}
    config = from_arguments(SegTrainConfig, args, unet=unet)
    from cxrlib.data.manifest import read_manifest

    # segmentation needs masks, not labels: any label is accepted
    manifest = read_manifest(args.manifest, allowed_roots=args.allow_root, labels=None)
    with_masks = _rows_with_masks(manifest)
    train_df = with_masks[with_masks["split"] == args.train_split]
    val_df = with_masks[with_masks["split"] == args.val_split]
    ctx = init_distributed(config.device)
    try:
        result = train_segmentation(train_df, val_df, args.run_dir, config, resume=not args.no_resume, ctx=ctx)
    finally:
        cleanup_distributed()
    if ctx.is_main:
        print(f"best val Dice {result.best_val_dice:.4f} at epoch {result.best_epoch}; "
              f"{len(train_df)} train / {len(val_df)} val images; checkpoint {result.checkpoint_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
