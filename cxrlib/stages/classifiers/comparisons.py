"""Paired comparisons of two conditions: the difference of seed-means with a paired two-level
bootstrap interval (training seeds, then test patients)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cxrlib.evaluate.stats import widened
from cxrlib.stages.classifiers.summaries import INTERVAL_METHOD, percentile_interval, seed_pooled


def compare_conditions(predictions: pd.DataFrame, baseline: str = "real", treatment: str = "real_gnc_gpc",
                       metrics: Sequence[str] = ("sensitivity", "auc"), *, n_boot: int = 1000,
                       seed: int = 0) -> pd.DataFrame:
    """``treatment`` minus ``baseline`` per task, architecture and imbalance (seed-means, paired bootstrap).

    One row per ``(task, arch, imbalance, metric)``: ``baseline`` and ``treatment``
    seed-means with their 95 % intervals and the ``difference`` with its interval, all
    from the same replicates, each drawing training seeds and then test patients (so the
    difference interval covers a rerun with other training runs, and accounts for both
    conditions sharing seeds and patients). Per-seed values are in ``baseline_per_seed`` /
    ``treatment_per_seed``; ``interval`` says how the intervals were formed. Word a claim
    from the difference interval with :mod:`cxrlib.evaluate.claims`.
    """
    chosen = predictions[predictions["condition"].isin([baseline, treatment])]
    pooled = seed_pooled(chosen, ("arch", "imbalance", "condition"), metrics, n_boot, seed)
    rows = []
    pairs = sorted({key[:3] for key in pooled})
    for task, arch, imbalance in pairs:
        base, treat = pooled.get((task, arch, imbalance, baseline)), pooled.get((task, arch, imbalance, treatment))
        if base is None or treat is None:
            continue
        for metric in metrics:
            b_seed = np.asarray(base["per_seed"][metric], dtype=np.float64)
            t_seed = np.asarray(treat["per_seed"][metric], dtype=np.float64)
            b_boot, t_boot = base["boot"][metric], treat["boot"][metric]
            n = min(len(b_boot), len(t_boot))
            rows.append({
                "task": task, "arch": arch, "imbalance": imbalance, "metric": metric,
                "baseline": baseline, "treatment": treatment,
                "baseline_estimate": float(np.nanmean(b_seed)), **_named_interval("baseline", b_boot, b_seed),
                "treatment_estimate": float(np.nanmean(t_seed)), **_named_interval("treatment", t_boot, t_seed),
                "difference": float(np.nanmean(t_seed) - np.nanmean(b_seed)),
                **_named_interval("difference", t_boot[:n] - b_boot[:n], t_seed - b_seed
                                  if len(t_seed) == len(b_seed) else None),
                "baseline_per_seed": [round(v, 4) for v in b_seed.tolist()],
                "treatment_per_seed": [round(v, 4) for v in t_seed.tolist()],
                "n_seeds": int(min(len(b_seed), len(t_seed))),
                "interval": INTERVAL_METHOD,
            })
    return pd.DataFrame(rows)


def _named_interval(name: str, samples: np.ndarray, per_seed: np.ndarray | None = None) -> dict[str, float]:
    low, high = percentile_interval(samples)
    if per_seed is not None:  # paired per-seed differences: the seed level at its small-sample width
        low, high = widened((low, high), per_seed)
    return {f"{name}_low": low, f"{name}_high": high}
