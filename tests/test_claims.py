"""Two-level (seed x patient) intervals with known answers, and claims worded from them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxrlib.evaluate import claims, stats


def test_one_seed_reduces_to_the_patient_bootstrap():
    values = np.random.default_rng(0).random(40)
    groups = np.repeat(np.arange(20), 2)
    two_level = stats.seed_patient_ci(values[None, :], groups=groups, n_boot=500, seed=3)
    one_level = stats.bootstrap_ci(values, groups=groups, n_boot=500, seed=3)
    assert two_level == pytest.approx(one_level)


def test_identical_values_give_a_zero_width_interval():
    estimate, low, high = stats.seed_patient_ci(np.full((3, 10), 0.7), n_boot=200)
    assert estimate == low == high == pytest.approx(0.7)


def test_seed_spread_alone_is_covered():
    """Two seeds scoring 0 and 1 on every image: the seed-mean resample is 0, 0.5 or 1 (p = 1/4, 1/2, 1/4)."""
    values = np.vstack([np.zeros(30), np.ones(30)])
    estimate, low, high = stats.seed_patient_ci(values, n_boot=4000, seed=1)
    assert estimate == 0.5 and low == 0.0 and high == 1.0
    # the patient-only interval (what the project reported before) is blind to it
    per_image_mean = values.mean(axis=0)
    assert stats.bootstrap_ci(per_image_mean, n_boot=500)[1:] == (0.5, 0.5)


def test_seed_draws_are_shared_and_reproducible():
    first = list(stats.seed_patient_resamples(3, 5, n_boot=20, seed=7))
    again = list(stats.seed_patient_resamples(3, 5, n_boot=20, seed=7))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert {len(draw) for draw, _ in first} == {3} and any(len(set(draw)) < 3 for draw, _ in first)
    with pytest.raises(ValueError):
        next(stats.seed_patient_resamples(0, 5))


@pytest.mark.parametrize("low, high, verdict", [(0.01, 0.2, "helps"), (-0.3, -0.05, "hurts"),
                                                (-0.1, 0.2, claims.NO_DIFFERENCE), (0.0, 0.2, claims.NO_DIFFERENCE)])
def test_a_claim_is_made_only_when_the_interval_excludes_zero(low, high, verdict):
    claim = claims.difference_claim("x", (low + high) / 2, low, high, up="helps", down="hurts")
    assert claim.verdict == verdict
    assert claim.sentence().startswith(f"x: {verdict} (")


def test_unmeasured_claims_say_so():
    claim = claims.difference_claim("x", None, None, None)
    assert claim.direction == 0 and claim.sentence() == "x: not measured" and math.isnan(claim.estimate)


def test_the_seed_level_is_widened_to_its_small_sample_interval():
    """Five per-seed differences 0.1, 0.2, 0.0, 0.3, 0.1: t(4) interval 0.14 +/- 0.14, wider than a bootstrap."""
    low, high = stats.seed_t_interval([0.1, 0.2, 0.0, 0.3, 0.1])
    assert low == pytest.approx(0.14 - 2.776 * 0.1140 / 5 ** 0.5, abs=1e-3) and low < 0.0 < high
    assert stats.widened((0.05, 0.25), [0.1, 0.2, 0.0, 0.3, 0.1]) == pytest.approx((low, high))
    assert stats.widened((-0.5, 0.9), [0.1, 0.2, 0.0, 0.3, 0.1]) == (-0.5, 0.9)  # already wider: kept
    assert stats.widened((0.05, 0.25), [0.1]) == (0.05, 0.25)  # one seed: nothing to add
