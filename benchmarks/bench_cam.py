"""Class activation map throughput per method (images per second), and the faithfulness metrics' cost.

For each architecture and input side (``--configs arch:size``, default the two sizes the
profiles explain: ``small_cnn:48`` as in the ``default`` profile, ``resnet18:96`` as in
``real-cpu``), a randomly initialised classifier explains random ``size`` x ``size`` grey
images with each method of :data:`cxrlib.explain.cam.CAM_METHODS` through
:func:`cxrlib.explain.cam.compute_cams` (hooks made and removed every call, as the
notebook does). ScoreCAM runs one forward pass per channel of the target layer, so it is
timed on ``--scorecam-images`` images (512 channels of ResNet-18 make it hundreds of times
slower than Grad-CAM). ``road`` is :func:`cxrlib.explain.saliency.faithfulness` (ROAD at
``--road-percentiles`` plus CAM-multiply) on Grad-CAM maps: its sparse imputation solves
run on the CPU whatever the device.

Each number is the median over ``--repeats`` timed rounds after one warm-up round, with
the best and worst round and the 1-minute load average (a shared machine's load moves
wall-clock numbers).

Usage::

    python benchmarks/bench_cam.py
    python benchmarks/bench_cam.py --configs small_cnn:48 --threads 1 2 --devices cpu cuda

Writes ``benchmarks/results/cam.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from _common import load_average, sync

from cxrlib.explain.cam import CAM_METHODS, cam_resolution, compute_cams
from cxrlib.explain.saliency import faithfulness
from cxrlib.models.classifiers import build_classifier, count_parameters
from cxrlib.runs import write_json

HERE = Path(__file__).resolve().parent


def _timed(work: Callable[[], object], n_images: int, repeats: int, device: torch.device) -> dict:
    work()  # warm-up: imports, allocations, cuDNN autotune
    sync(device)
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        sync(device)
        walls.append(time.perf_counter() - start)
    wall = statistics.median(walls)
    return {"images": n_images, "images_per_s": round(n_images / wall, 2),
            "ms_per_image": round(1000 * wall / n_images, 2),
            "images_per_s_best": round(n_images / min(walls), 2),
            "images_per_s_worst": round(n_images / max(walls), 2), "rounds": repeats,
            "load_average_1min": load_average()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["small_cnn:48", "resnet18:96"],
                        help="architecture:input side pairs to measure")
    parser.add_argument("--methods", nargs="+", default=[*CAM_METHODS, "road"],
                        help=f"CAM methods ({', '.join(CAM_METHODS)}) and/or 'road' (faithfulness metrics)")
    parser.add_argument("--images", type=int, default=16, help="images per round (one compute_cams call)")
    parser.add_argument("--scorecam-images", type=int, default=2, help="images per round for ScoreCAM")
    parser.add_argument("--road-percentiles", type=int, nargs="+", default=[25, 50, 75],
                        help="ROAD percentiles (the default profile's)")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"],
                        help="cpu and/or cuda; cuda is skipped when it is not available")
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="PyTorch CPU threads to measure with (0: PyTorch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cam.json", help="JSON output file")
    args = parser.parse_args(argv)

    unknown = [m for m in args.methods if m not in CAM_METHODS and m != "road"]
    if unknown:
        parser.error(f"unknown methods {unknown}")
    default_threads = torch.get_num_threads()
    results = []
    for spec in args.configs:
        arch, _, size_text = spec.partition(":")
        size = int(size_text or 224)
        for name in args.devices:
            if name.startswith("cuda") and not torch.cuda.is_available():
                print(f"skip {name}: CUDA is not available", flush=True)
                continue
            device = torch.device(name)
            thread_settings = args.threads if device.type == "cpu" else [0]
            for threads in thread_settings:
                torch.set_num_threads(threads or default_threads)
                torch.manual_seed(args.seed)
                model = build_classifier(arch, 2).to(device).eval()
                images = torch.rand(args.images, 1, size, size, generator=torch.Generator().manual_seed(args.seed))
                grid = cam_resolution(model, size)
                for method in args.methods:
                    if method == "road":
                        maps = compute_cams(model, images, method="gradcam", target_class=1)
                        work = partial(faithfulness, model, images, maps, 1, percentiles=args.road_percentiles)
                        n_images = len(images)
                    else:
                        batch = images[: args.scorecam_images] if method == "scorecam" else images
                        work = partial(compute_cams, model, batch, method=method, target_class=1)
                        n_images = len(batch)
                    row = _timed(work, n_images, args.repeats, device)
                    row.update(arch=arch, size=size, method=method, device=str(device), cam_grid=list(grid),
                               parameters=count_parameters(model),
                               cpu_threads=torch.get_num_threads() if device.type == "cpu" else None)
                    results.append(row)
                    print(f"{arch:10s} {size:4d} px {row['device']:5s} threads={row['cpu_threads']} {method:10s} "
                          f"{row['images_per_s']:9.2f} images/s ({row['ms_per_image']:.1f} ms/image, "
                          f"load {row['load_average_1min']})", flush=True)
            torch.set_num_threads(default_threads)

    payload = {
        "benchmark": "cam",
        "road_percentiles": args.road_percentiles,
        "results": results,
        "torch": torch.__version__,
        "cpu_threads_default": default_threads,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
