"""What every training loop shares: distributed context, loaders, checkpoints, logs, precision.

The pieces are small functions, not a framework; a loop for a model family
(:mod:`cxrlib.train.segmentation`, later CycleGAN, classifiers, diffusion) calls them in
order. The same loop runs in a notebook (one process) and under
``torchrun --nproc_per_node N`` (one process per device, DistributedDataParallel):

.. code-block:: python

    ctx = init_distributed(device)                      # single process unless torchrun set RANK...
    loader = make_loader(dataset, 8, shuffle=True, seed=seed, ctx=ctx)
    model = wrap_ddp(model.to(ctx.device), ctx)
    for epoch in range(1, epochs + 1):
        set_loader_epoch(loader, epoch)                  # new shuffle, same on every rank
        ...
        metric = all_reduce_mean(local_metric, ctx)      # every rank gets the same number
        if ctx.is_main:                                  # only rank 0 writes files
            save_checkpoint(run_dir / "last.pt", model=model, ..., config=config)

Checkpoints hold only state dicts and plain Python data, so they load with
``torch.load(path, weights_only=True)`` - loading never runs code from the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from cxrlib.config import dataloader_generator, resolve_device, seed_worker
from cxrlib.models.modules import unwrap  # re-exported: the training loops import it from here
from cxrlib.runs import atomic_write, to_plain, write_json

#: Bumped when the checkpoint layout changes in a way old readers cannot follow.
CHECKPOINT_FORMAT = 1

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE")


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly one-process) training job.

    ``rank``: global process index (0 .. world_size-1); ``local_rank``: index on this
    machine (picks the GPU); ``device``: where this process computes; ``backend``:
    ``"gloo"`` / ``"nccl"`` when a process group is running, ``None`` for one process.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and shows progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device = "auto") -> DistContext:
    """Join the ``torchrun`` process group when launched by it, else a one-process context.

    ``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; with ``WORLD_SIZE > 1`` this initialises the process group (NCCL on
    CUDA, Gloo otherwise) and binds CUDA processes to the GPU of their local rank. Calling
    it again in the same process returns the context of the running group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if all(v in os.environ for v in _TORCHRUN_VARS) else 1
    base = resolve_device(str(device))
    if world_size <= 1:
        return DistContext(device=base)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(
            f"RANK and WORLD_SIZE are set but not {' / '.join(missing)}; "
            "launch with `torchrun --nproc_per_node N ...` or unset RANK and WORLD_SIZE"
        )
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if base.type == "cuda":
        device_obj = torch.device("cuda", local_rank)
        torch.cuda.set_device(device_obj)
        backend = "nccl"
    else:
        device_obj, backend = base, "gloo"
    if dist.is_initialized():
        backend = str(dist.get_backend())
    else:
        # device_id binds NCCL to this GPU up front, so barriers do not have to guess it.
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size,
            device_id=device_obj if backend == "nccl" else None,
        )
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size,
                       device=device_obj, backend=backend)


def barrier() -> None:
    """Wait for every process of the group (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup_distributed() -> None:
    """Tear down the process group, if one is running (call once at the end of a script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(model)`` when ``world_size > 1``, else ``model`` itself.

    The model must already be on ``ctx.device``. DDP copies rank 0's weights to every rank
    here and averages gradients in ``backward()``.
    """
    if not ctx.is_distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def broadcast_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP averages gradients, so parameters agree across ranks, but each rank updates its
    running statistics from its own batches; DDP only re-broadcasts them at the start of
    the next forward pass. Call this before evaluating or saving so that every rank
    holds exactly the weights rank 0 writes.
    """
    if not ctx.is_distributed:
        return
    for buffer in unwrap(model).buffers():
        dist.broadcast(buffer.data, src=0)


def all_reduce_sum(value: torch.Tensor | float, ctx: DistContext) -> torch.Tensor | float:
    """Sum of ``value`` over all ranks (a float in gives a float out)."""
    if not ctx.is_distributed:
        return value
    is_tensor = torch.is_tensor(value)
    tensor = value.detach().clone() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
    origin = tensor.device
    tensor = tensor.to(ctx.device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.to(origin) if is_tensor else float(tensor.item())


def all_reduce_mean(value: torch.Tensor | float, ctx: DistContext) -> torch.Tensor | float:
    """Mean of ``value`` over all ranks (a float in gives a float out).

    An unweighted mean of per-rank values; for a metric over unevenly sharded samples,
    reduce the sum and the count with :func:`all_reduce_sum` instead.
    """
    if not ctx.is_distributed:
        return value
    if torch.is_tensor(value) and not value.is_floating_point():
        value = value.double()
    return all_reduce_sum(value, ctx) / ctx.world_size


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> int:
    """Reseed Python, NumPy and torch from ``(seed, epoch, rank)``; return the derived seed.

    Called at the start of each epoch, this makes the random draws inside an epoch
    (dropout, random crops in the main process) depend only on the epoch, so a run
    resumed from a checkpoint repeats exactly what the uninterrupted run would have done.
    """
    derived = int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)  # also seeds every CUDA device
    return derived


# --------------------------------------------------------------------------- data loading


class _ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``, without the padding DistributedSampler adds.

    For evaluation: each sample is seen exactly once across ranks (shards may differ in
    length by one, which is fine when no collective runs inside the loop).
    """

    def __init__(self, length: int, rank: int, world_size: int, seed: int = 0) -> None:
        self.length, self.rank, self.world_size, self.seed = length, rank, world_size, seed

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    ctx: DistContext,
    num_workers: int = 0,
    drop_last: bool = False,
    pad_to_even: bool = True,
) -> DataLoader:
    """A seeded DataLoader whose order depends only on ``(seed, epoch)``.

    Sampling uses :class:`~torch.utils.data.DistributedSampler` (with one process it is a
    plain seeded permutation per epoch), so each rank gets its own shard, the order is the
    same in a resumed run as in an uninterrupted one, and :func:`set_loader_epoch` changes
    it per epoch. Workers are seeded through ``seed_worker`` and a seeded generator.
    ``pad_to_even=False`` (for evaluation) shards without repeating samples.
    """
    if pad_to_even or not ctx.is_distributed:
        sampler: Sampler[int] = DistributedSampler(
            dataset, num_replicas=ctx.world_size, rank=ctx.rank,
            shuffle=shuffle, seed=seed, drop_last=drop_last,
        )
    else:
        sampler = _ShardSampler(len(dataset), ctx.rank, ctx.world_size, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        generator=dataloader_generator(seed),
        pin_memory=ctx.device.type == "cuda",
        # Fresh workers each epoch pick up the dataset's set_epoch (persistent ones would not).
        persistent_workers=False,
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the sampler and the dataset which epoch starts (new order, new augmentations)."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    seed = getattr(sampler, "seed", None)
    if loader.generator is not None and seed is not None:
        # Worker seeds are drawn from this generator; tie them to the epoch as well.
        loader.generator.manual_seed(int(seed) * 1_000_003 + int(epoch))


def progress_bar(iterable: Iterable | None = None, *, ctx: DistContext | None = None,
                 enabled: bool = True, **tqdm_kwargs: Any) -> tqdm:
    """A tqdm bar, silent on non-zero ranks and when ``enabled`` is False."""
    show = enabled and (ctx is None or ctx.is_main)
    return tqdm(iterable, disable=not show, dynamic_ncols=True, **tqdm_kwargs)


# --------------------------------------------------------------------------- schedules


def lr_factor(schedule: str, epochs: int) -> Callable[[int], float]:
    """Learning-rate multiplier for the 0-based epoch index.

    A function of the configured length rather than a stateful scheduler, so that a run
    resumed with more epochs follows the schedule of its new length.
    """
    if schedule == "cosine":
        return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs))
    milestones = (math.ceil(0.5 * epochs), math.ceil(0.75 * epochs))
    return lambda epoch: 0.1 ** sum(epoch >= m for m in milestones)


# --------------------------------------------------------------------------- checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read or does not fit the model."""


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    epoch: int,
    step: int,
    best_metric: float | None = None,
    config: Mapping[str, Any] | Any,
    extra: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Save a training state to ``path`` atomically and the config to ``config.json`` beside it.

    Stored: the state dicts of the (unwrapped) model, optimizer, scheduler and AMP scaler,
    ``epoch`` (the number of completed epochs), ``step`` (optimizer steps so far), ``best_metric``,
    the resolved ``config`` (dict or dataclass) and ``extra`` plain data. ``state`` holds
    further state dicts kept as they are, tensors included (a second optimizer, an image
    pool): its values must be what ``weights_only=True`` loading accepts (tensors, numbers,
    strings and containers of them); the caller restores them from ``checkpoint["state"]``.
    Call it on rank 0 only. Returns ``path``.
    """
    path = Path(path)
    config_plain = to_plain(config)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "best_metric": None if best_metric is None else float(best_metric),
        "config": config_plain,
        "extra": to_plain(dict(extra or {})),
        "state": dict(state or {}),
        "torch_version": str(torch.__version__),
    }
    atomic_write(path, lambda stream: torch.save(payload, stream))
    write_json(path.parent / "config.json", config_plain)
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """``run_dir/last.pt`` if present, else the newest ``*.pt`` in ``run_dir``, else None."""
    run_dir = Path(run_dir)
    if (run_dir / "last.pt").is_file():
        return run_dir / "last.pt"
    candidates = sorted(run_dir.glob("*.pt"), key=lambda p: p.stat().st_mtime) if run_dir.is_dir() else []
    return candidates[-1] if candidates else None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict (``weights_only=True``), with errors that name the file.

    ``path`` may be a run folder (its :func:`latest_checkpoint` is read).
    """
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint (*.pt) in {path}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} could not be read (truncated, corrupt or not a weights-only "
            f"checkpoint): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"checkpoint {path} is not a cxrlib training checkpoint (no 'model' entry)")
    payload["path"] = str(path)
    return payload


def load_checkpoint(
    path: str | Path | Mapping[str, Any],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore the given objects from a checkpoint and return the whole checkpoint dict.

    ``path``: a checkpoint file, a run folder, or a dict already read by
    :func:`read_checkpoint` (to inspect its config before restoring). Always
    ``weights_only=True``. A missing file raises ``FileNotFoundError``, an unreadable one
    or one that does not fit ``model`` raises :class:`CheckpointError`; both messages
    name the file.
    """
    payload = dict(path) if isinstance(path, Mapping) else read_checkpoint(path, map_location=map_location)
    where = payload.get("path", "(in memory)")
    try:
        if model is not None:
            unwrap(model).load_state_dict(payload["model"])
        if optimizer is not None and payload.get("optimizer") is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None and payload.get("scheduler") is not None:
            scheduler.load_state_dict(payload["scheduler"])
        # A disabled scaler (CPU) saves an empty dict, which an enabled one refuses.
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {where} does not fit the objects to restore: {exc}") from exc
    return payload


# --------------------------------------------------------------------------- metric log


class MetricLogger:
    """One JSON line per epoch in ``<run_dir>/history.jsonl``; :meth:`frame` gives a DataFrame.

    Every rank keeps the records in memory (they are all-reduced, so identical); only an
    ``enabled`` logger (rank 0) writes the file. Records already in the file are loaded,
    so a resumed run continues the same history.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, filename: str = "history.jsonl") -> None:
        self.path = Path(run_dir) / filename
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if self.path.is_file():
            with self.path.open() as stream:
                self.records = [json.loads(line) for line in stream if line.strip()]

    def log(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``record`` (plain-data values) and return it."""
        record = to_plain(dict(record))
        self.records.append(record)
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as stream:
                stream.write(json.dumps(record, default=str) + "\n")
        return record

    def drop_after(self, epoch: int, key: str = "epoch") -> None:
        """Forget records with ``record[key] > epoch`` (epochs a resumed run will redo)."""
        kept = [r for r in self.records if r.get(key, 0) <= epoch]
        if len(kept) == len(self.records):
            return
        self.records = kept
        if self.enabled:
            text = "".join(json.dumps(r, default=str) + "\n" for r in kept)
            atomic_write(self.path, lambda stream: stream.write(text), mode="w")

    def frame(self) -> pd.DataFrame:
        """The records as a DataFrame (one row per logged record)."""
        return pd.DataFrame(self.records)


# --------------------------------------------------------------------------- mixed precision

#: What a loop may be asked for: ``auto`` resolves per device (:func:`resolve_precision`).
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Help text of the ``precision`` field every training config carries.
PRECISION_HELP = ("autocast precision: fp32 (none), bf16, fp16 (CUDA, with gradient scaling) or auto "
                  "(bf16 on CPUs with native bf16 and on recent GPUs, fp16 on older GPUs, else fp32)")


def cpu_has_native_bf16(description: Mapping[str, Any] | None = None) -> bool:
    """True when the CPU multiplies bf16 matrices in hardware (``avx512_bf16`` or ``amx_bf16`` flag).

    ``description``: :func:`cxrlib.config.cpu_description` (read now when ``None``). Without
    these flags PyTorch emulates bf16 products, which is slower than float32.
    """
    if description is None:
        from cxrlib.config import cpu_description

        description = cpu_description()
    return bool(description.get("avx512_bf16") or description.get("amx_bf16"))


def cuda_bf16_supported(device: str | torch.device = "cuda") -> bool:
    """True when the GPU has bf16 tensor cores (compute capability 8.0 and above: Ampere on)."""
    device = torch.device(device)
    if getattr(torch.version, "hip", None):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return torch.cuda.get_device_capability(device)[0] >= 8


@dataclass(frozen=True)
class Precision:
    """A precision resolved for one device: the autocast and gradient scaling a loop uses.

    ``name``: ``"fp32"`` (no autocast), ``"bf16"`` or ``"fp16"`` (autocast to that dtype;
    ``fp16`` also scales gradients); ``device_type``: ``"cpu"``, ``"cuda"``...;
    ``requested``: what the config asked for; ``reason``: one line on why. Parameters,
    gradients, optimizer state, losses and metrics stay float32 whatever the name: only the
    operations autocast lists (convolutions, matrix products) run in the lower precision.
    """

    name: str = "fp32"
    device_type: str = "cpu"
    requested: str = "fp32"
    reason: str = "asked for"

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype (``torch.float32`` for ``fp32``)."""
        return _DTYPES[self.name]

    @property
    def enabled(self) -> bool:
        """True when autocast is on (``bf16`` or ``fp16``)."""
        return self.name != "fp32"

    @property
    def scales_gradients(self) -> bool:
        """True for ``fp16``: its narrow exponent range needs loss scaling (bf16 has float32's)."""
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to :attr:`dtype` on this device type; a do-nothing context for fp32."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, active for ``fp16`` only (:attr:`scales_gradients`).

        A disabled scaler's ``scale(loss)`` returns ``loss`` and ``step(optimizer)`` just calls
        ``optimizer.step()``, so one loop serves every precision.
        """
        enabled = self.scales_gradients
        return torch.amp.GradScaler(self.device_type if enabled else "cuda", enabled=enabled)

    def record(self) -> dict[str, str]:
        """Plain data for checkpoints and ``metrics.json``: ``precision``, ``precision_requested``,
        ``precision_reason``."""
        return {"precision": self.name, "precision_requested": self.requested, "precision_reason": self.reason}


def resolve_precision(
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    *,
    amp: bool = False,
    cpu: Mapping[str, Any] | None = None,
    cuda_bf16: bool | None = None,
) -> Precision:
    """The :class:`Precision` that ``precision`` (one of :data:`PRECISIONS`) means on ``device``.

    - ``"auto"``: on the CPU bf16 when it has native bf16 (:func:`cpu_has_native_bf16`),
      else fp32; on CUDA bf16 where the GPU supports it (:func:`cuda_bf16_supported`), else
      fp16 with gradient scaling; fp32 on other devices (MPS).
    - ``"fp32"``: no autocast; except that ``amp=True`` (the former CUDA-only switch of the
      training configs, kept so existing settings run as before) gives fp16 on CUDA.
    - ``"bf16"``: autocast to bf16 (a warning on a CPU without native bf16, where it is
      emulated and slower; a ValueError on a GPU without it).
    - ``"fp16"``: CUDA only, with gradient scaling; refused elsewhere with a ValueError.

    ``cpu`` (a :func:`cxrlib.config.cpu_description`) and ``cuda_bf16`` replace the
    detection (tests, or to plan for another machine).
    """
    requested = str(precision or "fp32").strip().lower()
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    kind = torch.device(device).type

    def chosen(name: str, reason: str) -> Precision:
        return Precision(name=name, device_type=kind, requested=requested, reason=reason)

    if requested == "fp32":
        if amp and kind == "cuda":
            return chosen("fp16", "fp32 asked with amp=True: the former CUDA float16 autocast")
        return chosen("fp32", "asked for")
    if kind == "cpu":
        if requested == "fp16":
            raise ValueError("precision 'fp16' is for CUDA: on the CPU float16 needs gradient scaling and has "
                             "no fast kernels; use 'bf16' (or 'auto', which picks it where the CPU has native bf16)")
        native = cpu_has_native_bf16(cpu)
        if requested == "auto":
            if native:
                return chosen("bf16", "auto: the CPU has native bf16 (avx512_bf16 / amx_bf16)")
            return chosen("fp32", "auto: the CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag)")
        if not native:
            warnings.warn("precision 'bf16' on a CPU without native bf16 (no avx512_bf16 / amx_bf16 flag): "
                          "PyTorch emulates it, slower than fp32", stacklevel=2)
            return chosen("bf16", "asked for (emulated: no native bf16 on this CPU)")
        return chosen("bf16", "asked for")
    if kind == "cuda":
        bf16_ok = cuda_bf16_supported(device) if cuda_bf16 is None else bool(cuda_bf16)
        if requested == "auto":
            if bf16_ok:
                return chosen("bf16", "auto: the GPU supports bf16")
            return chosen("fp16", "auto: the GPU has no bf16; fp16 with gradient scaling")
        if requested == "bf16" and not bf16_ok:
            raise ValueError("precision 'bf16' asked for but this GPU has no bf16 support (compute capability "
                             "below 8.0); use 'fp16' or 'auto'")
        return chosen(requested, "asked for")
    if requested == "auto":
        return chosen("fp32", f"auto: no mixed precision on {kind}")
    raise ValueError(f"precision {requested!r} is offered on CPU and CUDA only, not on {kind}; use 'fp32' or 'auto'")


def as_precision(precision: str | Precision, device: str | torch.device, *, amp: bool = False) -> Precision:
    """``precision`` resolved for ``device``: a :class:`Precision` for this device type is kept,
    one for another device type is resolved again from its name, a string goes through
    :func:`resolve_precision`."""
    if isinstance(precision, Precision):
        if precision.device_type == torch.device(device).type:
            return precision
        precision = precision.name
    return resolve_precision(precision, device, amp=amp)


def autocast_context(device: str | torch.device, enabled: bool = True,
                     dtype: torch.dtype = torch.float16) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` when ``enabled`` on CUDA, or with ``dtype=torch.bfloat16`` on
    the CPU; a do-nothing context otherwise (float16 on the CPU stays float32).

    The training loops use :meth:`Precision.autocast` (from :func:`resolve_precision`) instead.
    """
    kind = torch.device(device).type
    if enabled and (kind == "cuda" or (kind == "cpu" and dtype == torch.bfloat16)):
        return torch.autocast(device_type=kind, dtype=dtype)
    return contextlib.nullcontext()


def make_grad_scaler(device: str | torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A GradScaler that is active only for CUDA float16 training; a pass-through otherwise.

    A disabled scaler's ``scale(loss)`` returns ``loss`` and ``step(optimizer)`` just
    calls ``optimizer.step()``, so one loop serves both cases.
    """
    return torch.amp.GradScaler("cuda", enabled=enabled and torch.device(device).type == "cuda")
