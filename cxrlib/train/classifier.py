"""Image classifier training under class imbalance: resumable, seeded, ready for ``torchrun``.

In a notebook::

    config = ClassifierTrainConfig(arch="resnet18", classes=["Normal", "COVID-19"],
                                   weights="imagenet", image_size=IMAGE_SIZE, epochs=EPOCHS,
                                   imbalance="weighted_loss", seed=SEED)
    result = train_classifier(train_df, val_df, RUN_DIR / "classifier", config)
    test_prob = predict_proba(result, test_df)            # (N, 2); column 1 = COVID-19
    metrics = binary_metrics(test_labels, test_prob, result.threshold)   # val-chosen threshold

On several GPUs (or CPU processes), unchanged::

    torchrun --nproc_per_node 4 -m cxrlib.train.classifier --manifest manifest.csv \\
        --run-dir runs/clf --arch resnet50 --classes Normal COVID-19 --epochs 30

The validation split alone chooses the best epoch (``select_metric``: ROC AUC, macro AUC
for more than two classes), stops training early (``patience``) and fixes the binary
operating thresholds (Youden's J and 95 % specificity); the test split is never seen here.
The run folder holds ``last.pt`` (every epoch), ``best.pt`` (best validation epoch, with
its thresholds), ``config.json`` (resolved settings) and ``history.jsonl``. Calling
:func:`train_classifier` again on the folder resumes after the last finished epoch, or
only loads a finished run.

Imbalance (``imbalance``): ``"weighted_loss"`` weights the cross-entropy by inverse class
frequency (sklearn's "balanced" weights); ``"balanced_sampler"`` oversamples minority
classes (:class:`~cxrlib.data.classification.BalancedClassSampler`, which shards one
balanced draw across DDP ranks); ``"none"`` trains on the raw distribution.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cxrlib.config import dataloader_generator, resolve_device, seed_everything, seed_worker
from cxrlib.data.classification import (
    INPUT_MODES,
    BalancedClassSampler,
    ClassificationDataset,
    PatchStack,
    evaluation_view,
    make_augment,
    make_label_map,
)
from cxrlib.data.masks import LungPatchSampler
from cxrlib.evaluate.classification import choose_thresholds
from cxrlib.models.classifiers import ARCHITECTURES, Classifier, build_classifier
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

# Changing these between a checkpoint and a resumed run changes what the weights mean.
_MODEL_FIELDS = ("arch", "classes", "num_classes", "input_mode", "image_size")
# Changing these on resume is expected (more epochs, another machine, quieter output).
_HARMLESS_FIELDS = ("epochs", "patience", "device", "num_workers", "progress", "max_steps_per_epoch", "precision",
                    "amp")
_SELECT_METRICS = ("auc", "balanced_accuracy", "loss")
_IMBALANCE = ("weighted_loss", "balanced_sampler", "none")


@dataclass
class ClassifierTrainConfig:
    """Knobs of :func:`train_classifier` (saved as ``config.json`` next to checkpoints).

    Model:
    - ``arch``: a key of :data:`cxrlib.models.classifiers.ARCHITECTURES`; ``weights``:
      ``None``, ``"imagenet"`` (torch hub cache, never downloaded) or a file path;
      ``dropout`` before the last layer.
    - ``classes``: class names in index order (binary: index 1 is the positive class,
      e.g. ``["Normal", "COVID-19"]``); ``None`` takes the sorted labels of the training
      rows. ``num_classes`` follows ``classes`` when given.

    Inputs:
    - ``image_size``: network input side in pixels; ``input_mode``: ``"whole"``,
      ``"lung_masked"``, ``"lung_crop"``, ``"lungs_removed"`` or ``"patch"``
      (:mod:`cxrlib.data.classification`); ``mask_column``: where lung masks come from
      (``None``: the segmentation stage's column; ``"ground_truth"``: reference masks).
    - Patch mode (Oh et al. 2020): images are cached at ``patch_source_size`` (the paper
      uses 1024, which costs 1 MiB of memory per image; 512 by default); patches of
      ``patch_size`` px at a ``patch_reference_size`` image (224 of 1024 in the paper,
      scaled with the image: 112 px at 512) are centred on lung pixels and resized to
      ``image_size``; validation and :func:`predict_proba` average ``eval_patches``
      patches per image (the paper votes over 100 at test time).
    - ``augment``: ``"none"``, ``"light"`` (flip, small affine, intensity) or ``"heavy"``
      (Minaee et al.-style stronger geometry and intensity).

    Optimisation:
    - ``epochs``, ``batch_size`` (per process), ``lr``, ``weight_decay`` (AdamW),
      ``schedule``: ``"cosine"``, ``"step"`` (/10 at 50 % and 75 %) or ``"constant"``.
    - ``imbalance``: ``"weighted_loss"``, ``"balanced_sampler"`` or ``"none"``.
    - ``patience``: stop after this many epochs without a better validation metric
      (``None``: never); ``select_metric``: ``"auc"`` (ROC AUC; macro one-vs-rest AUC for
      more than two classes), ``"balanced_accuracy"`` or ``"loss"`` (lower is better).

    Runtime:
    - ``seed`` (weights, order, augmentation, patches); ``device`` (``"auto"``, ``"cpu"``,
      ``"cuda"``...; under torchrun the local rank's GPU); ``precision`` (``"fp32"``, ``"bf16"``,
      ``"fp16"``, ``"auto"``: :func:`~cxrlib.train.engine.resolve_precision`; the resolved one is
      saved); ``amp`` (with ``precision="fp32"``: the former CUDA float16 switch) and
      ``channels_last`` (CUDA only); ``num_workers``; ``max_steps_per_epoch`` (quick runs); ``progress``.
    """

    arch: str = setting("resnet18", "network architecture", choices=sorted(ARCHITECTURES))
    num_classes: int = setting(2, "number of classes (follows classes when given)")
    classes: list[str] | None = setting(None, "class names in index order (binary: the second is positive); "
                                              "rows with other labels are left out. Default: every label, sorted")
    weights: str | None = setting(None, "'imagenet' (from the torch hub cache) or a weights file; default random")
    dropout: float = setting(0.0, "dropout before the last layer")
    image_size: int = setting(224, "side of the network input in pixels")
    input_mode: str = setting("whole", "what the classifier sees", choices=INPUT_MODES)
    mask_column: str | None = setting(None, "lung mask column for the lung modes ('ground_truth': reference masks)")
    patch_size: int = setting(224, "patch side at --patch-reference-size")
    patch_reference_size: int = setting(1024, "image side patch-size refers to")
    patch_source_size: int = setting(512, "side patches are cut from")
    eval_patches: int = setting(10, "patches averaged per image when validating")
    augment: str = setting("light", "training augmentation", choices=("none", "light", "heavy"))
    epochs: int = setting(20, "most epochs to train")
    batch_size: int = setting(16, "images per step and process")
    lr: float = setting(3e-4, "AdamW learning rate")
    weight_decay: float = setting(1e-4, "AdamW weight decay")
    schedule: Literal["cosine", "step", "constant"] = setting("cosine", "learning-rate schedule")
    imbalance: Literal["weighted_loss", "balanced_sampler", "none"] = setting(
        "weighted_loss", "how class imbalance is handled")
    patience: int | None = setting(5, "early stopping: epochs without improvement (None, or 0 on the "
                                      "command line: never)")
    select_metric: Literal["auc", "balanced_accuracy", "loss"] = setting("auc", "validation metric to select by")
    seed: int = setting(0, "random seed for weights, data order, augmentation")
    device: str = setting("auto", "auto, cpu, cuda or mps (torchrun: GPU of the local rank)")
    precision: str = setting("fp32", PRECISION_HELP, choices=PRECISIONS)
    amp: bool = setting(True, "with --precision fp32: float16 autocast and gradient scaling on CUDA")
    channels_last: bool = setting(True, "NHWC memory layout (CUDA only)")
    num_workers: int = setting(0, "DataLoader worker processes per process")
    max_steps_per_epoch: int | None = setting(None, "cap on steps per epoch (quick runs)")
    progress: bool = setting(True, "progress bars")

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}")
        if self.imbalance not in _IMBALANCE:
            raise ValueError(f"imbalance must be one of {_IMBALANCE}, got {self.imbalance!r}")
        if self.select_metric not in _SELECT_METRICS:
            raise ValueError(f"select_metric must be one of {_SELECT_METRICS}, got {self.select_metric!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}")
        if isinstance(self.augment, bool):
            self.augment = "light" if self.augment else "none"
        make_augment(self.augment)  # fails early on an unknown preset
        if self.classes is not None:
            self.classes = [str(name) for name in self.classes]
            make_label_map(self.classes)
            self.num_classes = len(self.classes)
        if self.num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.num_classes}")
        for name in ("epochs", "batch_size", "image_size", "eval_patches", "patch_size", "patch_source_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be None or >= 1, got {self.patience}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be None or >= 1, got {self.max_steps_per_epoch}")

    def label_map(self) -> dict[str, int]:
        """Class name -> index (needs ``classes``; see :meth:`resolved`)."""
        if self.classes is None:
            raise ValueError("classes are not set; resolve the config against the training labels first")
        return make_label_map(self.classes)

    def resolved(self, labels: Sequence[str] | None = None) -> ClassifierTrainConfig:
        """A copy with ``classes`` filled (sorted distinct ``labels`` when not set)."""
        if self.classes is not None:
            return replace(self)
        if labels is None:
            raise ValueError("classes are not set and no labels were given to take them from")
        classes = sorted({str(label) for label in labels})
        if len(classes) != self.num_classes:
            raise ValueError(f"the training labels have {len(classes)} classes {classes}, config says "
                             f"num_classes={self.num_classes}; set classes=[...] explicitly")
        if len(classes) == 2:
            warnings.warn(f"classes taken from the sorted training labels: {classes}; {classes[1]!r} is the "
                          "positive class of the thresholds and binary metrics. Set classes=[negative, "
                          "positive] to choose", stacklevel=3)
        return replace(self, classes=classes)

    def patch_sampler(self) -> LungPatchSampler:
        return LungPatchSampler(patch_size=self.patch_size, scale_with_image=True,
                                reference_size=self.patch_reference_size)


@dataclass
class ClassifierTrainResult:
    """A trained classifier and what it was chosen by (also what :func:`load_classifier` gives).

    ``model``: weights of the best validation epoch, eval mode. ``history``: one row per
    epoch (``epoch``, ``train_loss``, ``val_loss``, ``val_auc``, ...). ``best_epoch``,
    ``best_val_metric`` (``config.select_metric``). ``thresholds``: binary only,
    ``{"youden": t, "spec95": t}`` chosen on the best epoch's validation predictions;
    ``threshold`` the default (Youden); ``None`` for multiclass (argmax).
    """

    model: Classifier
    history: pd.DataFrame
    best_epoch: int
    best_val_metric: float
    threshold: float | None
    thresholds: dict[str, float]
    checkpoint_path: Path
    config: ClassifierTrainConfig
    classes: list[str] = field(default_factory=list)

    def dataset(self, data: pd.DataFrame, *, strict_labels: bool = False) -> ClassificationDataset:
        """An un-augmented dataset of ``data`` prepared as in training (mode, size, masks)."""
        return make_dataset(data, self.config, train=False, strict_labels=strict_labels)


# --------------------------------------------------------------------------- data


def make_dataset(data: pd.DataFrame, config: ClassifierTrainConfig, *,
                 train: bool, strict_labels: bool = True, progress: bool = False) -> ClassificationDataset:
    """The :class:`ClassificationDataset` a config describes (augmented when ``train``)."""
    return ClassificationDataset(
        data, image_size=config.image_size, label_map=config.label_map(),
        input_mode=config.input_mode, augment=config.augment if train else None, seed=config.seed,
        cache=True, mask_column=config.mask_column, patch_sampler=config.patch_sampler(),
        source_size=config.patch_source_size, strict_labels=strict_labels, progress=progress,
    )


def _as_dataset(data: pd.DataFrame | Dataset, config: ClassifierTrainConfig,
                *, train: bool, ctx: DistContext) -> Dataset:
    if not isinstance(data, pd.DataFrame):
        return data
    return make_dataset(data, config, train=train, progress=config.progress and ctx.is_main)


def _dataset_labels(dataset: Dataset) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]
    return np.asarray(labels, dtype=np.int64)


def _train_loader(dataset: Dataset, labels: np.ndarray, config: ClassifierTrainConfig,
                  ctx: DistContext) -> DataLoader:
    """Shuffled loader (engine.make_loader), or the balanced sampler with the same settings."""
    if config.imbalance != "balanced_sampler":
        return make_loader(dataset, config.batch_size, shuffle=True, seed=config.seed, ctx=ctx,
                           num_workers=config.num_workers)
    sampler = BalancedClassSampler(labels, num_replicas=ctx.world_size, rank=ctx.rank, seed=config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
                      worker_init_fn=seed_worker, generator=dataloader_generator(config.seed),
                      pin_memory=ctx.device.type == "cuda", persistent_workers=False)


def _class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (C * count_c)`` (sklearn's ``"balanced"``), float32 ``(C,)``."""
    from sklearn.utils.class_weight import compute_class_weight

    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"every class needs training images; counts per class: {counts.tolist()}")
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=labels[labels >= 0])
    return torch.tensor(weights, dtype=torch.float32)


def _to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _lr_lambda(schedule: str, epochs: int) -> Callable[[int], float]:
    return (lambda epoch: 1.0) if schedule == "constant" else lr_factor(schedule, epochs)


# --------------------------------------------------------------------------- evaluation


def _gather(parts: list[Any], ctx: DistContext) -> list[Any]:
    """Every rank's ``parts`` (small NumPy arrays), rank order; one-process: ``[parts]``."""
    if not ctx.is_distributed:
        return [parts]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, parts)
    return gathered


@torch.no_grad()
def _predict_loader(net: nn.Module, loader: DataLoader, device: torch.device, *, precision: Precision,
                    channels_last: bool, progress: bool, ctx: DistContext | None = None,
                    desc: str = "predict") -> tuple[np.ndarray, np.ndarray | None]:
    """Softmax probabilities ``(n, C)`` float64 for the loader's items, in loader order.

    Items are ``(image (1, H, W), label, ...)`` or, from :class:`PatchStack`,
    ``(patches (k, 1, H, W), label, index)``: patch probabilities are averaged per image
    and the per-class vote shares are returned as the second value ``(n, C)``.
    """
    probs, votes = [], []
    for batch in progress_bar(loader, ctx=ctx, enabled=progress, desc=desc, leave=False):
        images = batch[0] if isinstance(batch, list | tuple) else batch
        stacked = images.ndim == 5
        if stacked:
            n_images, k = images.shape[:2]
            images = images.flatten(0, 1)
        with precision.autocast():
            logits = net(_to_device(images, device, channels_last))
        prob = logits.float().softmax(dim=1)
        if stacked:
            prob = prob.view(n_images, k, -1)
            votes.append(F.one_hot(prob.argmax(dim=2), prob.shape[2]).double().mean(dim=1).cpu())
            prob = prob.mean(dim=1)
        probs.append(prob.double().cpu())
    if not probs:
        num_classes = getattr(unwrap(net), "num_classes", 0)
        return np.zeros((0, num_classes)), np.zeros((0, num_classes))
    return torch.cat(probs).numpy(), (torch.cat(votes).numpy() if votes else None)


def _validation_loader(val_set: Dataset, config: ClassifierTrainConfig, ctx: DistContext) -> DataLoader:
    dataset: Dataset = val_set
    batch_size = config.batch_size
    if isinstance(val_set, ClassificationDataset) and val_set.input_mode == "patch":
        dataset = PatchStack(val_set, config.eval_patches, seed=config.seed)
        batch_size = max(1, config.batch_size // config.eval_patches)
    return make_loader(dataset, batch_size, shuffle=False, seed=config.seed, ctx=ctx,
                       num_workers=config.num_workers, pad_to_even=False)


def validation_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """``val_loss`` (mean cross-entropy), ``val_auc`` (binary ROC AUC / macro one-vs-rest AUC),
    ``val_balanced_accuracy`` (argmax), and for two classes ``val_pr_auc``.

    ``y`` ``(N,)`` int, ``prob`` ``(N, C)`` probabilities. AUCs are NaN when a class is absent.
    """
    from cxrlib.evaluate.classification import binary_metrics, multiclass_metrics

    loss = float(-np.mean(np.log(np.clip(prob[np.arange(len(y)), y], 1e-12, 1.0)))) if len(y) else float("nan")
    summary = multiclass_metrics(y, prob)
    metrics = {"val_loss": loss, "val_auc": float(summary["macro_auc"]),
               "val_balanced_accuracy": float(summary["balanced_accuracy"])}
    if prob.shape[1] == 2:
        metrics["val_pr_auc"] = binary_metrics(y, prob, 0.5)["pr_auc"]
    return metrics


def _evaluate(model: nn.Module, loader: DataLoader, labels: np.ndarray, ctx: DistContext, *, precision: Precision,
              channels_last: bool, progress: bool) -> tuple[dict[str, float], np.ndarray]:
    """Validation metrics and the full ``(N, C)`` probabilities, identical on every rank."""
    net = unwrap(model)  # no DDP hooks: shards may differ in length
    was_training = net.training
    net.eval()
    prob, _ = _predict_loader(net, loader, ctx.device, precision=precision, channels_last=channels_last,
                              progress=progress, ctx=ctx, desc="val")
    net.train(was_training)
    indices = np.fromiter(iter(loader.sampler), dtype=np.int64)
    full = np.zeros((len(labels), prob.shape[1]))
    for rank_indices, rank_prob in _gather([indices, prob], ctx):
        full[rank_indices] = rank_prob
    return validation_metrics(labels, full), full


def _is_better(value: float, best: float, metric: str) -> bool:
    if not math.isfinite(value):
        return False
    return value < best if metric == "loss" else value > best


# --------------------------------------------------------------------------- training


def _config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {key: (saved.get(key), value) for key, value in current.items()
            if key in saved and saved[key] != value}


def _check_validation_classes(labels: np.ndarray, num_classes: int, metric: str) -> None:
    present = np.unique(labels[labels >= 0])
    if metric != "loss" and len(present) < num_classes:
        raise ValueError(f"the validation split has classes {present.tolist()} of {num_classes}: AUC and "
                         "balanced accuracy need every class; re-split by patient or use select_metric='loss'")


def train_classifier(
    train_df: pd.DataFrame | Dataset,
    val_df: pd.DataFrame | Dataset,
    run_dir: str | Path,
    config: ClassifierTrainConfig | Mapping[str, Any] | None = None,
    *,
    resume: bool = True,
    ctx: DistContext | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> ClassifierTrainResult:
    """Train an image classifier, choosing everything on the validation split; resume if possible.

    ``train_df`` / ``val_df``: manifest rows (``path``, ``label``, plus mask columns for the
    lung modes; paths absolute; read through
    :class:`~cxrlib.data.classification.ClassificationDataset`), or Datasets yielding ``(image float32 (1, H, W) in [0, 1], label int)``
    that have a ``labels`` array. ``config.classes`` fixes the class order (binary: index
    1 positive). With ``resume=True`` and ``last.pt`` in ``run_dir``, training continues
    after the saved epoch with the saved optimizer, schedule and scaler state (the same
    weights as an uninterrupted run on CPU); a finished or early-stopped run is only
    loaded. ``resume=False`` starts over and overwrites the folder.

    Under ``torchrun`` every process calls this unchanged (DDP; metrics gathered across
    ranks; rank 0 writes). ``on_epoch_end(record)`` runs after each epoch's checkpoint.
    """
    if config is None:
        config = ClassifierTrainConfig()
    elif isinstance(config, Mapping):
        config = from_mapping(ClassifierTrainConfig, config, strict=False)
    train_labels_raw = train_df["label"].astype(str).tolist() if isinstance(train_df, pd.DataFrame) else None
    if config.classes is None and train_labels_raw is None:
        raise ValueError("config.classes must be set when training from Datasets")
    config = config.resolved(train_labels_raw)
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
    with warnings.catch_warnings():
        if not ctx.is_main:
            warnings.simplefilter("ignore")  # one warning about missing weights, from rank 0
        model: nn.Module = build_classifier(config.arch, config.num_classes, weights=config.weights,
                                            dropout=config.dropout).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.schedule, config.epochs))
    scaler = precision.grad_scaler()
    saved_config = to_plain(asdict(config))
    run_info = {"world_size": ctx.world_size, "device": str(device), "amp": precision.enabled,
                **precision.record(),
                "channels_last": channels_last, "torch_version": str(torch.__version__)}

    lower_is_better = config.select_metric == "loss"
    start_epoch, step, best_epoch = 1, 0, 0
    best_metric = math.inf if lower_is_better else -math.inf
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
            best_metric = float(checkpoint["best_metric"])
        best_epoch = int((checkpoint.get("extra") or {}).get("best_epoch", 0))
    logger = MetricLogger(run_dir, enabled=ctx.is_main)
    logger.drop_after(start_epoch - 1)  # epochs logged after the checkpoint will be redone

    def patience_spent(epoch: int) -> bool:
        return config.patience is not None and best_epoch > 0 and epoch - best_epoch >= config.patience

    best_state: dict[str, torch.Tensor] | None = None
    best_thresholds: dict[str, float] = {}
    if start_epoch <= config.epochs and not patience_spent(start_epoch - 1):
        train_set = _as_dataset(train_df, config, train=True, ctx=ctx)
        val_set = _as_dataset(val_df, config, train=False, ctx=ctx)
        if len(train_set) == 0 or len(val_set) == 0:
            raise ValueError(f"need training and validation images, got {len(train_set)} and {len(val_set)}")
        train_labels, val_labels = _dataset_labels(train_set), _dataset_labels(val_set)
        _check_validation_classes(val_labels, config.num_classes, config.select_metric)
        class_weights = (_class_weights(train_labels, config.num_classes).to(device)
                         if config.imbalance == "weighted_loss" else None)
        train_loader = _train_loader(train_set, train_labels, config, ctx)
        val_loader = _validation_loader(val_set, config, ctx)
        model = wrap_ddp(model, ctx)
        epochs_bar = progress_bar(range(start_epoch, config.epochs + 1), ctx=ctx, enabled=config.progress,
                                  desc=f"classifier {config.arch}", unit="epoch", initial=start_epoch - 1,
                                  total=config.epochs)
        for epoch in epochs_bar:
            started = time.perf_counter()
            seed_epoch(config.seed, epoch, ctx.rank)
            set_loader_epoch(train_loader, epoch)
            lr = optimizer.param_groups[0]["lr"]
            train_stats, steps = _train_one_epoch(model, train_loader, optimizer, scaler, class_weights, config,
                                                  ctx, precision=precision, channels_last=channels_last,
                                                  epoch=epoch)
            step += steps
            scheduler.step()
            broadcast_buffers(model, ctx)  # every rank evaluates and keeps rank 0's weights
            val_stats, val_prob = _evaluate(model, val_loader, val_labels, ctx, precision=precision,
                                            channels_last=channels_last, progress=config.progress)
            value = val_stats["val_loss" if lower_is_better else f"val_{config.select_metric}"]
            improved = _is_better(value, best_metric, config.select_metric)
            thresholds = (choose_thresholds(val_labels, val_prob[:, 1])
                          if config.num_classes == 2 and len(np.unique(val_labels)) == 2 else {})
            if improved:
                best_metric, best_epoch = value, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}
                best_thresholds = thresholds
            record = logger.log({"epoch": epoch, "step": step, "lr": lr, **train_stats, **val_stats,
                                 **{f"threshold_{k}": v for k, v in thresholds.items()},
                                 "best_val_metric": best_metric, "best_epoch": best_epoch,
                                 "time_s": round(time.perf_counter() - started, 3)})
            stop = patience_spent(epoch)
            if ctx.is_main:
                state = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, epoch=epoch,
                             step=step, best_metric=best_metric, config=saved_config,
                             extra={"best_epoch": best_epoch, "thresholds": thresholds, "classes": config.classes,
                                    "stopped_early": stop, "run": run_info})
                save_checkpoint(last_path, **state)
                if improved:
                    save_checkpoint(best_path, **state)
            barrier()
            epochs_bar.set_postfix(train_loss=f"{train_stats['train_loss']:.3f}",
                                   **{f"val_{config.select_metric}": f"{value:.3f}"})
            if on_epoch_end is not None:
                on_epoch_end(record)
            if stop:
                break
        epochs_bar.close()

    net = unwrap(model)
    if best_state is None and best_path.is_file():  # the best epoch came before this session
        best = read_checkpoint(best_path)
        best_state = best["model"]
        best_thresholds = dict((best.get("extra") or {}).get("thresholds") or {})
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return ClassifierTrainResult(
        model=net, history=logger.frame(), best_epoch=best_epoch, best_val_metric=float(best_metric),
        threshold=best_thresholds.get("youden"), thresholds=best_thresholds, checkpoint_path=best_path,
        config=config, classes=list(config.classes or []),
    )


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None,
               optimizer: torch.optim.Optimizer, scaler, autocast: Callable[[], Any]) -> torch.Tensor:
    """One optimizer step of the classifier on a batch: the forward pass under ``autocast()``
    (e.g. :meth:`~cxrlib.train.engine.Precision.autocast`), class-weighted cross-entropy in
    fp32, the backward pass through ``scaler`` (a no-op scaler outside fp16). Returns the loss.
    The training loop and the benchmarks time this same step."""
    with autocast():
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels, weight=class_weights)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def _train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, class_weights: torch.Tensor | None,
                     config: ClassifierTrainConfig, ctx: DistContext, *, precision: Precision, channels_last: bool,
                     epoch: int) -> tuple[dict[str, float], int]:
    """One pass over ``loader`` (at most ``max_steps_per_epoch`` steps).

    Returns all-reduced ``train_loss`` (mean weighted cross-entropy) and
    ``train_class_fraction`` (share of each class among the images trained on: shows what
    the balanced sampler does), and the number of steps.
    """
    model.train()
    total_steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
    # Sums stay on the device: no host synchronisation per step.
    sums = torch.zeros(2 + config.num_classes, dtype=torch.float64, device=ctx.device)  # samples, loss, per class
    bar = progress_bar(loader, ctx=ctx, enabled=config.progress, desc=f"epoch {epoch}", total=total_steps,
                       leave=False)
    steps = 0
    for images, labels in bar:
        images = _to_device(images, ctx.device, channels_last)
        labels = labels.to(ctx.device, non_blocking=True).long()
        loss = train_step(model, images, labels, class_weights, optimizer, scaler, precision.autocast)
        steps += 1
        batch = images.shape[0]
        sums[0] += batch
        sums[1] += loss.detach().double() * batch
        sums[2:] += torch.bincount(labels, minlength=config.num_classes).double()
        if steps % 10 == 0 or steps == total_steps:
            bar.set_postfix(loss=f"{sums[1].item() / sums[0].item():.3f}")
        if steps >= total_steps:
            break
    bar.close()
    reduced = all_reduce_sum(sums, ctx).cpu()
    count = max(float(reduced[0]), 1.0)
    stats = {"train_loss": float(reduced[1]) / count,
             "train_class_fraction": [float(v) / count for v in reduced[2:]]}
    return stats, steps


# --------------------------------------------------------------------------- inference


def load_classifier(run_dir_or_ckpt: str | Path, device: str | torch.device = "cpu") -> ClassifierTrainResult:
    """The classifier of a run (``best.pt``, else ``last.pt``) or of a checkpoint file, in eval mode.

    The architecture, classes, input settings and thresholds come from the checkpoint
    (``weights_only=True``); ``history`` is read from the run folder's ``history.jsonl``
    when present.
    """
    path = Path(run_dir_or_ckpt)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    checkpoint = read_checkpoint(path)
    settings = checkpoint.get("config") or {}
    if "arch" not in settings:
        raise ValueError(f"checkpoint {path} has no 'arch' in its config; not a classifier run")
    # The weights are in the checkpoint: do not look for pretrained files again.
    config = from_mapping(ClassifierTrainConfig, {**settings, "weights": None}, strict=False)
    model = build_classifier(config.arch, config.num_classes, dropout=config.dropout)
    load_checkpoint(checkpoint, model=model)
    extra = checkpoint.get("extra") or {}
    thresholds = dict(extra.get("thresholds") or {})
    history_path = path.parent / "history.jsonl"
    history = pd.read_json(history_path, lines=True) if history_path.is_file() else pd.DataFrame()
    config = replace(config, weights=settings.get("weights"))
    return ClassifierTrainResult(
        model=model.to(resolve_device(str(device))).eval(), history=history,
        best_epoch=int(extra.get("best_epoch", checkpoint["epoch"])),
        best_val_metric=float(checkpoint["best_metric"]) if checkpoint.get("best_metric") is not None else math.nan,
        threshold=thresholds.get("youden"), thresholds=thresholds, checkpoint_path=path, config=config,
        classes=list(config.classes or []),
    )


def _model_and_config(model: nn.Module | ClassifierTrainResult,
                      config: ClassifierTrainConfig | None) -> tuple[nn.Module, ClassifierTrainConfig | None]:
    if isinstance(model, ClassifierTrainResult):
        return model.model, config or model.config
    return model, config


def _prediction_dataset(data: pd.DataFrame | Dataset, config: ClassifierTrainConfig | None) -> Dataset:
    if isinstance(data, pd.DataFrame):
        if config is None:
            raise ValueError("predicting from a DataFrame needs the training config (pass a ClassifierTrainResult "
                             "from train_classifier / load_classifier, or config=...)")
        return make_dataset(data, config, train=False, strict_labels=False)
    return evaluation_view(data) if isinstance(data, ClassificationDataset) else data


def predict_proba(
    model: nn.Module | ClassifierTrainResult,
    data: pd.DataFrame | Dataset,
    *,
    config: ClassifierTrainConfig | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    amp: bool = False,
    progress: bool = False,
    precision: str | Precision = "fp32",
) -> np.ndarray:
    """Class probabilities ``(N, C)`` float64 (rows sum to 1), in the row order of ``data``.

    ``model``: a :class:`ClassifierTrainResult` (its config prepares DataFrames as in
    training) or a bare model with ``config=``. ``data``: manifest rows, or a Dataset of
    ``(image (1, H, W) float in [0, 1], label)`` (a ClassificationDataset is never
    augmented here). In patch mode this is the mean probability over
    ``config.eval_patches`` patches (:func:`predict_patches`). ``device``: where to run
    (``None``: where the model is). ``precision``: the autocast of the forward passes
    (:func:`~cxrlib.train.engine.resolve_precision`; ``amp=True`` with ``"fp32"``: float16 on CUDA,
    as before). One process (no DDP).
    """
    net, config = _model_and_config(model, config)
    dataset = _prediction_dataset(data, config)
    if isinstance(dataset, ClassificationDataset) and dataset.input_mode == "patch":
        k = config.eval_patches if config is not None else 10
        return predict_patches(net, dataset, k, batch_size=batch_size, device=device, amp=amp,
                               progress=progress, precision=precision).proba
    net = unwrap(net)
    target = next(net.parameters()).device if device is None else resolve_device(str(device))
    net.to(target)
    was_training = net.training
    net.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    prob, _ = _predict_loader(net, loader, target, precision=as_precision(precision, target, amp=amp),
                              channels_last=False, progress=progress)
    net.train(was_training)
    return prob


@dataclass
class PatchPrediction:
    """Test-time patch aggregation (Oh et al. 2020) for N images and K patches each.

    ``proba`` ``(N, C)``: mean patch probability; ``votes`` ``(N, C)``: share of the K
    patches whose argmax is each class; ``majority`` ``(N,)`` int: the class with most
    votes (ties broken by ``proba``); ``centres`` ``(N, K, 2)`` int64: patch centres on
    the ``source_size`` grid (for probabilistic Grad-CAM with ``LungPatchSampler.paste_back``).
    """

    proba: np.ndarray
    votes: np.ndarray
    majority: np.ndarray
    centres: np.ndarray


def predict_patches(
    model: nn.Module | ClassifierTrainResult,
    data: pd.DataFrame | ClassificationDataset,
    k: int,
    *,
    config: ClassifierTrainConfig | None = None,
    seed: int | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    amp: bool = False,
    progress: bool = False,
    precision: str | Precision = "fp32",
) -> PatchPrediction:
    """Classify ``k`` lung-centred patches per image and aggregate them (majority vote, mean probability).

    ``data``: manifest rows (prepared with the model's config, patch mode) or a
    ClassificationDataset in patch mode. Patches are drawn from a generator seeded by
    ``(seed, image index)`` (default: the dataset's seed), so predictions repeat.
    ``batch_size`` counts patches; ``precision`` and ``amp`` as in :func:`predict_proba`.
    """
    net, config = _model_and_config(model, config)
    dataset = _prediction_dataset(data, config)
    if not isinstance(dataset, ClassificationDataset) or dataset.input_mode != "patch":
        raise ValueError("predict_patches needs a patch-mode ClassificationDataset (input_mode='patch')")
    net = unwrap(net)
    target = next(net.parameters()).device if device is None else resolve_device(str(device))
    net.to(target)
    was_training = net.training
    net.eval()
    stack = PatchStack(dataset, k, seed=seed)
    loader = DataLoader(stack, batch_size=max(1, batch_size // k), shuffle=False)
    proba, votes = _predict_loader(net, loader, target, precision=as_precision(precision, target, amp=amp),
                                   channels_last=False, progress=progress, desc="patches")
    net.train(was_training)
    centres = np.stack([dataset.patches(i, k, seed)[1] for i in range(len(dataset))]) if len(dataset) else \
        np.zeros((0, k, 2), dtype=np.int64)
    top = votes == votes.max(axis=1, keepdims=True)
    majority = np.where(top, proba, -np.inf).argmax(axis=1)
    return PatchPrediction(proba=proba, votes=votes, majority=majority, centres=centres)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m cxrlib.train.classifier``: the data options, then one per
    :class:`ClassifierTrainConfig` field (``num_classes`` follows the classes)."""
    parser = argparse.ArgumentParser(
        prog="python -m cxrlib.train.classifier",
        description="Train an image classifier on the manifest's train split; choose the best epoch, early "
                    "stopping and thresholds on its val split. Runs unchanged under `torchrun "
                    "--nproc_per_node N -m cxrlib.train.classifier ...`. Re-running on the same --run-dir resumes.",
    )
    add = parser.add_argument
    add("--manifest", required=True, type=Path, help="manifest CSV or Parquet (image_id, path, label, split, ...)")
    add("--run-dir", required=True, type=Path, help="folder for last.pt, best.pt, config.json, history.jsonl")
    add("--allow-root", "--root", dest="allow_root", type=Path, action="append", default=[],
        help="data folder outside the manifest's own that its paths may point into (repeatable; "
        "--root is the old spelling)")
    add("--train-split", default="train", help="value of the split column used for training")
    add("--val-split", default="val", help="value of the split column used for model selection")
    add_arguments(parser, ClassifierTrainConfig, exclude=("num_classes",))
    add("--no-resume", action="store_true", help="start over even if --run-dir holds last.pt")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cxrlib.train.classifier`` (and of torchrun)."""
    args = build_parser().parse_args(argv)
    from cxrlib.data.manifest import read_manifest

    # the classes trained on are chosen here (--classes, or the labels of the training rows)
    manifest = read_manifest(args.manifest, allowed_roots=args.allow_root, labels=None)
    if args.classes:
        manifest = manifest[manifest["label"].isin(args.classes)]
    train_df = manifest[manifest["split"] == args.train_split]
    val_df = manifest[manifest["split"] == args.val_split]
    config = from_arguments(ClassifierTrainConfig, args, num_classes=len(args.classes or train_df["label"].unique()),
                            patience=args.patience or None)
    ctx = init_distributed(config.device)
    try:
        result = train_classifier(train_df, val_df, args.run_dir, config, resume=not args.no_resume, ctx=ctx)
    finally:
        cleanup_distributed()
    if ctx.is_main:
        threshold = "" if result.threshold is None else f", Youden threshold {result.threshold:.3f}"
        print(f"best val {config.select_metric} {result.best_val_metric:.4f} at epoch {result.best_epoch}"
              f"{threshold}; {len(train_df)} train / {len(val_df)} val images; checkpoint {result.checkpoint_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
