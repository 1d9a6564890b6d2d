"""Synthesis metrics on synthetic numbers whose answers are known in closed form."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlib.evaluate import synthesis
from cxrlib.evaluate.stats import wilson_ci
from cxrlib.evaluate.synthesis import (
    anatomy_change,
    detectability_auc,
    fd_floor,
    fd_report,
    frechet_distance,
    grouped_folds,
    inception_fid,
    kernel_inception_distance,
    lesion_change,
    memorisation_report,
    nearest_neighbour_distances,
    oracle_rates,
    pixel_features,
    synthesis_table,
)


def _gaussian(n: int, dim: int = 8, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)) + shift


# ----------------------------------------------------------------------------- FD / KID


def test_frechet_distance_matches_closed_form_for_mean_shift():
    a, b = _gaussian(4000, seed=1), _gaussian(4000, seed=2)
    same = frechet_distance(a, b)
    assert 0.0 <= same < 0.1
    shift = np.full(8, 0.5)  # ||mu_a - mu_b||^2 = 8 * 0.25 = 2 for identity covariances
    shifted = frechet_distance(a, b + shift)
    assert shifted == pytest.approx(2.0 + same, abs=0.15)
    assert frechet_distance(a, b + 2 * shift) > shifted
    assert frechet_distance(b + shift, a) == pytest.approx(shifted, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_trace_root_agrees_with_scipy_sqrtm():
    from scipy import linalg

    from cxrlib.evaluate.synthesis import _trace_sqrt_product

    rng = np.random.default_rng(7)
    # both routes: fewer dimensions than images (eigenvalues) and more (singular values of A B^T)
    for dim, n, m in ((3, 50, 60), (16, 40, 30), (40, 30, 25), (64, 10, 12)):
        a = rng.normal(size=(n, dim))
        b = rng.normal(size=(m, dim)) @ rng.normal(size=(dim, dim))
        a, b = a - a.mean(axis=0), b - b.mean(axis=0)
        expected = np.trace(linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False))).real
        assert _trace_sqrt_product(a, b) == pytest.approx(expected, rel=1e-5), (dim, n, m)
        assert _trace_sqrt_product(b, a) == pytest.approx(expected, rel=1e-5), (dim, n, m)
    # closed forms on both routes: tr(sqrt(S S)) = tr(S), and tr(sqrt(S c^2 S)) = c tr(S)
    for dim, n in ((5, 40), (50, 20)):
        a = rng.normal(size=(n, dim))
        a = a - a.mean(axis=0)
        trace = np.trace(np.cov(a, rowvar=False))
        assert _trace_sqrt_product(a, a) == pytest.approx(trace, rel=1e-9)
        assert _trace_sqrt_product(a, 3.0 * a) == pytest.approx(3.0 * trace, rel=1e-9)


def test_frechet_distance_survives_rank_deficient_covariances():
    few = _gaussian(5, dim=20, seed=3)  # N << D: singular covariances
    distance = frechet_distance(few, _gaussian(6, dim=20, seed=4))
    assert np.isfinite(distance) and distance >= 0
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(few, _gaussian(6, dim=3))


def test_kid_zero_for_same_distribution_positive_for_shift():
    a, b = _gaussian(300, seed=5), _gaussian(300, seed=6)
    mean_same, std_same = kernel_inception_distance(a, b, n_subsets=10, subset_size=200)
    mean_shift, _ = kernel_inception_distance(a, b + 1.0, n_subsets=10, subset_size=200)
    assert abs(mean_same) < 3 * std_same + 0.05
    assert mean_shift > 10 * max(abs(mean_same), std_same)
    # subsets are capped by the smaller set
    assert np.isfinite(kernel_inception_distance(a[:20], b, subset_size=1000, n_subsets=3)[0])


def test_fd_report_keys_and_floor():
    train, test = _gaussian(400, seed=7), _gaussian(300, seed=8)
    good, bad, source = _gaussian(200, seed=9), _gaussian(200, shift=1.0, seed=10), _gaussian(200, shift=2.0, seed=11)
    report = fd_report(bad, test, train, reference=source, kid_subsets=5)
    assert set(report) == {"fd", "fd_floor", "kid", "kid_std", "fd_reference"}
    assert report["fd_floor"] < report["fd"] < report["fd_reference"]
    assert fd_report(good, test, train, kid_subsets=5)["fd_reference"] is None
    assert fd_floor(train, test, n_samples=200) == pytest.approx(report["fd_floor"])


# ----------------------------------------------------------------------------- Inception


def test_inception_fid_skips_without_weights(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    images = np.zeros((3, 32, 32), np.uint8)
    with pytest.warns(UserWarning, match="Inception-v3 FID skipped") as record:
        assert inception_fid(images, images) is None
    assert len(record) == 1
    assert str(tmp_path / "checkpoints") in str(record[0].message)
    assert "inception_v3_google" in str(record[0].message)


def test_inception_features_with_local_weights(tmp_path, monkeypatch):
    import torch
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"  # random weights: this checks the plumbing only
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    monkeypatch.setattr(synthesis, "_INCEPTION_SIZE", 75)  # the smallest input it takes; fast
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 48), dtype=np.uint8)
    features = synthesis.inception_features(images, weights_path=weights, batch_size=1)
    assert features.shape == (2, 2048) and np.isfinite(features).all()


# ----------------------------------------------------------------------------- oracle


def test_wilson_ci_known_value():
    low, high = wilson_ci(8, 10)
    assert low == pytest.approx(0.49, abs=0.005) and high == pytest.approx(0.943, abs=0.005)
    assert wilson_ci(0, 10)[0] == 0.0 and wilson_ci(10, 10)[1] == 1.0
    assert np.isnan(wilson_ci(0, 0)).all()


def test_oracle_rates():
    before = np.array([0.1, 0.2, 0.9, 0.3, 0.1])
    after = np.array([0.8, 0.7, 0.95, 0.2, 0.6])
    rates = oracle_rates(before, after, threshold=0.5)
    assert rates["oracle_covid_rate_before"] == pytest.approx(0.2)
    assert rates["oracle_covid_rate_after"] == pytest.approx(0.8)
    assert rates["oracle_covid_rate_after_ci95"] == pytest.approx(wilson_ci(4, 5))
    assert rates["n"] == 5
    assert oracle_rates(None, after, 0.5)["oracle_covid_rate_before"] is None


# ----------------------------------------------------------------------------- phantom lesions


def _phantom(n: int = 4, size: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(40, 120, (n, size, size)).astype(np.uint8)
    lungs = np.zeros((n, size, size), bool)
    lungs[:, 10:54, 8:28] = True
    lungs[:, 10:54, 36:56] = True
    return images, lungs


def test_lesion_change_inside_and_outside():
    before, lungs = _phantom()
    inside = before.copy()
    inside[:, 20:30, 12:22] += 80  # a blob inside the left lung
    report = lesion_change(before, inside, lungs)
    assert report["lesion_added_inside_lungs_fraction"] == pytest.approx(1.0)
    assert report["lesion_added_outside_lungs_fraction"] == pytest.approx(0.0)
    assert report["lesion_added_inside_lungs"] == pytest.approx(100 * 80 / 255 / lungs[0].sum())
    assert report["lesion_added_outside_lungs"] == 0.0
    assert report["n"] == 4 and report["n_unchanged"] == 0

    outside = before.copy()
    outside[:, 0:6, 0:10] += 80  # above the lungs, e.g. burned-in text
    report = lesion_change(before, outside, lungs[0])  # one mask for all images
    assert report["lesion_added_outside_lungs_fraction"] == pytest.approx(1.0)
    assert report["lesion_added_inside_lungs"] == 0.0

    noise = before + np.uint8(3)  # below the threshold everywhere
    assert lesion_change(before, noise, lungs)["n_unchanged"] == 4


def test_anatomy_change_identical_and_masked_changes():
    before, _ = _phantom()
    lesion = np.zeros_like(before, dtype=bool)
    lesion[:, 20:30, 12:22] = True
    same = anatomy_change(before, before, lesion)
    assert same["anatomy_ssim"] == pytest.approx(1.0) and same["anatomy_l1"] == 0.0
    changed_inside = before.copy()
    changed_inside[lesion] = 255
    masked = anatomy_change(before, changed_inside, lesion)
    assert masked["anatomy_ssim"] == pytest.approx(1.0) and masked["anatomy_l1"] == 0.0
    changed_outside = changed_inside.copy()
    changed_outside[:, 50:60, 40:60] = 0
    worse = anatomy_change(before, changed_outside, lesion)
    assert worse["anatomy_ssim"] < 0.99 and worse["anatomy_l1"] > 0


# ----------------------------------------------------------------------------- memorisation


def test_nearest_neighbour_exclude_self_with_duplicates():
    feats = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    distances, indices = nearest_neighbour_distances(feats, feats, exclude_self=True)
    assert distances[:2].tolist() == [0.0, 0.0] and indices[:2].tolist() == [1, 0]
    assert indices[2] in (0, 1) and distances[2] == pytest.approx(np.sqrt(50))


def test_memorisation_flags_copies_not_distinct_samples():
    train = _gaussian(300, seed=12)
    distinct = _gaussian(40, seed=13)
    synthetic = np.concatenate([distinct, train[:5] + 1e-6])
    report = memorisation_report(synthetic, train)
    assert set(report["possible_copy_indices"]) >= {40, 41, 42, 43, 44}
    assert report["possible_copy_fraction"] <= 7 / 45
    assert report["nearest_train_index"][40:].tolist() == [0, 1, 2, 3, 4]
    # new samples fall below the 1st percentile about 1% of the time, copies always do
    assert memorisation_report(distinct, train)["possible_copy_fraction"] <= 0.05
    assert report["median_distance_ratio"] > 0.5  # distinct samples dominate the median

    images = np.random.default_rng(0).integers(0, 256, (30, 64, 64), dtype=np.uint8)
    pixels = pixel_features(images, size=16)
    assert pixels.shape == (30, 256)
    on_pixels = memorisation_report(pixel_features(images[:3], size=16), pixels[3:])
    assert on_pixels["possible_copy_fraction"] == 0.0
    assert memorisation_report(pixels[:3], pixels)["possible_copy_fraction"] == 1.0


# ----------------------------------------------------------------------------- detectability


def test_detectability_auc_same_vs_separated():
    real, same = _gaussian(150, seed=14), _gaussian(150, seed=15)
    chance = detectability_auc(real, same, n_boot=200)
    assert 0.35 < chance["auc"] < 0.65
    assert chance["auc_ci95"][0] < 0.5 < chance["auc_ci95"][1] or abs(chance["auc"] - 0.5) < 0.1
    separated = detectability_auc(real, _gaussian(150, shift=3.0, seed=16), n_boot=200)
    assert separated["auc"] > 0.99 and separated["auc_ci95"][0] > 0.95
    assert separated["n_real"] == 150 and separated["n_synthetic"] == 150


def test_grouped_folds_keep_groups_together():
    # 20 real images of 10 patients; each synthetic image made from one of them
    labels = np.array([0] * 20 + [1] * 20)
    patients = np.array([f"p{i // 2}" for i in range(20)] + [f"p{i // 2}" for i in range(20)])
    folds = grouped_folds(labels, patients, n_splits=5)
    assert set(folds) == set(range(5))
    for patient in np.unique(patients):
        assert len(set(folds[patients == patient])) == 1
    result = detectability_auc(
        _gaussian(20, seed=17), _gaussian(20, seed=18), groups_real=patients[:20],
        groups_synthetic=patients[20:], n_boot=50,
    )
    assert 0.0 <= result["auc"] <= 1.0
    with pytest.raises(ValueError, match="groups"):
        grouped_folds(labels, np.zeros(40), n_splits=5)


# ----------------------------------------------------------------------------- table


def test_synthesis_table_shape():
    reports = {
        "G_NC": {"fd": 10.0, "kid": 0.1, "oracle": {"n": 5, "oracle_covid_rate_after": 0.8},
                 "auc_ci95": (0.6, 0.7), "possible_copy_indices": np.array([1, 2])},
        "G_PC": {"fd": 12.0, "kid": 0.2},
        "diffusion": {"fd": 8.0, "fd_reference": None},
    }
    table = synthesis_table(reports)
    assert isinstance(table, pd.DataFrame)
    assert table.shape == (3, 6)
    assert list(table.index) == ["G_NC", "G_PC", "diffusion"]
    assert list(table.columns) == ["fd", "kid", "oracle_n", "oracle_covid_rate_after", "auc_ci95", "fd_reference"]
    assert table.loc["G_NC", "auc_ci95"] == (0.6, 0.7)
    assert np.isnan(table.loc["G_PC", "oracle_n"])


def test_binomial_blur_removes_exactly_the_period_two_texture():
    from cxrlib.evaluate.synthesis import binomial_blur

    rows, cols = np.indices((16, 16))
    checkerboard = np.where((rows + cols) % 2 == 0, 150, 50).astype(np.uint8)
    stripes = np.where(cols % 2 == 0, 200, 0).astype(np.uint8)
    assert np.all(binomial_blur(checkerboard) == 100) and np.all(binomial_blur(stripes) == 100)
    flat = np.full((2, 8, 8), 77, np.uint8)
    np.testing.assert_array_equal(binomial_blur(flat), flat)
    # a slow ramp keeps its values (away from the mirrored borders), period four keeps half its amplitude
    ramp = np.tile(np.arange(0, 160, 10, dtype=np.uint8), (16, 1))
    np.testing.assert_array_equal(binomial_blur(ramp)[:, 1:-1], ramp[:, 1:-1])
    period4 = np.tile(np.array([100, 140, 100, 60], np.uint8), (8, 4))
    blurred = binomial_blur(period4)[:, 2:-2]
    assert blurred.max() == 120 and blurred.min() == 80
    assert binomial_blur(np.zeros((3, 4, 4), np.uint8)).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="uint8"):
        binomial_blur(np.zeros((4, 4), np.float32))
