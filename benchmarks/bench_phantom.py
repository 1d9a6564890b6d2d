"""Phantom generator throughput on ONE core: ``render`` alone, then ``write_cohort`` with PNGs.

Math libraries are limited to one thread before numpy is imported and, where the OS allows,
the process is pinned to one CPU (``--no-pin`` keeps all CPUs). ``render`` is timed over
``--n`` studies of mixed classes, views and sites, ``--repeats`` times after a warm-up; the
median round gives ``images_per_s`` (best and worst rounds and the process CPU time are kept
too, because a shared machine's load moves wall-clock numbers). ``write_cohort`` is then timed
on a cohort of about ``--n`` images written to a temporary folder (image, clean image and five
masks per study as PNG, plus the manifest).

Usage::

    python benchmarks/bench_phantom.py
    python benchmarks/bench_phantom.py --size 256 --n 300 --out benchmarks/results/phantom.json

Writes ``benchmarks/results/phantom.json`` (``--out``).
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_name] = "1"  # before numpy is imported: one core means one thread

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from _common import load_average, write_result  # noqa: E402

from cxrlib.data.phantom import (  # noqa: E402
    DEFAULT_SITES,
    LABELS,
    VIEWS,
    CohortConfig,
    PhantomGenerator,
    plan_cohort,
    write_cohort,
)

HERE = Path(__file__).resolve().parent


def _pin_one_cpu() -> int | None:
    """Pin this process to its first allowed CPU; return that CPU (None where unsupported)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def _jobs(n: int, offset: int) -> list[tuple[str, int, str, int]]:
    """(label, seed, view, site index) for n studies: classes, views and sites interleaved."""
    return [(LABELS[k % len(LABELS)], offset + k, VIEWS[(k // 3) % len(VIEWS)],
             (k // 2) % len(DEFAULT_SITES)) for k in range(n)]


def time_render(generator: PhantomGenerator, n: int, repeats: int) -> dict:
    """Median / best / worst images per second of ``render`` over ``repeats`` rounds of n."""
    for label, seed, view, site in _jobs(max(10, n // 10), 10**6):  # warm-up: caches, glyphs
        generator.render(label, seed, view=view, site=DEFAULT_SITES[site])
    walls, cpus = [], []
    for r in range(repeats):
        jobs = _jobs(n, r * n)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for label, seed, view, site in jobs:
            generator.render(label, seed, severity=0.3 + 0.7 * (seed % 5) / 4, view=view,
                             site=DEFAULT_SITES[site])
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    wall = statistics.median(walls)
    return {
        "images_per_s": round(n / wall, 1),
        "ms_per_image": round(1000 * wall / n, 3),
        "images_per_s_best": round(n / min(walls), 1),
        "images_per_s_worst": round(n / max(walls), 1),
        "cpu_ms_per_image": round(1000 * statistics.median(cpus) / n, 3),
        "rounds": repeats,
    }


def time_write_cohort(size: int, n: int, seed: int = 0) -> dict:
    """Images per second of ``write_cohort`` (rendering + PNG encoding + manifest)."""
    patients = max(1, round(n / 2.5))  # 1-4 studies per patient, 2.5 on average
    config = CohortConfig(n_patients=patients, seed=seed, size=size)
    n_images = len(plan_cohort(config))
    with tempfile.TemporaryDirectory() as folder:
        write_cohort(Path(folder) / "warm", CohortConfig(n_patients=2, seed=seed + 1, size=size),
                     progress=False)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        write_cohort(Path(folder) / "cohort", config, progress=False)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        files = sum(1 for _ in (Path(folder) / "cohort").rglob("*.png"))
    return {
        "images_per_s": round(n_images / wall, 1),
        "ms_per_image": round(1000 * wall / n_images, 3),
        "cpu_ms_per_image": round(1000 * cpu / n_images, 3),
        "n_images": n_images,
        "n_patients": patients,
        "png_files": files,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--n", type=int, default=300, help="studies per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of render")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "phantom.json",
                        help="JSON file for the results")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    parser.add_argument("--skip-write", action="store_true", help="time render only")
    args = parser.parse_args(argv)

    cpu = None if args.no_pin else _pin_one_cpu()
    init0 = time.perf_counter()
    generator = PhantomGenerator(args.size, seed=0)
    init_s = time.perf_counter() - init0
    load_before = load_average()
    render = time_render(generator, args.n, args.repeats)
    result = {
        "benchmark": "phantom",
        "size": args.size,
        "n": args.n,
        **render,
        "generator_init_s": round(init_s, 3),
        "threads": 1,
        "pinned_cpu": cpu,
        "load_average_1min": load_before,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if not args.skip_write:
        result["write_cohort"] = time_write_cohort(args.size, args.n)
    print(f"render {args.size}x{args.size}: {render['images_per_s']} images/s "
          f"({render['ms_per_image']} ms/image; best {render['images_per_s_best']}, "
          f"worst {render['images_per_s_worst']} images/s; CPU {render['cpu_ms_per_image']} ms)")
    if "write_cohort" in result:
        write = result["write_cohort"]
        print(f"write_cohort: {write['images_per_s']} images/s ({write['ms_per_image']} ms/image "
              f"incl. {write['png_files'] // max(1, write['n_images'])} PNGs each, "
              f"{write['n_images']} images)")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
