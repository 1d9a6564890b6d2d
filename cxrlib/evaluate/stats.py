"""Confidence intervals for metrics by the percentile bootstrap.

- :func:`bootstrap_ci` / :func:`bootstrap_indices`: one level, test items or whole patients
  resampled: what varies when the *test sample* is drawn again.
- :func:`seed_patient_resamples` / :func:`seed_patient_ci`: two levels, training runs (seeds)
  and then test patients: what varies when the *experiment* is run again (another machine,
  another seed). Every headline comparison uses the two-level interval; a claim is made only
  when it excludes zero (:mod:`cxrlib.evaluate.claims`).
- :func:`wilson_ci`: counts (rates of k out of n).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt


def bootstrap_ci(
    values: npt.ArrayLike,
    *,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: npt.ArrayLike | None = None,
) -> tuple[float, float, float]:
    """Percentile-bootstrap confidence interval of ``stat(values)``.

    ``values``: 1-D numbers (e.g. one Dice per image); NaN entries are dropped first
    (with their ``groups`` entries). ``groups``: optional labels of the same length (e.g.
    patient ids); whole groups are then resampled with replacement, which is the honest
    interval when one patient contributes several images. ``stat`` maps a 1-D array to a
    number and must not depend on the order of the values (mean, median, quantiles). Returns ``(estimate, low, high)`` with ``estimate = stat(values)`` and
    ``[low, high]`` the ``alpha/2`` and ``1 - alpha/2`` quantiles of the bootstrap
    distribution; all NaN when no value is left.
    """
    data = np.asarray(values, dtype=np.float64).ravel()
    keep = ~np.isnan(data)
    if groups is not None:
        group_labels = np.asarray(groups).ravel()
        if len(group_labels) != len(data):
            raise ValueError(f"groups has {len(group_labels)} entries for {len(data)} values")
        group_labels = group_labels[keep]
    data = data[keep]
    if len(data) == 0:
        return float("nan"), float("nan"), float("nan")
    estimate = float(stat(data))

    boot = np.empty(n_boot)
    resamples = bootstrap_indices(len(data), n_boot=n_boot, seed=seed,
                                  groups=None if groups is None else group_labels)
    for b, rows in enumerate(resamples):
        boot[b] = stat(data[rows])
    low, high = np.nanpercentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return estimate, float(low), float(high)


def wilson_ci(k: int, n: int, *, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a proportion ``k / n``, both in [0, 1].

    The interval for counts (e.g. how many synthetic images a classifier calls COVID, how
    many reader answers are right); unlike the normal approximation it stays inside
    [0, 1] and behaves for ``k = 0`` or ``k = n``. ``k = 8, n = 10`` gives about
    ``(0.49, 0.94)``. Returns ``(nan, nan)`` when ``n == 0``.
    """
    from scipy.stats import binomtest

    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    interval = binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return float(interval.low), float(interval.high)


def bootstrap_indices(
    n_values: int,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    groups: npt.ArrayLike | None = None,
) -> Iterator[np.ndarray]:
    """Yield ``n_boot`` bootstrap resamples of ``range(n_values)`` as row-index arrays.

    ``groups``: optional labels, one per row (e.g. patient ids); whole groups are then
    drawn with replacement (as many draws as there are groups) and every row of a drawn
    group is taken once per draw. Each yielded array is int64, sorted ascending, with
    repeats for groups drawn more than once; its length varies with the groups drawn.
    The stream depends only on ``(n_values, groups, seed)``, so metrics computed on the
    same resamples (several metrics of one test set) share one bootstrap distribution.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        group_index, n_groups = np.arange(n_values), n_values
    else:
        group_labels = np.asarray(groups).ravel()
        if len(group_labels) != n_values:
            raise ValueError(f"groups has {len(group_labels)} entries for {n_values} values")
        _, group_index = np.unique(group_labels, return_inverse=True)
        n_groups = int(group_index.max()) + 1 if n_values else 0
    rows = np.arange(n_values)
    for _ in range(n_boot):
        # A resample is how often each group is drawn; each row repeats by its group's count.
        counts = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        yield np.repeat(rows, counts[group_index])


def seed_patient_resamples(
    n_seeds: int,
    n_values: int,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    groups: npt.ArrayLike | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Two-level bootstrap: yield ``(seed_draw, rows)`` pairs, ``n_boot`` of them.

    What varies between two reruns of an experiment is both the training run (its seed:
    initial weights, batches, which minority patients were drawn) and the test sample.
    Each replicate first draws ``n_seeds`` training runs with replacement (``seed_draw``,
    int64 indices into the seeds, sorted) and then the test rows as
    :func:`bootstrap_indices` does (whole ``groups``, e.g. patients, with replacement). A
    statistic averaged over ``seed_draw`` of per-seed values computed on ``rows`` then has
    a bootstrap distribution that covers both sources. The same stream (a function of
    ``(n_seeds, n_values, groups, seed)``) serves every condition compared, so differences
    are paired by seed and by patient. With one seed this is :func:`bootstrap_indices`.
    """
    if n_seeds < 1:
        raise ValueError(f"need at least one seed, got {n_seeds}")
    seed_rng = np.random.default_rng([int(seed), 1])  # a stream apart from the rows' stream
    for rows in bootstrap_indices(n_values, n_boot=n_boot, seed=seed, groups=groups):
        draw = np.sort(seed_rng.integers(0, n_seeds, n_seeds)) if n_seeds > 1 else np.zeros(1, dtype=np.int64)
        yield draw, rows


def seed_patient_ci(
    values: npt.ArrayLike,
    *,
    groups: npt.ArrayLike | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Estimate and two-level percentile interval of the mean of ``values`` over seeds and items.

    ``values``: shape ``(n_seeds, n_items)`` (one row per training run, e.g. one pointing-game
    hit per test image for each seed's classifier), NaN allowed (dropped from each mean).
    ``groups``: ``n_items`` labels (patients) resampled whole. Returns
    ``(estimate, low, high)``: the mean over seeds of each seed's item mean, and the
    ``alpha/2``, ``1 - alpha/2`` quantiles of the same statistic over
    :func:`seed_patient_resamples`. All NaN when nothing is finite.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim == 1:
        data = data[None, :]
    if data.ndim != 2:
        raise ValueError(f"values must be (n_seeds, n_items), got shape {data.shape}")
    if not np.isfinite(data).any():
        return float("nan"), float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices in a resample
        estimate = float(np.nanmean(np.nanmean(data, axis=1)))
        boot = np.array([np.nanmean(np.nanmean(data[np.ix_(draw, rows)], axis=1))
                         for draw, rows in seed_patient_resamples(data.shape[0], data.shape[1], n_boot=n_boot,
                                                                  seed=seed, groups=groups)])
    low, high = np.nanpercentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return estimate, float(low), float(high)


def seed_t_interval(per_seed: npt.ArrayLike, *, alpha: float = 0.05) -> tuple[float, float]:
    """Student-t interval of the mean of per-seed values (NaN bounds with fewer than two finite values).

    A percentile bootstrap over a handful of seeds is too narrow: resampling 5 values treats
    their spread as the whole spread and uses normal quantiles. The t interval is the
    small-sample answer for the seed level; :func:`widened` joins it to a bootstrap interval.
    """
    from scipy.stats import t as student_t

    values = np.asarray(per_seed, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    half = float(student_t.ppf(1 - alpha / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return float(values.mean() - half), float(values.mean() + half)


def widened(interval: tuple[float, float], per_seed: npt.ArrayLike, *, alpha: float = 0.05) -> tuple[float, float]:
    """``interval`` (e.g. two-level bootstrap) widened to contain the seed level's t interval.

    The result covers test-patient sampling (from the bootstrap) and, with few training runs,
    the seed-to-seed spread at its small-sample width (from :func:`seed_t_interval`). With one
    seed, or NaN bounds, ``interval`` is returned as it is.
    """
    low, high = (float(v) for v in interval)
    t_low, t_high = seed_t_interval(per_seed, alpha=alpha)
    if np.isnan(t_low) or np.isnan(low) or np.isnan(high):
        return low, high
    return min(low, t_low), max(high, t_high)
