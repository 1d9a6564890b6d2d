"""Helpers shared by the benchmark scripts (run as ``python benchmarks/bench_<name>.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the platform has none): timings depend on it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


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
