"""Project paths, seeding and device choice.

Paths default to folders inside the project checkout and can be moved with
environment variables, so a notebook never hard-codes a location:

- ``CXR_DATA_DIR``: cached inputs (phantom cohorts, prepared datasets); default ``<root>/data``.
- ``CXR_RUNS_DIR``: executed notebooks, checkpoints and metrics; default ``<root>/runs``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

#: The checkout that holds ``cxrlib/`` (``pip install -e .`` keeps it importable from anywhere).
PROJECT_ROOT: Path = Path(__file__).resolve().parent.parent


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser().resolve() if value else default


def data_dir() -> Path:
    """Folder for cached inputs (``$CXR_DATA_DIR`` or ``<project>/data``)."""
    return _env_path("CXR_DATA_DIR", PROJECT_ROOT / "data")


def runs_dir() -> Path:
    """Folder for run outputs (``$CXR_RUNS_DIR`` or ``<project>/runs``)."""
    return _env_path("CXR_RUNS_DIR", PROJECT_ROOT / "runs")


def notebooks_dir() -> Path:
    return PROJECT_ROOT / "notebooks"


def figures_dir() -> Path:
    return PROJECT_ROOT / "figures"


def seed_everything(seed: int, *, deterministic: bool = False) -> int:
    """Seed Python, NumPy and PyTorch (CPU and all GPUs); return the seed.

    ``deterministic=True`` also asks PyTorch for deterministic kernels (slower on GPU).
    DataLoader workers are seeded by :func:`seed_worker` plus a seeded ``generator``
    (see :func:`dataloader_generator`).
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    os.environ["PYTHONHASHSEED"] = str(seed)  # for subprocesses started from here
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return seed
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return seed


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader: derive NumPy / random seeds from torch's per-worker seed."""
    import torch

    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def dataloader_generator(seed: int):
    """A seeded ``torch.Generator`` for DataLoader shuffling and worker seeds."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


def resolve_device(device: str = "auto"):
    """Turn ``"auto"`` / ``"cpu"`` / ``"cuda"`` / ``"cuda:1"`` / ``"mps"`` into a ``torch.device``.

    ``auto`` picks CUDA, then Apple MPS, then the CPU. Asking for an accelerator that is
    not there raises a ``RuntimeError`` that says so, rather than silently using the CPU.
    """
    import torch

    name = (device or "auto").strip().lower()
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
    if name == "mps" and not mps_ok:
        raise RuntimeError("device 'mps' requested but Apple MPS is not available on this machine")
    return torch.device(name)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_cpu_threads(requested: int = 0) -> int:
    """Set PyTorch's intra-op CPU threads and return the number set.

    ``requested > 0`` is taken as it is; ``0`` means every core this process may use. The
    count never depends on the machine's current load: floating-point reductions split over
    another number of threads add up in another order, so a load-dependent count would make
    a rerun compute different numbers.
    """
    import torch

    if requested < 0:
        raise ValueError(f"NUM_THREADS must be >= 0, got {requested}")
    threads = int(requested) if requested > 0 else available_cores()
    torch.set_num_threads(threads)
    return threads


def cpu_description() -> dict[str, object]:
    """What a timing or a result was computed on: CPU model, cores, PyTorch's CPU capability, bf16."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:  # not Linux
        pass
    return {
        "model": model,
        "cores": available_cores(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }
