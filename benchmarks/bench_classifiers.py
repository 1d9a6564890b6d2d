"""Classifier training throughput per architecture, and the data loader's throughput alone.

Training: for each architecture (``--archs``), a full optimizer step (forward, weighted
cross-entropy, backward, AdamW) on random ``--size`` x ``--size`` grey images, batch
``--batch-size``, timed over ``--steps`` steps after ``--warmup`` steps; ``images_per_s`` is
the median over steps (best and worst steps are kept too: a shared machine's load moves
wall-clock numbers, and so is the throughput per second of process CPU time, which with
one thread is what an idle core gives). CPU runs use ``--threads`` threads; on a CUDA GPU (when present, or
``--device cuda``) the same is measured with float16 autocast and channels-last layout,
batch ``--gpu-batch-size``.

Loader: a ``ClassificationDataset`` of ``--loader-images`` PNGs (decoded once into the
uint8 cache) read through a DataLoader with the training augmentation (``light``), for
``--loader-epochs`` epochs; images per second per mode (whole image, lung patches) show
whether the loader can keep up with the networks.

Usage::

    python benchmarks/bench_classifiers.py --steps 3 --threads 2
    python benchmarks/bench_classifiers.py --archs small_cnn resnet18 --device cuda

Writes ``benchmarks/results/classifiers.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import load_average, sync

from cxrlib.data import manifest as mf
from cxrlib.data.classification import ClassificationDataset
from cxrlib.data.io import write_png
from cxrlib.data.masks import LungPatchSampler
from cxrlib.models.classifiers import ARCHITECTURES, build_classifier, count_parameters
from cxrlib.train.classifier import train_step
from cxrlib.train.engine import autocast_context, make_grad_scaler

HERE = Path(__file__).resolve().parent
DEFAULT_ARCHS = ("small_cnn", "resnet18", "resnet50", "densenet121", "vgg16", "squeezenet1_1")


def time_training(arch: str, *, device: torch.device, size: int, batch_size: int, steps: int, warmup: int,
                  amp: bool, channels_last: bool) -> dict:
    """Median / best / worst images per second of one training step of ``arch``."""
    torch.manual_seed(0)
    model = build_classifier(arch, num_classes=2).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = make_grad_scaler(device, amp)
    weights = torch.tensor([0.6, 3.0], device=device)
    images = torch.rand(batch_size, 1, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch_size,), device=device)

    def step() -> None:
        train_step(model, images, labels, weights, optimizer, scaler, lambda: autocast_context(device, amp))

    for _ in range(warmup):
        step()
    sync(device)
    times, cpu_times = [], []
    for _ in range(steps):
        cpu_started, started = time.process_time(), time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    rates = [batch_size / t for t in times]
    return {"arch": arch, "parameters": count_parameters(model), "batch_size": batch_size, "steps": steps,
            "images_per_s": round(statistics.median(rates), 2), "best_images_per_s": round(max(rates), 2),
            "worst_images_per_s": round(min(rates), 2), "step_s_median": round(statistics.median(times), 4),
            # Images per second of process CPU time: with one thread, what an idle core would give.
            "images_per_cpu_s": round(batch_size / statistics.median(cpu_times), 2)}


def _write_images(folder: Path, n: int, size: int) -> pd.DataFrame:
    """``n`` random grey images with an elliptic lung mask, as PNGs, and their manifest rows."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    lungs = (((yy - size / 2) / (size * 0.35)) ** 2 + ((np.abs(xx - size / 2) - size * 0.2) / (size * 0.12)) ** 2) <= 1
    write_png(folder / "lungs.png", lungs)
    rows = []
    for index in range(n):
        path = f"img{index:04d}.png"
        write_png(folder / path, rng.integers(0, 256, (size, size), dtype=np.uint8))
        rows.append({"image_id": str(index), "path": path, "label": "Normal" if index % 4 else "COVID-19",
                     "mask_pred_lung": "lungs.png"})
    return mf.absolute_paths(pd.DataFrame(rows), folder)


def time_loader(manifest: pd.DataFrame, *, mode: str, size: int, source_size: int, batch_size: int, epochs: int,
                num_workers: int) -> dict:
    """Images per second out of a DataLoader over a cached, augmented ClassificationDataset."""
    started = time.perf_counter()
    dataset = ClassificationDataset(manifest, image_size=size, label_map={"Normal": 0, "COVID-19": 1},
                                    input_mode=mode, augment="light", seed=0, source_size=source_size,
                                    patch_sampler=LungPatchSampler(224, reference_size=1024))
    cache_s = time.perf_counter() - started
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    count = 0
    started = time.perf_counter()
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for images, _ in loader:
            count += images.shape[0]
    elapsed = time.perf_counter() - started
    return {"mode": mode, "images": len(dataset), "epochs": epochs, "num_workers": num_workers,
            "image_size": size, "source_size": source_size if mode == "patch" else None,
            "cache_fill_s": round(cache_s, 3), "images_per_s": round(count / elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS), choices=sorted(ARCHITECTURES),
                        help="architectures to time")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=8, help="CPU batch size")
    parser.add_argument("--gpu-batch-size", type=int, default=64, help="GPU batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per architecture (CPU)")
    parser.add_argument("--gpu-steps", type=int, default=20, help="timed training steps per architecture (GPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CPU, plus CUDA when available; cpu / cuda: only that one")
    parser.add_argument("--loader-images", type=int, default=64, help="images in the loader benchmark")
    parser.add_argument("--loader-epochs", type=int, default=3, help="epochs read in the loader benchmark")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers in the loader benchmark")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "classifiers.json", help="JSON output")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    result: dict = {
        "benchmark": "classifiers", "image_size": args.size, "threads": args.threads,
        "load_average_before": load_average(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "train": [], "loader": [],
    }
    devices: list[tuple[torch.device, bool]] = []
    if args.device in ("auto", "cpu"):
        devices.append((torch.device("cpu"), False))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append((torch.device("cuda"), True))
        result["gpu"] = torch.cuda.get_device_name(0)
    for device, on_gpu in devices:
        for arch in args.archs:
            row = time_training(arch, device=device, size=args.size,
                                batch_size=args.gpu_batch_size if on_gpu else args.batch_size,
                                steps=args.gpu_steps if on_gpu else args.steps, warmup=args.warmup,
                                amp=on_gpu, channels_last=on_gpu)
            row.update(device=device.type, amp=on_gpu, channels_last=on_gpu)
            result["train"].append(row)
            print(f"train {device.type:4s} {arch:14s} {row['images_per_s']:9.1f} img/s "
                  f"(best {row['best_images_per_s']:.1f}, worst {row['worst_images_per_s']:.1f}; "
                  f"{row['images_per_cpu_s']:.1f} img per CPU-s)", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        manifest = _write_images(Path(folder), args.loader_images, 256)
        for mode, source_size in (("whole", 256), ("patch", 1024)):
            row = time_loader(manifest, mode=mode, size=args.size, source_size=source_size,
                              batch_size=args.batch_size, epochs=args.loader_epochs, num_workers=args.num_workers)
            result["loader"].append(row)
            print(f"loader {mode:6s} {row['images_per_s']:9.1f} img/s (cache filled in {row['cache_fill_s']} s)",
                  flush=True)
    result["load_average_after"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} (load average {result['load_average_before']} -> {result['load_average_after']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
