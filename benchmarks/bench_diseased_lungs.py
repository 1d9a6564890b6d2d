"""Lung segmentation on diseased adult lungs: train the multi-source recipe and score it.

    python benchmarks/bench_diseased_lungs.py --radiography DATA/covid19-radiography \
        --segmentations DATA/covid-segmentations --out /tmp/diseased-lungs [--cohort MANIFEST.csv]
        [--expert-fold K]          # patient-level cross-validation of the expert patients
    python benchmarks/bench_diseased_lungs.py --out /tmp/cv --pool /tmp/cv0 /tmp/cv1 ...
    python benchmarks/bench_diseased_lungs.py --out /tmp/reruns --pool-runs /tmp/cv-seed0 /tmp/cv-seed1 ...

Trains :class:`cxrlib.stages.lung_segmentation.DiseasedLungRecipe` on covid19-radiography
(visible lungs, notebook 02's split) and the covid-segmentations training patients
(anatomical lungs, held-out patients kept out), then writes ``metrics.json`` with Dice / HD95
under each lung convention on both test sets (without test-time augmentation, and with the
recipe's: flips and ``--zooms``; the ``*_flips`` keys and tables), the
per-image tables, Dice against lesion burden, and, with ``--cohort`` (a manifest such as
notebook 01's), the mask quality control of the cohort's segmentation with its gallery.
``--pool-runs`` takes pooled cross-validations of the same patients by several seeds and writes
what holds over reruns: each statistic per seed, their mean, and the interval over seeds and
patients (``reruns_metrics.json``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path

import torch
from _common import load_average, write_result

from cxrlib.data import manifest as mf
from cxrlib.data.sources import Covid19RadiographyDatabase, CovidSegmentations
from cxrlib.stages import lung_segmentation as seg
from cxrlib.viz import figures
from cxrlib.viz import segmentation as segviz


def _yes(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes")


def _names(text: str) -> tuple[str, ...]:
    """``a,b,c`` -> ``("a", "b", "c")`` (e.g. ``--opacity-kinds``)."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _factors(text: str) -> tuple[float, ...]:
    """``1,1.15,1.3`` -> ``(1.0, 1.15, 1.3)`` (e.g. ``--zooms``)."""
    return tuple(float(value) for value in _names(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--radiography", default="", help="covid19-radiography folder (not with --pool)")
    parser.add_argument("--segmentations", default="", help="covid-segmentations folder (not with --pool)")
    parser.add_argument("--out", required=True, help="output folder (the U-Net resumes from it)")
    parser.add_argument("--cohort", default="", help="manifest to segment and quality-control")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    parser.add_argument("--n-expert-test-patients", type=int, default=12)
    parser.add_argument("--expert-fold", type=int, default=None,
                        help="cross-validation: test this fold of the expert patients (0-based)")
    parser.add_argument("--expert-folds", type=int, default=4, help="folds of the expert patients")
    parser.add_argument("--pool", nargs="+", default=None,
                        help="pool the expert test tables of these fold outputs into OUT/cv_metrics.json")
    parser.add_argument("--pool-runs", nargs="+", default=None,
                        help="pooled cross-validations (--pool outputs) of several seeds: OUT/reruns_metrics.json")
    for item in fields(seg.DiseasedLungRecipe):
        kind = {bool: _yes, type(None): int, tuple: _names}.get(type(item.default), type(item.default))
        if isinstance(item.default, tuple) and all(isinstance(value, float) for value in item.default):
            kind = _factors
        parser.add_argument(f"--{item.name.replace('_', '-')}", type=kind, default=item.default)
    args = parser.parse_args(argv)
    if args.pool_runs:
        return pool_runs([Path(folder) for folder in args.pool_runs], Path(args.out), seed=args.seed)
    if args.pool:
        return pool_folds([Path(folder) for folder in args.pool], Path(args.out), seed=args.seed)
    if not (args.radiography and args.segmentations):
        parser.error("--radiography and --segmentations are required (except with --pool)")
    torch.set_num_threads(args.threads)
    recipe = seg.DiseasedLungRecipe(**{f.name: getattr(args, f.name) for f in fields(seg.DiseasedLungRecipe)})
    out = Path(args.out)
    visible = Covid19RadiographyDatabase(args.radiography).manifest()
    expert = CovidSegmentations(args.segmentations, cache_dir=out / "expert-masks").manifest()
    rows = seg.diseased_lung_rows(visible, expert, n_expert_test_patients=args.n_expert_test_patients,
                                  seed=recipe.seed, expert_fold=args.expert_fold, n_expert_folds=args.expert_folds)
    mf.write_manifest(rows, out / "rows.csv")

    def report(record):
        print(f"epoch {record['epoch']}: loss {record['train_loss']:.3f} val Dice {record['val_dice']:.4f} "
              f"({record['time_s']:.0f} s, load {load_average()})", flush=True)

    started = time.perf_counter()
    result = seg.train_diseased_lung_segmenter(rows, out / "unet", recipe, device="cpu", on_epoch_end=report)
    train_seconds = float(result.history["time_s"].sum())
    metrics: dict = {"recipe": vars(recipe), "train_seconds": train_seconds, "best_epoch": result.best_epoch,
                     "best_val_dice": result.best_val_dice, "load_average": load_average(),
                     "session_seconds": time.perf_counter() - started}
    for name, source in (("covid_segmentations_test", "covid-segmentations"),
                         ("covid19_radiography_test", "covid19-radiography")):
        test = rows[(rows["split"] == "test") & (rows["source"] == source)]
        for flips in (False, True):
            evaluation = seg.evaluate_by_convention(result.model, test, input_size=recipe.image_size,
                                                    flips=flips, zooms=recipe.zooms if flips else (1.0,),
                                                    device="cpu", seed=recipe.seed)
            key = f"{name}{'_flips' if flips else ''}"
            metrics[key] = evaluation.metrics()
            evaluation.per_image.to_csv(out / f"{key}_per_image.csv", index=False)
            print(key, "\n", evaluation.table(), flush=True)
            if source == "covid-segmentations" and flips == recipe.flips:
                burden = evaluation.by_burden(bins=(0.0, 0.1, 0.3, 1.0001))
                burden.to_csv(out / "dice_by_burden.csv", index=False)
                metrics["dice_by_burden"] = burden.to_dict("records")
                figures.save_figure(segviz.dice_by_burden_figure(evaluation, by_burden=burden),
                                    out / "dice_by_burden.png")
                for convention in ("anatomical", "visible"):
                    figures.save_figure(segviz.convention_gallery(evaluation, k=4, convention=convention),
                                        out / f"best_worst_{convention}.png")
    if args.cohort:
        cohort = mf.read_manifest(args.cohort)
        started = time.perf_counter()
        # as notebook 02 hands the lungs on: the visible convention, with the recipe's test-time augmentation
        segmented = seg.segment_manifest(result.model, cohort, out / "cohort", input_size=recipe.image_size,
                                         device="cpu", flips=recipe.flips, zooms=recipe.zooms, convention="visible")
        qc = seg.qc_manifest(segmented)
        qc.to_csv(out / "cohort_qc.csv", index=False)
        metrics["cohort_qc"] = {"n_images": int(len(qc)), "n_failed": int((~qc["qc_pass"]).sum()),
                                "failed_share": float((~qc["qc_pass"]).mean()),
                                "reasons": qc.loc[~qc["qc_pass"], "qc_reason"].str.split(" \\(").str[0]
                                .value_counts().to_dict(),
                                "seconds": time.perf_counter() - started}
        figures.save_figure(segviz.qc_failure_gallery(segmented, qc, max_images=30), out / "cohort_qc_failures.png")
    write_result(out / "metrics.json", metrics)
    return 0


def pool_folds(folders: list[Path], out: Path, *, seed: int = 0) -> int:
    """Pool the per-image expert test tables (with flips) of cross-validation folds: every expert
    patient tested once; means, patient-level intervals and worst deciles per convention."""
    import pandas as pd

    from cxrlib.evaluate.segmentation import summarize_by_convention

    tables = [pd.read_csv(folder / "covid_segmentations_test_flips_per_image.csv") for folder in folders]
    pooled = pd.concat(tables, ignore_index=True)
    if pooled.duplicated(["image_id", "convention"]).any():
        raise SystemExit("the folds test some image twice: not folds of one split")
    summary = summarize_by_convention(pooled.drop(columns=["label", "source", "lesion_burden"], errors="ignore"),
                                      seed=seed, groups="patient_id")
    metrics = {"folds": [str(folder) for folder in folders], "n_images": int(pooled["image_id"].nunique()),
               "n_patients": int(pooled["patient_id"].nunique()),
               "train_seconds": [train_seconds_of(folder) for folder in folders]}
    for convention, values in summary.items():
        metrics[convention] = {"dice_mean": values["dice_lungs_mean"], "dice_ci95": values["dice_lungs_ci95"],
                               "dice_worst_decile": values["dice_lungs_worst_decile"],
                               "hd95_mean": values["hd95_lungs_mean"]}
        print(f"{convention}: Dice {values['dice_lungs_mean']:.3f} {values['dice_lungs_ci95']}, "
              f"worst decile {values['dice_lungs_worst_decile']:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    pooled.to_csv(out / "cv_per_image.csv", index=False)
    write_result(out / "cv_metrics.json", metrics)
    return 0


def pool_runs(folders: list[Path], out: Path, *, seed: int = 0) -> int:
    """What holds over reruns: the pooled per-image tables of several seeds' cross-validations
    (:func:`cxrlib.evaluate.segmentation.summarize_reruns`)."""
    import pandas as pd

    from cxrlib.evaluate.segmentation import summarize_reruns

    tables = [pd.read_csv(folder / "cv_per_image.csv") for folder in folders]
    summary = summarize_reruns(tables, seed=seed)
    for convention, statistics in summary.items():
        for name, values in statistics.items():
            low, high = values["ci95"]
            runs = ", ".join(f"{value:.3f}" for value in values["per_run"])
            print(f"{convention:10s} {name:18s} {values['estimate']:.3f} [{low:.3f}, {high:.3f}]  runs: {runs}")
    out.mkdir(parents=True, exist_ok=True)
    write_result(out / "reruns_metrics.json", {"runs": [str(folder) for folder in folders], **summary})
    return 0


def train_seconds_of(fold: Path) -> float:
    """The training time a fold run wrote to its ``metrics.json``."""
    import json

    return float(json.loads((fold / "metrics.json").read_text())["train_seconds"])


if __name__ == "__main__":
    raise SystemExit(main())
