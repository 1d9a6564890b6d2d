"""Saliency metrics on maps whose answer is known, their baselines, and ROAD / CAM-multiply faithfulness."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cxrlib.explain import saliency as sal

SIDE = 64


def square(top: int, left: int, size: int, side: int = SIDE) -> np.ndarray:
    mask = np.zeros((side, side), dtype=bool)
    mask[top:top + size, left:left + size] = True
    return mask


def test_cam_equal_to_lesion_mask_scores_one():
    lesion = square(10, 20, 12)
    cam = lesion.astype(float)
    assert sal.pointing_game(cam, lesion) == 1.0
    assert sal.lesion_energy(cam, lesion) == pytest.approx(1.0)


def test_uniform_cam_scores_the_area_fraction():
    lesion = square(10, 20, 12)
    lung = square(0, 0, SIDE // 2)
    uniform = np.ones((SIDE, SIDE))
    fraction = lesion.mean()
    assert sal.lesion_energy(uniform, lesion) == pytest.approx(fraction)
    assert sal.lung_overlap(uniform, lung) == pytest.approx(0.25)
    # every pixel ties for the maximum: the chance that one of them hits
    assert sal.pointing_game(uniform, lesion) == pytest.approx(fraction)


def test_pointing_game_tolerance_counts_pixels_of_the_mask_grid():
    lesion = square(30, 30, 4)  # rows / cols 30..33
    cam = np.zeros((SIDE, SIDE))
    cam[30, 37] = 1.0  # 4 px right of the lesion's last column
    assert sal.pointing_game(cam, lesion, tolerance=0) == 0.0
    assert sal.pointing_game(cam, lesion, tolerance=3) == 0.0
    assert sal.pointing_game(cam, lesion, tolerance=4) == 1.0


def test_low_resolution_cam_is_scored_on_the_mask_grid():
    lesion = square(0, 0, SIDE // 2)  # the top-left quadrant
    cam = np.zeros((4, 4))
    cam[:2, :2] = 1.0  # a 4x4 CAM whose top-left quadrant is hot
    assert sal.pointing_game(cam, lesion) == 1.0
    assert sal.lesion_energy(cam, lesion) > 0.8  # bilinear upsampling spreads a little energy out
    assert sal.resize_map(cam, (SIDE, SIDE)).shape == (SIDE, SIDE)


def test_map_outside_the_lungs_has_no_lung_overlap():
    lung = square(0, 0, 32)
    cam = (~lung).astype(float)
    assert sal.lung_overlap(cam, lung) == 0.0
    assert sal.lung_overlap(lung.astype(float) * 0.3, lung) == pytest.approx(1.0)


def test_missing_lesion_and_empty_map_give_nan():
    empty = np.zeros((SIDE, SIDE), dtype=bool)
    cam = np.random.default_rng(0).random((SIDE, SIDE))
    assert np.isnan(sal.pointing_game(cam, empty))
    assert np.isnan(sal.lesion_energy(cam, empty))
    assert np.isnan(sal.lesion_energy(np.zeros((SIDE, SIDE)), square(1, 1, 5)))


def test_bad_maps_are_rejected_with_the_reason():
    lesion = square(1, 1, 5)
    with pytest.raises(ValueError, match="negative"):
        sal.lesion_energy(-np.ones((SIDE, SIDE)), lesion)
    with pytest.raises(ValueError, match="2-D"):
        sal.lesion_energy(np.ones((2, SIDE, SIDE)), lesion)
    with pytest.raises(ValueError, match="NaN"):
        sal.lesion_energy(np.full((SIDE, SIDE), np.nan), lesion)
    with pytest.raises(ValueError, match="tolerance"):
        sal.pointing_game(np.ones((SIDE, SIDE)), lesion, tolerance=-1)


def test_centre_prior_peaks_at_the_centre_and_is_symmetric():
    prior = sal.centre_prior((SIDE, SIDE), sigma=0.2)
    assert prior.shape == (SIDE, SIDE) and prior.max() <= 1.0 and prior.min() > 0
    assert np.allclose(prior, prior[::-1]) and np.allclose(prior, prior[:, ::-1])
    assert sal.pointing_game(prior, square(SIDE // 2 - 2, SIDE // 2 - 2, 4)) == 1.0
    assert sal.pointing_game(prior, square(0, 0, 8)) == 0.0
    with pytest.raises(ValueError):
        sal.centre_prior((SIDE, SIDE), sigma=0)


def test_random_maps_are_seeded_smooth_and_in_range():
    a = sal.random_maps((SIDE, SIDE), 5, grid=3, rng=7)
    b = sal.random_maps((SIDE, SIDE), 5, grid=3, rng=7)
    assert a.shape == (5, SIDE, SIDE) and np.array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not np.array_equal(a, sal.random_maps((SIDE, SIDE), 5, grid=3, rng=8))
    # bilinear upsampling of a 3x3 grid: neighbouring pixels differ little
    assert np.abs(np.diff(a, axis=-1)).max() < 0.1


def test_score_images_adds_both_baselines_and_random_matches_chance():
    lesion = square(8, 8, 16)
    lung = square(0, 0, 40)
    perfect = lesion.astype(np.float32)[None].repeat(2, axis=0)
    table = sal.score_images({"perfect": perfect}, ["a", "b"], lung_masks=[lung, lung], lesion_masks=[lesion, None],
                             patient_ids=["p1", "p2"], n_random=300, random_grid=8, seed=0)
    assert set(table["method"]) == {"perfect", sal.RANDOM, sal.CENTRE}
    assert len(table) == 6
    first = table[(table["method"] == "perfect") & (table["image_id"] == "a")].iloc[0]
    assert first["pointing_game"] == 1.0 and first["lesion_energy"] == pytest.approx(1.0)
    second = table[(table["method"] == "perfect") & (table["image_id"] == "b")].iloc[0]
    assert np.isnan(second["lesion_energy"]) and second["lung_overlap"] == pytest.approx(1.0)
    random_row = table[(table["method"] == sal.RANDOM) & (table["image_id"] == "a")].iloc[0]
    # a random map's expected lesion energy is the lesion's area fraction
    assert random_row["lesion_energy"] == pytest.approx(lesion.mean(), abs=0.02)
    with pytest.raises(ValueError, match="must be"):
        sal.score_images({"x": perfect[:1]}, ["a", "b"])


def test_summarize_scores_gives_means_with_intervals_per_method():
    per_image = pd.DataFrame({
        "method": ["m"] * 4 + ["n"] * 4,
        "image_id": list("abcd") * 2,
        "patient_id": ["p1", "p1", "p2", "p3"] * 2,
        "pointing_game": [1, 0, 1, 1, 0, 0, np.nan, 0],
    })
    table = sal.summarize_scores(per_image, ["pointing_game"], n_boot=200).set_index("method")
    assert table.loc["m", "pointing_game"] == pytest.approx(0.75)
    assert table.loc["n", "pointing_game"] == 0.0
    assert table.loc["m", "pointing_game_low"] <= 0.75 <= table.loc["m", "pointing_game_high"]
    assert table.loc["m", "n_images"] == 4


class LeftHalfModel(nn.Module):
    """Logits (0, 10 * (mean of the left half - 0.5)): class 1 lives in the left half only."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(left), self.scale * (left - 0.5)], dim=1)


def test_faithfulness_ranks_the_map_the_model_uses_first():
    images = torch.zeros(3, 1, 16, 16)
    images[..., :8] = 1.0  # bright left half: class 1 with probability ~0.99
    left = np.zeros((3, 16, 16), dtype=np.float32)
    left[..., :8] = 1.0
    right = 1.0 - left
    model = LeftHalfModel()
    good = sal.faithfulness(model, images, left, 1, percentiles=(25, 50, 75), seed=0)
    bad = sal.faithfulness(model, images, right, 1, percentiles=(25, 50, 75), seed=0)
    assert set(good) == {"road", "road_morf", "road_lerf", "cam_mult_change"}
    assert all(v.shape == (3,) for v in good.values())
    assert (good["road"] > bad["road"]).all()
    assert (good["cam_mult_change"] > bad["cam_mult_change"]).all()
    assert np.allclose(good["road"], (good["road_lerf"] - good["road_morf"]) / 2)
    # the same seed gives the same imputation noise
    again = sal.faithfulness(model, images, left, 1, percentiles=(25, 50, 75), seed=0)
    assert np.array_equal(again["road"], good["road"])
    with pytest.raises(ValueError, match="same N"):
        sal.faithfulness(model, images, left[:2], 1)


def test_score_faithfulness_fills_methods_and_both_baselines():
    images = torch.zeros(3, 1, 16, 16)
    images[..., :8] = 1.0
    left = np.zeros((3, 16, 16), dtype=np.float32)
    left[..., :8] = 1.0
    masks = [np.ones((16, 16), bool)] * 3
    cams = {"left": left, "right": 1.0 - left}
    per_image = sal.score_images(cams, ["a", "b", "c"], lung_masks=masks, n_random=2, random_grid=2)
    scored = sal.score_faithfulness(per_image, LeftHalfModel(), images, cams, 1, percentiles=(25, 50, 75),
                                    random_grid=2, seed=0)
    assert "road" not in per_image.columns  # a copy: the input is left as it was
    assert scored[["road", "cam_mult_change"]].notna().all().all()
    assert set(scored["method"]) == {"left", "right", sal.RANDOM, sal.CENTRE}
    road = scored.groupby("method")["road"].mean()
    # the map the model uses ranks first; a random map and a centred blob lie between the two extremes
    assert road["left"] > max(road[sal.RANDOM], road[sal.CENTRE]) and road["right"] < road["left"]
    direct = sal.faithfulness(LeftHalfModel(), images, left, 1, percentiles=(25, 50, 75), seed=0)
    assert np.allclose(scored.loc[scored["method"] == "left", "road"], direct["road"])
    with pytest.raises(ValueError, match="row"):
        sal.score_faithfulness(per_image.iloc[1:], LeftHalfModel(), images, cams, 1, percentiles=(50,))


def _seeded_scores(cam_hits_per_seed, random_hits=0.0, n_images=12):
    """Per-image rows for several seeds: a CAM scoring ``cam_hits_per_seed[s]`` and a random map scoring a constant."""
    import pandas as pd

    rows = []
    for s, hit in enumerate(cam_hits_per_seed):
        for i in range(n_images):
            base = {"image_id": f"i{i}", "patient_id": f"p{i // 2}", "seed": s}
            rows.append({"method": "gradcam", **base, "pointing_game": hit})
            rows.append({"method": sal.RANDOM, **base, "pointing_game": random_hits})
            rows.append({"method": sal.CENTRE, **base, "pointing_game": random_hits})
    return pd.DataFrame(rows)


def test_versus_baseline_covers_the_spread_between_training_runs():
    # every seed beats the random map: the interval of the difference lies above zero
    steady = sal.versus_baseline(_seeded_scores([0.6, 0.5, 0.7]), ["pointing_game"], n_boot=400)
    row = steady.iloc[0]
    assert row["method"] == "gradcam" and row["difference"] == pytest.approx(0.6) and row["low"] > 0
    assert row["per_seed"] == pytest.approx([0.6, 0.5, 0.7]) and row["n_seeds"] == 3
    # one seed far above, two at the random level: the patient-only view would call it a win, two levels do not
    flaky = sal.versus_baseline(_seeded_scores([0.9, 0.0, 0.0]), ["pointing_game"], n_boot=2000).iloc[0]
    assert flaky["low"] <= 0.0 and flaky["high"] > 0.5


def test_summarize_scores_uses_two_levels_only_with_several_seeds():
    several = sal.summarize_scores(_seeded_scores([0.0, 1.0]), ["pointing_game"], n_boot=2000)
    gradcam = several[several["method"] == "gradcam"].iloc[0]
    assert gradcam["n_seeds"] == 2 and gradcam["pointing_game"] == 0.5
    assert gradcam["pointing_game_low"] <= 0.0 and gradcam["pointing_game_high"] >= 1.0
    one = sal.summarize_scores(_seeded_scores([1.0]).drop(columns="seed"), ["pointing_game"], n_boot=200)
    assert one.iloc[0]["pointing_game_low"] == one.iloc[0]["pointing_game_high"] == 1.0
