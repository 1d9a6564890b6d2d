"""Training loop of the class-conditional diffusion model (:mod:`cxrlib.models.diffusion`).

Built on the shared :mod:`cxrlib.train.engine` like the other loops: seeded (initial
weights, batches, noise and label dropout depend only on ``(seed, epoch)``), checkpoint +
resume (``last.pt`` holds the denoiser, optimizer, schedule and the EMA weights; the
resolved config goes into the checkpoint and ``config.json`` beside it), one JSON line of
losses per epoch (``history.jsonl``), tqdm progress, and DDP under ``torchrun`` (each rank
trains on its shard; rank 0 writes). Diffusers' :class:`~diffusers.training_utils.EMAModel`
keeps the exponential moving average of the weights that sampling uses.

Only the images given are trained on; callers pass the train split (notebook 06 does), so
no validation or test image shapes the generator. The latent variant first trains its
:class:`~diffusers.AutoencoderKL` on the same images (``run_dir/vae/``), fixes the latent
scale from their latents' standard deviation and then trains the denoiser on the latents.

Command line (``python -m cxrlib.train.diffusion --help``) trains from a manifest.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from cxrlib.config import seed_everything
from cxrlib.models.diffusion import DiffusionConfig, DiffusionModel, training_scheduler
from cxrlib.runs import to_plain
from cxrlib.settings import add_arguments, from_arguments, from_mapping, setting
from cxrlib.train.engine import (
    PRECISION_HELP,
    PRECISIONS,
    DistContext,
    MetricLogger,
    Precision,
    all_reduce_mean,
    barrier,
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
    unwrap,
    wrap_ddp,
)

#: Config fields that change the networks: a checkpoint trained with other values cannot resume.
_MODEL_FIELDS = ("model",)


@dataclass
class DiffusionTrainConfig:
    """Settings of :func:`train_diffusion` (saved with every checkpoint).

    - ``model``: the :class:`~cxrlib.models.diffusion.DiffusionConfig` (networks, noise process).
    - ``epochs``, ``max_steps_per_epoch`` (cap on optimizer steps per epoch; ``None``: whole
      passes), ``batch_size``, ``lr`` (AdamW), ``weight_decay``, ``schedule``
      (``"constant"`` or ``"cosine"`` over epochs), ``grad_clip`` (max gradient norm; 0: off).
    - ``cond_drop_prob``: probability that a training label is replaced by the null class
      (classifier-free guidance needs the unconditional model too).
    - ``ema_decay``: ceiling of the EMA decay (diffusers' warm-up ``(1 + n) / (10 + n)`` rises
      to it), ``hflip``: random horizontal flips (off by default: a flipped chest X-ray has
      its heart on the wrong side).
    - ``vae_epochs``, ``vae_lr``, ``vae_kl_weight``: the autoencoder stage (latent model only).
    - ``max_train_seconds``: a wall-clock budget for the denoiser's training, summed over
      resumed runs (``None``: no limit). An epoch starts only when the time so far plus the
      last epoch's duration fits, so training ends within the budget at an epoch boundary
      (the autoencoder stage of the latent model is not counted).
    - ``precision``: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"auto"``
      (:func:`~cxrlib.train.engine.resolve_precision`; the resolved one is saved); ``amp``: with
      ``precision="fp32"``, the former CUDA float16 switch.
    - ``seed``, ``device``, ``num_workers``, ``progress``.
    """

    model: DiffusionConfig = setting(factory=DiffusionConfig, help="networks and noise process")
    epochs: int = setting(10, "passes over the training images")
    max_steps_per_epoch: int | None = setting(None, "cap on steps per epoch (0 or none: whole passes)")
    batch_size: int = setting(16, "images per step and process")
    lr: float = setting(1e-3, "AdamW learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    schedule: str = setting("constant", "learning-rate schedule over epochs", choices=("constant", "cosine"))
    grad_clip: float = setting(1.0, "max gradient norm (0: off)")
    cond_drop_prob: float = setting(0.1, "probability that a training label becomes the null class")
    ema_decay: float = setting(0.999, "ceiling of the EMA decay")
    hflip: bool = setting(False, "random horizontal flips (a flipped CXR has its heart on the wrong side)")
    vae_epochs: int = setting(10, "autoencoder epochs (latent only)")
    vae_lr: float = setting(1e-3, "autoencoder learning rate (latent only)")
    vae_kl_weight: float = setting(1e-6, "autoencoder KL weight (latent only)")
    max_train_seconds: float | None = setting(None, "wall-clock budget of the denoiser's training, summed "
                                                    "over resumes (none: no limit)")
    seed: int = setting(0, "seed of weights, batches and noise")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, mps")
    num_workers: int = setting(0, "DataLoader worker processes per process")
    precision: str = setting("fp32", PRECISION_HELP, choices=PRECISIONS)
    amp: bool = setting(True, "with --precision fp32: float16 autocast and gradient scaling on CUDA")
    progress: bool = setting(True, "progress bars")

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if isinstance(self.model, Mapping):
            self.model = from_mapping(DiffusionConfig, self.model, strict=False)
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {self.epochs}, {self.batch_size}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            self.max_steps_per_epoch = None
        if self.max_train_seconds is not None and self.max_train_seconds <= 0:
            self.max_train_seconds = None


@dataclass
class DiffusionTrainResult:
    """What :func:`train_diffusion` returns: the model with EMA weights (eval mode), the
    per-epoch ``history``, the checkpoint and the ``model_dir`` written by ``save_pretrained``;
    ``epochs_done`` (may be fewer than ``config.epochs`` when ``stopped_by_budget``) and
    ``train_seconds`` (the denoiser's training time, summed over resumed runs)."""

    model: DiffusionModel
    history: pd.DataFrame
    checkpoint_path: Path
    model_dir: Path
    config: DiffusionTrainConfig
    steps: int
    epochs_done: int = 0
    train_seconds: float = 0.0
    stopped_by_budget: bool = False

    @property
    def checkpoint_name(self) -> str:
        """``<file stem>_step<n>`` (e.g. ``last_step400``): what ``origin`` values name."""
        return f"{self.checkpoint_path.stem}_step{self.steps}"


class _Images(Dataset):
    """``(N, H, W)`` uint8 images + ``(N,)`` int labels -> ``((1, H, W) float in [-1, 1], label)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, hflip: bool) -> None:
        images = np.asarray(images)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W) uint8, got {images.shape} {images.dtype}")
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index][None].float().div(127.5).sub(1.0)
        if self.hflip and torch.rand(()) < 0.5:  # torch's RNG: reseeded per epoch / worker
            image = image.flip(-1)
        return image, int(self.labels[index])


def _lr_lambda(schedule: str, epochs: int):
    return lr_factor("cosine", max(epochs, 1)) if schedule == "cosine" else (lambda epoch: 1.0)


def _check_resumable(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    clashing = {key: (saved.get(key), current.get(key)) for key in _MODEL_FIELDS
                if saved.get(key) is not None and _comparable(saved.get(key)) != _comparable(current.get(key))}
    if clashing:
        raise ValueError(f"{path} was trained with other model settings {clashing} (saved, now); "
                         "use another run_dir or resume=False")


def _comparable(model_config: Any) -> Any:
    """The model settings without the data-derived latent scale."""
    if isinstance(model_config, Mapping):
        return {k: v for k, v in model_config.items() if k != "vae_scaling_factor"}
    return model_config


def train_diffusion(
    images: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    run_dir: str | Path,
    config: DiffusionTrainConfig | Mapping[str, Any] | None = None,
    *,
    resume: bool = True,
    ctx: DistContext | None = None,
) -> DiffusionTrainResult:
    """Train (or resume, or load) a class-conditional diffusion model on ``images``.

    ``images``: ``(N, S, S)`` uint8 at ``config.model.image_size`` (the TRAIN split:
    the caller chooses); ``labels``: ``(N,)`` class names from ``config.model.class_names``.
    Each step draws a timestep per image, noises it with the DDPM scheduler and regresses
    the velocity ``v`` (or the noise, ``prediction_type="epsilon"``); labels are dropped to the null class with probability
    ``cond_drop_prob``. ``run_dir`` receives ``last.pt`` (after every epoch), ``config.json``,
    ``history.jsonl`` and, at the end, ``model/`` (``DiffusionModel.save_pretrained`` with the
    EMA weights). With ``resume=True`` a ``last.pt`` continues at the next epoch (a finished
    run is only loaded); ``resume=False`` starts over. Under ``torchrun`` every rank calls
    this unchanged (DDP; rank 0 writes).
    """
    if config is None:
        config = DiffusionTrainConfig()
    elif isinstance(config, Mapping):
        config = from_mapping(DiffusionTrainConfig, config, strict=False)
    ctx = ctx or init_distributed(config.device)
    device = ctx.device
    precision = resolve_precision(config.precision, device, amp=config.amp)
    config = replace(config, precision=precision.name)  # config.json records what ran
    run_dir = Path(run_dir)
    last_path = run_dir / "last.pt"
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    images = np.asarray(images)
    side = config.model.image_size
    if images.ndim != 3 or images.shape[1:] != (side, side):
        raise ValueError(f"images must be (N, {side}, {side}) uint8 (model image_size {side}), got {images.shape}")
    label_index = config.model.class_index(list(labels)).numpy()

    checkpoint = None
    if resume and last_path.is_file():
        checkpoint = read_checkpoint(last_path)
        _check_resumable(last_path, checkpoint.get("config") or {}, to_plain(asdict(config)))
        saved_model = (checkpoint.get("config") or {}).get("model") or {}
        if "vae_scaling_factor" in saved_model:  # the scale was measured on the data: keep it
            config.model.vae_scaling_factor = float(saved_model["vae_scaling_factor"])

    seed_everything(config.seed)  # identical initial weights on every rank
    model = DiffusionModel(config.model)
    model.to(device)
    dataset = _Images(images, label_index, hflip=config.hflip)
    if config.model.latent and checkpoint is None:
        # The former amp switch left the autoencoder in float32; so does "fp32" with amp=True.
        vae_precision = precision if precision.requested != "fp32" else Precision(device_type=device.type)
        _train_vae(model, dataset, run_dir / "vae", config, ctx, vae_precision)
        config.model.vae_scaling_factor = _latent_scale(model, dataset, device)
        model.config.vae_scaling_factor = config.model.vae_scaling_factor
    elif config.model.latent:
        load_checkpoint(read_checkpoint(run_dir / "vae" / "last.pt"), model=model.vae)
    if model.vae is not None:
        model.vae.requires_grad_(False).eval()

    from diffusers.training_utils import EMAModel

    unet = model.unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.schedule, config.epochs))
    scaler = precision.grad_scaler()
    ema = EMAModel(unet.parameters(), decay=config.ema_decay)
    saved_config = to_plain(asdict(config))
    start_epoch, step = 1, 0
    train_seconds, last_epoch_s = 0.0, 0.0  # the budget's clock, carried over resumes
    if checkpoint is not None:
        load_checkpoint(checkpoint, model=unet, optimizer=optimizer, scheduler=lr_schedule, scaler=scaler)
        ema_state = (checkpoint.get("state") or {}).get("ema")
        if ema_state is not None:
            ema.load_state_dict(ema_state)
        start_epoch, step = int(checkpoint["epoch"]) + 1, int(checkpoint["step"])
        saved_extra = checkpoint.get("extra") or {}
        train_seconds = float(saved_extra.get("train_seconds", 0.0))
        last_epoch_s = float(saved_extra.get("last_epoch_s", 0.0))
    ema.to(device)
    logger = MetricLogger(run_dir, enabled=ctx.is_main)
    logger.drop_after(start_epoch - 1)

    noiser = training_scheduler(config.model)
    epochs_done, stopped_by_budget = start_epoch - 1, False
    if start_epoch <= config.epochs:
        loader = make_loader(dataset, config.batch_size, shuffle=True, seed=config.seed, ctx=ctx,
                             num_workers=config.num_workers, drop_last=len(dataset) > config.batch_size)
        net = wrap_ddp(unet, ctx)
        bar = progress_bar(range(start_epoch, config.epochs + 1), ctx=ctx, enabled=config.progress,
                           desc="diffusion", unit="epoch", initial=start_epoch - 1, total=config.epochs)
        for epoch in bar:
            # a fresh run always starts (no epoch to estimate from); a resumed one may already be over budget
            if _over_budget(config.max_train_seconds, train_seconds, last_epoch_s, ctx):
                stopped_by_budget = True
                break
            started = time.perf_counter()
            seed_epoch(config.seed, epoch, ctx.rank)
            set_loader_epoch(loader, epoch)
            lr = optimizer.param_groups[0]["lr"]
            loss_sum, count, steps = 0.0, 0, 0
            limit = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
            net.train()
            for batch, batch_labels in progress_bar(loader, ctx=ctx, enabled=config.progress, total=limit,
                                                    desc=f"epoch {epoch}", leave=False):
                if steps >= limit:
                    break
                batch = batch.to(device)
                batch_labels = batch_labels.to(device)
                with torch.no_grad(), precision.autocast():
                    target_space = model.encode(batch).float() if model.vae is not None else batch
                noise = torch.randn_like(target_space)
                timesteps = torch.randint(0, config.model.num_train_timesteps, (len(batch),), device=device)
                noisy = noiser.add_noise(target_space, noise, timesteps)
                drop = torch.rand(len(batch), device=device) < config.cond_drop_prob
                cond = torch.where(drop, torch.full_like(batch_labels, config.model.null_class), batch_labels)
                target = (noise if config.model.prediction_type == "epsilon"
                          else noiser.get_velocity(target_space, noise, timesteps))
                with precision.autocast():
                    prediction = net(noisy, timesteps, class_labels=cond).sample
                loss = nn.functional.mse_loss(prediction.float(), target.float())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                ema.step(unet.parameters())
                loss_sum += float(loss.detach()) * len(batch)
                count += len(batch)
                steps += 1
            step += steps
            lr_schedule.step()
            mean_loss = all_reduce_mean(loss_sum / max(count, 1), ctx)
            last_epoch_s = time.perf_counter() - started
            train_seconds += last_epoch_s
            epochs_done = epoch
            logger.log({"epoch": epoch, "step": step, "lr": lr, "train_loss": mean_loss,
                        "ema_decay": float(getattr(ema, "cur_decay_value", 0.0) or 0.0),
                        "time_s": round(last_epoch_s, 3), "train_seconds": round(train_seconds, 3)})
            if ctx.is_main:
                save_checkpoint(last_path, model=unet, optimizer=optimizer, scheduler=lr_schedule, scaler=scaler,
                                epoch=epoch, step=step, config=saved_config,
                                extra={"world_size": ctx.world_size, "device": str(device), **precision.record(),
                                       "train_seconds": train_seconds, "last_epoch_s": last_epoch_s},
                                state={"ema": ema.state_dict()})
            barrier()
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        bar.close()
    elif checkpoint is None:
        warnings.warn("epochs=0: the returned model is untrained", stacklevel=2)
    if stopped_by_budget and ctx.is_main:
        warnings.warn(f"training time budget of {config.max_train_seconds:.0f} s reached after epoch {epochs_done} "
                      f"of {config.epochs} ({train_seconds:.0f} s of training)", stacklevel=2)

    ema.copy_to(unet.parameters())
    model.eval()
    model_dir = run_dir / "model"
    if ctx.is_main:
        model.save_pretrained(model_dir)
    barrier()
    return DiffusionTrainResult(model=model, history=logger.frame(), checkpoint_path=last_path,
                                model_dir=model_dir, config=config, steps=step, epochs_done=epochs_done,
                                train_seconds=train_seconds, stopped_by_budget=stopped_by_budget)


def _over_budget(budget: float | None, spent: float, last_epoch: float, ctx: DistContext) -> bool:
    """Would another epoch (taking as long as the last one) overrun ``budget`` seconds? Ranks agree:
    any rank over budget stops them all."""
    if budget is None:
        return False
    over = float(spent + last_epoch > budget)
    return bool(all_reduce_mean(over, ctx) > 0) if ctx.is_distributed else bool(over)


def _train_vae(model: DiffusionModel, dataset: Dataset, vae_dir: Path, config: DiffusionTrainConfig,
               ctx: DistContext, precision: Precision | None = None) -> None:
    """Train (or resume) the autoencoder: L1 + MSE reconstruction + ``vae_kl_weight`` * KL."""
    vae = model.vae
    precision = precision or Precision(device_type=ctx.device.type)
    scaler = precision.grad_scaler()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    last_path = vae_dir / "last.pt"
    start_epoch, step = 1, 0
    if last_path.is_file():
        checkpoint = load_checkpoint(last_path, model=vae, optimizer=optimizer)
        start_epoch, step = int(checkpoint["epoch"]) + 1, int(checkpoint["step"])
    logger = MetricLogger(vae_dir, enabled=ctx.is_main)
    logger.drop_after(start_epoch - 1)
    loader = make_loader(dataset, config.batch_size, shuffle=True, seed=config.seed + 1, ctx=ctx,
                         num_workers=config.num_workers)
    net = wrap_ddp(vae, ctx)
    for epoch in progress_bar(range(start_epoch, config.vae_epochs + 1), ctx=ctx, enabled=config.progress,
                              desc="autoencoder", unit="epoch"):
        seed_epoch(config.seed + 1, epoch, ctx.rank)
        set_loader_epoch(loader, epoch)
        net.train()
        total, count = 0.0, 0
        for steps, (batch, _) in enumerate(loader):
            if config.max_steps_per_epoch is not None and steps >= config.max_steps_per_epoch:
                break
            batch = batch.to(ctx.device)
            with precision.autocast():
                posterior = unwrap(net).encode(batch).latent_dist
            if posterior.parameters.dtype != torch.float32:  # the sample and the KL in float32
                posterior = type(posterior)(posterior.parameters.float())
            with precision.autocast():
                reconstruction = unwrap(net).decode(posterior.sample()).sample.float()
            loss = (nn.functional.l1_loss(reconstruction, batch) + nn.functional.mse_loss(reconstruction, batch)
                    + config.vae_kl_weight * posterior.kl().mean())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
            step += 1
        logger.log({"epoch": epoch, "step": step, "vae_loss": all_reduce_mean(total / max(count, 1), ctx)})
        if ctx.is_main:
            save_checkpoint(last_path, model=vae, optimizer=optimizer, epoch=epoch, step=step,
                            config=to_plain(asdict(config)))
        barrier()


@torch.no_grad()
def _latent_scale(model: DiffusionModel, dataset: Dataset, device: torch.device, limit: int = 512) -> float:
    """``1 / std`` of the (unscaled) latent means of up to ``limit`` training images (Rombach et al. 2022)."""
    model.config.vae_scaling_factor = 1.0
    batch = torch.stack([dataset[i][0] for i in range(min(limit, len(dataset)))]).to(device)
    latents = torch.cat([model.encode(chunk) for chunk in batch.split(64)])
    std = float(latents.std())
    return 1.0 / std if std > 0 and math.isfinite(std) else 1.0


def load_diffusion(run_dir_or_model: str | Path, *, device: str | torch.device = "cpu") -> DiffusionModel:
    """The EMA model of a run folder (its ``model/``) or any ``save_pretrained`` folder, in eval mode."""
    path = Path(run_dir_or_model)
    folder = path / "model" if (path / "model").is_dir() else path
    return DiffusionModel.from_pretrained(folder).to(device).eval()


# --------------------------------------------------------------------------- command line


#: DiffusionConfig fields the command line does not offer (set from the training images).
_CLI_MODEL_EXCLUDED = ("vae_scaling_factor",)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m cxrlib.train.diffusion``: manifest and run folder, then one
    per :class:`DiffusionTrainConfig` and :class:`~cxrlib.models.diffusion.DiffusionConfig` field."""
    parser = argparse.ArgumentParser(prog="python -m cxrlib.train.diffusion",
                                     description="Train the class-conditional diffusion model on a manifest's "
                                                 "train split (torchrun-ready).")
    parser.add_argument("manifest", help="manifest CSV / Parquet (its train split is used)")
    parser.add_argument("run_dir", help="output folder (checkpoints, history, model/)")
    parser.add_argument("--allow-root", dest="allow_root", type=Path, action="append", default=[],
                        help="data folder outside the manifest's own that its paths may point into (repeatable)")
    add_arguments(parser, DiffusionTrainConfig, exclude=("model", "max_train_seconds"))
    add_arguments(parser, DiffusionConfig, exclude=_CLI_MODEL_EXCLUDED)
    parser.add_argument("--max-train-minutes", type=float, default=0,
                        help="wall-clock budget of the denoiser's training, summed over resumes (0: none)")
    parser.add_argument("--no-resume", action="store_true", help="start over instead of resuming last.pt")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from cxrlib.data import manifest as mf
    from cxrlib.data.arrays import load_images, real_rows

    args = build_parser().parse_args(argv)
    model = from_arguments(DiffusionConfig, args)
    config = from_arguments(DiffusionTrainConfig, args, model=model,
                            max_train_seconds=60 * args.max_train_minutes or None)
    # rows are picked by the model's class names; other labels are left alone
    manifest = mf.read_manifest(args.manifest, allowed_roots=args.allow_root, labels=None)
    rows = real_rows(manifest, "train", list(model.class_names))
    images = load_images(rows, model.image_size)
    result = train_diffusion(images, rows["label"].astype(str).tolist(), args.run_dir, config,
                             resume=not args.no_resume)
    budget = " (time budget reached)" if result.stopped_by_budget else ""
    print(f"trained {result.steps} steps in {result.epochs_done} epochs, {result.train_seconds:.0f} s{budget}; "
          f"model in {result.model_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
