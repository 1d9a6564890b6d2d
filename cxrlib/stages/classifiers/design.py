"""The grid's design: tasks, training conditions, imbalance names and :class:`GridConfig`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cxrlib.data.classification import (
    INPUT_MODES,
)
from cxrlib.models.classifiers import ARCHITECTURES
from cxrlib.train.classifier import ClassifierTrainConfig

#: The class every task is about (the binary tasks' positive class).
POSITIVE = "covid"


#: Stages whose manifest notebook 04 can read, latest first.
#: Generators that make images from noise, not from a source image (``origin`` ``<generator>:<checkpoint>``).
SOURCELESS_GENERATORS: tuple[str, ...] = ("diffusion",)


@dataclass(frozen=True)
class Task:
    """A classification task: ``classes`` in index order (binary: the last is positive)."""

    name: str
    classes: tuple[str, ...]
    title: str

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2


TASKS: dict[str, Task] = {
    "normal_vs_covid": Task("normal_vs_covid", ("normal", "covid"), "Normal vs COVID-19"),
    "pneumonia_vs_covid": Task("pneumonia_vs_covid", ("pneumonia", "covid"), "Pneumonia vs COVID-19"),
    "three_class": Task("three_class", ("normal", "pneumonia", "covid"), "Normal / Pneumonia / COVID-19"),
}


@dataclass(frozen=True)
class Condition:
    """What a training set holds besides the task's real non-COVID-19 images.

    ``real_covid``: the (subsampled) real COVID-19 images; ``generators``: synthetic
    COVID-19 images of these generators (origin ``<generator>:...``); ``oversample``:
    balanced sampling + the heavy augmentation instead of a class-weighted loss.
    """

    name: str
    title: str
    real_covid: bool = True
    generators: tuple[str, ...] = ()
    oversample: bool = False


CONDITIONS: dict[str, Condition] = {
    "real": Condition("real", "real only"),
    "real_oversample": Condition("real_oversample", "real + oversampling", oversample=True),
    "real_gnc": Condition("real_gnc", "real + G_NC", generators=("G_NC",)),
    "real_gnc_gpc": Condition("real_gnc_gpc", "real + G_NC + G_PC", generators=("G_NC", "G_PC")),
    "synthetic_only": Condition("synthetic_only", "synthetic only", real_covid=False,
                                generators=("G_NC", "G_PC")),
    "real_diffusion": Condition("real_diffusion", "real + diffusion", generators=("diffusion",)),
}


#: The grid's conditions unless chosen otherwise (``real_diffusion`` needs notebook 06, which runs later).
DEFAULT_CONDITIONS: tuple[str, ...] = ("real", "real_oversample", "real_gnc", "real_gnc_gpc", "synthetic_only")


def imbalance_name(ratio: int | None) -> str:
    """``20`` -> ``"1:20"``; ``None`` (every real COVID-19 training image) -> ``"all"``."""
    return "all" if ratio is None else f"1:{int(ratio)}"


def imbalance_folder(ratio: int | None) -> str:
    """The folder name of an imbalance: ``20`` -> ``"1-20"``, ``None`` -> ``"all"``."""
    return imbalance_name(ratio).replace(":", "-")


@dataclass
class GridConfig:
    """Settings of :func:`run_grid` (the grid's axes, then one training recipe for every cell).

    Axes: ``tasks`` (keys of :data:`TASKS`), ``archs`` (keys of
    :data:`~cxrlib.models.classifiers.ARCHITECTURES`), ``conditions`` (keys of
    :data:`CONDITIONS`), ``ratios`` (1:r real COVID-19 to the largest other class),
    ``seeds``.

    Training (see :class:`~cxrlib.train.classifier.ClassifierTrainConfig`): ``image_size``,
    ``input_mode``, ``mask_column``, ``epochs``, ``steps_per_epoch`` (a cap on optimizer
    steps per epoch, the same for every condition, so that conditions with more images do
    not also get more training; ``None``: whole passes), ``batch_size``, ``lr``,
    ``weight_decay``, ``patience`` (``None``: train every epoch, keep the best validation
    one), ``augment`` (every condition but ``real_oversample``), ``oversample_augment``,
    ``loss_imbalance`` (``"none"``: plain cross-entropy, the validation threshold absorbs
    the imbalance, as in the reproduced works; ``"weighted_loss"``: inverse class
    frequency, which on the phantom at 1:20 over-fits the few COVID-19 images;
    ``real_oversample`` uses the balanced sampler instead), ``weights`` (``None`` or
    ``"imagenet"``), ``device``, ``num_workers`` (DataLoader processes that decode and
    augment while the network trains).

    Evaluation: ``n_boot`` bootstrap resamples of test patients, drawn from ``boot_seed``
    (the same resamples for every cell). ``progress``: print one line per cell.
    """

    tasks: tuple[str, ...] = ("normal_vs_covid", "pneumonia_vs_covid")
    archs: tuple[str, ...] = ("small_cnn",)
    conditions: tuple[str, ...] = DEFAULT_CONDITIONS
    ratios: tuple[int, ...] = (20,)
    seeds: tuple[int, ...] = (0, 1, 2)
    image_size: int = 48
    input_mode: str = "whole"
    mask_column: str | None = None
    epochs: int = 20
    steps_per_epoch: int | None = 16
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int | None = None
    augment: str = "light"
    oversample_augment: str = "heavy"
    loss_imbalance: str = "none"
    weights: str | None = None
    device: str = "auto"
    num_workers: int = 0
    n_boot: int = 1000
    boot_seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("tasks", "archs", "conditions", "ratios", "seeds"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str | int) else tuple(value)
            if not value:
                raise ValueError(f"GridConfig.{name} is empty")
            setattr(self, name, value)
        for name, known in (("tasks", TASKS), ("archs", ARCHITECTURES), ("conditions", CONDITIONS)):
            unknown = [v for v in getattr(self, name) if v not in known]
            if unknown:
                raise ValueError(f"unknown {name} {unknown}; choose from {sorted(known)}")
        self.ratios = tuple(int(r) for r in self.ratios)
        self.seeds = tuple(int(s) for s in self.seeds)
        if min(self.ratios) < 1:
            raise ValueError(f"ratios must be >= 1 (1:r), got {self.ratios}")
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}")
        if self.loss_imbalance not in ("weighted_loss", "none"):
            raise ValueError(f"loss_imbalance must be 'weighted_loss' or 'none', got {self.loss_imbalance!r}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            self.steps_per_epoch = None

    def classifier_config(self, arch: str, classes: Sequence[str], seed: int, *, oversample: bool = False,
                          input_mode: str | None = None) -> ClassifierTrainConfig:
        """The :class:`ClassifierTrainConfig` of one cell."""
        return ClassifierTrainConfig(
            arch=arch, classes=list(classes), weights=self.weights, image_size=self.image_size,
            input_mode=input_mode or self.input_mode, mask_column=self.mask_column,
            augment=self.oversample_augment if oversample else self.augment, epochs=self.epochs,
            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            imbalance="balanced_sampler" if oversample else self.loss_imbalance, patience=self.patience,
            select_metric="auc", seed=seed, device=self.device, num_workers=self.num_workers,
            max_steps_per_epoch=self.steps_per_epoch, progress=False,
        )


def grid_config_from_params(params: Mapping[str, Any], **overrides: Any) -> GridConfig:
    """Notebook 04's parameters (its UPPER_CASE names) -> :class:`GridConfig`, the one mapping.

    ``params`` holds at least ``SEED, DEVICE, TASKS, ARCHS, CONDITIONS, RATIOS, N_SEEDS,
    IMAGE_SIZE, INPUT_MODE, EPOCHS, STEPS_PER_EPOCH, BATCH_SIZE, LEARNING_RATE,
    LOSS_IMBALANCE, N_BOOT`` (notebook 04's globals, or
    ``cxrlib.stages.runtime.stage_parameters("04", profile)`` from another notebook).
    Seeds are ``SEED, SEED + 1, ...``; ``STEPS_PER_EPOCH = 0`` means whole passes.
    ``overrides`` replace fields afterwards (e.g. the tasks and conditions that can run).
    """
    seed = int(params["SEED"])
    values: dict[str, Any] = dict(
        tasks=params["TASKS"], archs=params["ARCHS"], conditions=params["CONDITIONS"], ratios=params["RATIOS"],
        seeds=[seed + k for k in range(int(params["N_SEEDS"]))], image_size=params["IMAGE_SIZE"],
        input_mode=params["INPUT_MODE"], epochs=params["EPOCHS"], steps_per_epoch=params["STEPS_PER_EPOCH"] or None,
        batch_size=params["BATCH_SIZE"], lr=params["LEARNING_RATE"], loss_imbalance=params["LOSS_IMBALANCE"],
        device=params["DEVICE"], n_boot=params["N_BOOT"], boot_seed=seed)
    values.update(overrides)
    return GridConfig(**values)
