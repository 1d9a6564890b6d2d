"""Confidence intervals for metrics by the percentile bootstrap."""

from __future__ import annotations

from collections.abc import Callable

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

    rng = np.random.default_rng(seed)
    if groups is None:
        group_index, n_groups = np.arange(len(data)), len(data)
    else:
        _, group_index = np.unique(group_labels, return_inverse=True)
        n_groups = int(group_index.max()) + 1
    # A resample is described by how often each group is drawn; repeating every value by
    # its group's count gives the resampled data (stat must not depend on value order).
    boot = np.empty(n_boot)
    for b in range(n_boot):
        counts = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        boot[b] = stat(np.repeat(data, counts[group_index]))
    low, high = np.nanpercentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return estimate, float(low), float(high)
