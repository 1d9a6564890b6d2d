"""Confidence intervals for metrics by the percentile bootstrap."""

from __future__ import annotations

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
