"""Fréchet distance cost: :func:`cxrlib.evaluate.synthesis.frechet_distance` against a ``sqrtm`` reference.

FD needs ``tr((S_a S_b)^(1/2))``. The project computes it exactly from eigenvalues (``D`` at
most the set sizes) or from the singular values of ``A B^T`` (more dimensions than images,
e.g. 2048-dim Inception features of a few hundred images); the textbook route takes
``scipy.linalg.sqrtm`` of the ``D x D`` product. For each ``(N, M, D)`` this times both on
Gaussian features (median of ``--repeats``; the reference once, it is slow) and reports the
two values, which must agree.

Usage::

    python benchmarks/bench_fd.py                       # 64-, 512- and 2048-dim cases
    python benchmarks/bench_fd.py --no-reference        # the project's route only

Writes ``benchmarks/results/fd.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _common import load_average, write_result
from scipy import linalg

from cxrlib.evaluate.synthesis import frechet_distance

HERE = Path(__file__).resolve().parent
CASES = ((1000, 900, 64), (300, 250, 512), (300, 250, 2048))


def reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook FD with ``scipy.linalg.sqrtm`` (real part of the trace)."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b)
                 - 2.0 * np.trace(root).real)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the project's route")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow sqrtm reference")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fd.json")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    rows = []
    for n, m, dim in CASES:
        a = rng.normal(size=(n, dim))
        b = rng.normal(size=(m, dim)) * 1.1 + 0.05
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            value = frechet_distance(a, b)
            times.append(time.perf_counter() - started)
        row = {"n": n, "m": m, "dim": dim, "fd": value, "seconds": round(statistics.median(times), 4)}
        if not args.no_reference:
            started = time.perf_counter()
            row["fd_sqrtm"] = reference_fd(a, b)
            row["seconds_sqrtm"] = round(time.perf_counter() - started, 3)
            row["relative_difference"] = abs(row["fd"] - row["fd_sqrtm"]) / max(abs(row["fd_sqrtm"]), 1e-12)
        rows.append(row)
        reference = (f"; sqrtm {row['fd_sqrtm']:.4f} in {row['seconds_sqrtm']:.2f} s" if "fd_sqrtm" in row else "")
        print(f"N={n} M={m} D={dim}: {value:.4f} in {row['seconds']:.3f} s{reference}", flush=True)
    result = {"benchmark": "fd", "cases": rows, "repeats": args.repeats, "numpy": np.__version__,
              "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "load_average_1min": load_average()}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
