"""Wall-clock time of notebook 04's classifier grid, with every condition, before a CycleGAN exists.

The grid's synthetic conditions need notebook 03's images. To time the whole grid (and to
see what synthetic images *could* do), this script adds stand-in synthetic COVID-19 images
rendered by the phantom generator (:func:`cxrlib.data.oracle.oracle_synthetic`: one per
train-split normal / pneumonia image, from the same site and view). They come from the
generator that made the real COVID-19 phantoms, so the synthetic-condition numbers are an
upper bound, not CycleGAN results.

The grid settings are the notebook's for ``--profile`` (its parameters cell and ``cxrlib/profiles/<name>.yaml``);
cells are trained into ``--run-dir`` (a fresh temporary folder by default, so nothing is
loaded from an earlier run).

Usage::

    python benchmarks/bench_experiments.py --manifest runs/phantom-default/02_segmentation/manifest.csv
    python benchmarks/bench_experiments.py --manifest ... --conditions real real_oversample   # real only

Writes ``benchmarks/results/experiments.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from cxrlib import runs
from cxrlib.data import manifest as mf
from cxrlib.data.oracle import oracle_synthetic
from cxrlib.stages import classifiers as ex
from cxrlib.stages.runtime import stage_parameters

HERE = Path(__file__).resolve().parent


def grid_config(profile: str, seed: int, device: str, conditions: list[str] | None) -> ex.GridConfig:
    """Notebook 04's grid for a profile (its parameters cell, then the profile's overrides)."""
    params = stage_parameters("04", profile, SEED=seed, DEVICE=device)
    return ex.grid_config_from_params(params, conditions=conditions or params["CONDITIONS"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, type=Path, help="notebook 02's (or 01's) manifest.csv")
    parser.add_argument("--profile", default="default", help="pipeline profile whose grid settings are used")
    parser.add_argument("--conditions", nargs="+", default=None, help="conditions to run (default: the profile's)")
    parser.add_argument("--synthetic-dir", type=Path, default=None,
                        help="where the stand-in synthetic images go (default: next to --run-dir)")
    parser.add_argument("--run-dir", type=Path, default=None, help="grid folder (default: a new temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "experiments.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="cxr-grid-"))
    load_before = os.getloadavg()
    manifest = mf.read_manifest(args.manifest)
    started = time.perf_counter()
    manifest = oracle_synthetic(manifest, args.synthetic_dir or run_dir / "oracle_synthetic", checkpoint="oracle",
                                seed=args.seed)
    synthetic_seconds = time.perf_counter() - started
    config = grid_config(args.profile, args.seed, args.device, args.conditions)
    started = time.perf_counter()
    results = ex.run_grid(manifest, config, run_dir)
    grid_seconds = time.perf_counter() - started
    predictions = ex.read_predictions(results)
    summary = ex.summarize_over_seeds(predictions, ("sensitivity", "specificity", "auc"), n_boot=config.n_boot,
                                      seed=args.seed)
    comparisons = {t: ex.compare_conditions(predictions, "real", t, ("sensitivity", "auc"), n_boot=config.n_boot,
                                            seed=args.seed).to_dict("records")
                   for t in ("real_oversample", "real_gnc", "real_gnc_gpc", "synthetic_only")
                   if {"real", t} <= set(config.conditions)}
    report = {
        "benchmark": "experiments",
        "note": "synthetic conditions use phantom-rendered stand-in images (cxrlib.data.oracle), not CycleGAN output",
        "manifest": str(args.manifest),
        "profile": args.profile,
        "cells": len(results),
        "cells_trained": int((results["status"] == "trained").sum()),
        "grid_seconds": round(grid_seconds, 1),
        "seconds_per_cell_median": float(results["train_seconds"].median()),
        "seconds_per_cell_by_condition": results.groupby("condition")["train_seconds"].median().round(1).to_dict(),
        "synthetic_render_seconds": round(synthetic_seconds, 1),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "platform": platform.platform(),
        "grid_config": runs.to_plain(config),
        "seed_mean_summary": summary.to_dict("records"),
        "comparisons": comparisons,
        "run_dir": str(run_dir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs.write_json(args.out, report)
    print(json.dumps({k: report[k] for k in ("cells", "grid_seconds", "seconds_per_cell_median",
                                               "load_average_before", "load_average_after")}, indent=1))
    print(summary.pivot_table(index=["task", "condition"], columns="metric", values="estimate", sort=False).round(3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
