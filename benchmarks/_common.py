"""Helpers shared by the benchmark scripts (run as ``python benchmarks/bench_<name>.py``)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the platform has none): timings depend on it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine(threads: int | None, load_before: float | None) -> dict:
    """Where a benchmark ran: platform, Python, PyTorch, the CPU (model, cores, bf16 support),
    the CUDA device if any, PyTorch threads, and the load average before and after."""
    from cxrlib.config import cpu_description

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu_description(), "cpu_count": os.cpu_count(), "threads": threads,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_1min_before": load_before, "load_average_1min_after": load_average()}


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock timings cover it (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_result(path: Path, payload: dict) -> Path:
    """Write a benchmark's result as indented JSON (creating the folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path
