"""U-Net training and inference throughput (images/s) at 256x256, on the CPU and, when CUDA is there, the GPU.

One training step = forward + Dice/cross-entropy loss + backward + AdamW step on a batch of
random images and labels (throughput does not depend on pixel values); inference = forward
+ argmax under ``torch.no_grad``. After ``--warmup`` steps, ``--steps`` steps are timed in
``--repeats`` rounds; the median round gives ``images_per_s`` (best and worst rounds are kept
too, and the 1-minute load average, because a shared machine's load moves wall-clock
numbers). The CPU is measured in float32, once per ``--cpu-threads`` value (0: PyTorch's
default, all cores; on a busy shared machine one thread can be several times faster); the GPU in float32 and with float16 autocast + ``channels_last`` (AMP), synchronising before
each clock read. Each model configuration (``--widths``, ``--depth``) is measured separately.

Usage::

    python benchmarks/bench_unet.py
    python benchmarks/bench_unet.py --size 256 --batch 8 --widths 8 16 --out benchmarks/results/unet.json
    python benchmarks/bench_unet.py --devices cuda      # GPU only

Writes ``benchmarks/results/unet.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import load_average, sync, write_result

from cxrlib.models.unet import UNet, UNetConfig, count_parameters
from cxrlib.train.engine import autocast_context, make_grad_scaler
from cxrlib.train.segmentation import segmentation_loss

HERE = Path(__file__).resolve().parent


def measure(model_config: UNetConfig, device: torch.device, *, size: int, batch: int, steps: int,
            warmup: int, repeats: int, amp: bool, channels_last: bool, train: bool) -> dict:
    """Median / best / worst images per second of ``steps`` training or inference steps."""
    torch.manual_seed(0)
    model = UNet(model_config).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = torch.rand(batch, 1, size, size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, model_config.num_classes, (batch, size, size), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = make_grad_scaler(device, amp)

    def step() -> None:
        if train:
            with autocast_context(device, amp):
                logits = model(images)
            loss, _ = segmentation_loss(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            with torch.no_grad(), autocast_context(device, amp):
                model(images).argmax(dim=1)

    model.train(train)
    for _ in range(warmup):
        step()
    sync(device)
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        walls.append(time.perf_counter() - start)
    n_images = steps * batch
    wall = statistics.median(walls)
    result = {
        "mode": "train" if train else "inference",
        "device": str(device),
        "amp": amp,
        "channels_last": channels_last,
        "images_per_s": round(n_images / wall, 2),
        "ms_per_image": round(1000 * wall / n_images, 2),
        "images_per_s_best": round(n_images / min(walls), 2),
        "images_per_s_worst": round(n_images / max(walls), 2),
        "batch": batch,
        "steps_per_round": steps,
        "rounds": repeats,
        "load_average_1min": load_average(),
    }
    if device.type == "cuda":
        result["max_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        torch.cuda.reset_peak_memory_stats(device)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16],
                        help="U-Net base_channels to measure (16 is the UNetConfig default)")
    parser.add_argument("--depth", type=int, default=4, help="U-Net down-sampling steps")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"],
                        help="cpu and/or cuda; cuda is skipped when it is not available")
    parser.add_argument("--cpu-threads", type=int, nargs="+", default=[1, 0],
                        help="PyTorch CPU threads to measure with (0: PyTorch's default)")
    parser.add_argument("--cpu-steps", type=int, default=3, help="timed steps per round on the CPU")
    parser.add_argument("--gpu-steps", type=int, default=30, help="timed steps per round on the GPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocations, cuDNN autotune)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "unet.json", help="JSON output file")
    args = parser.parse_args(argv)

    torch.backends.cudnn.benchmark = True
    default_threads = torch.get_num_threads()
    results = []
    for width in args.widths:
        model_config = UNetConfig(base_channels=width, depth=args.depth, num_classes=3)
        n_params = count_parameters(UNet(model_config))
        for name in args.devices:
            if name.startswith("cuda") and not torch.cuda.is_available():
                print(f"skip {name}: CUDA is not available", flush=True)
                continue
            device = torch.device(name)
            if device.type == "cpu":
                settings = [(False, False, threads or default_threads) for threads in args.cpu_threads]
                steps = args.cpu_steps
            else:
                settings = [(False, False, default_threads), (True, True, default_threads)]
                steps = args.gpu_steps
            for amp, channels_last, threads in settings:
                torch.set_num_threads(threads)
                for train in (True, False):
                    row = measure(model_config, device, size=args.size, batch=args.batch, steps=steps,
                                  warmup=args.warmup, repeats=args.repeats, amp=amp,
                                  channels_last=channels_last, train=train)
                    row.update(base_channels=width, depth=args.depth, parameters=n_params,
                               cpu_threads=threads if device.type == "cpu" else None)
                    results.append(row)
                    print(f"width {width:2d} {row['device']:6s} threads={threads} amp={amp!s:5s} {row['mode']:9s} "
                          f"{row['images_per_s']:8.1f} images/s ({row['ms_per_image']:.1f} ms/image, "
                          f"load {row['load_average_1min']})", flush=True)
            torch.set_num_threads(default_threads)

    payload = {
        "benchmark": "unet",
        "size": args.size,
        "results": results,
        "torch": torch.__version__,
        "cpu_threads_default": default_threads,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
    }
    write_result(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
