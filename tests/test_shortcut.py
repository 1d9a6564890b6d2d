"""The shortcut floor on images whose answer is known: a border that gives the class away
(floor AUC near 1) and images identical in distribution (floor AUC near 0.5)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib.evaluate import shortcut


def _write(path, array, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save)
    return str(path)


def _image(rng, border_value=None, size=48):
    image = rng.integers(60, 200, (size, size)).astype(np.uint8)
    if border_value is not None:
        image[:3, :] = border_value
        image[-3:, :] = border_value
        image[:, :3] = border_value
        image[:, -3:] = border_value
    return image


def _cohort(tmp_path, *, cue: bool, n_patients=60, seed=0, prefix="") -> pd.DataFrame:
    """Two classes from two sources; with ``cue`` the covid source has a bright border."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "covid" if p % 2 else "normal"
        source = "b" if label == "covid" else "a"
        split = ("train", "train", "train", "val", "test")[p % 10 // 2]
        for k in range(2):
            border = (230 if label == "covid" else 30) if cue else None
            image_id = f"{prefix}p{p}_{k}"
            path = _write(tmp_path / f"{image_id}.png", _image(rng, border))
            rows.append({"image_id": image_id, "path": path, "label": label, "patient_id": f"{prefix}p{p}",
                         "source": source, "split": split, "origin": "real", "view": "PA" if k else "AP"})
    return pd.DataFrame(rows)


def test_image_statistics_known_values():
    image = np.full((40, 40), 100, dtype=np.uint8)
    image[:2, :] = 255  # a white top band inside the 5 % frame
    stats = shortcut.image_statistics(image, border=0.05)
    assert stats["p50"] == 100
    assert stats["frac_white"] == pytest.approx(80 / 1600)
    frame_pixels = 1600 - 36 * 36
    assert stats["border_mean"] == pytest.approx((80 * 255 + (frame_pixels - 80) * 100) / frame_pixels)
    assert stats["border_minus_center"] > 0
    assert set(stats) == set(shortcut.PIXEL_FEATURES)
    with pytest.raises(ValueError):
        shortcut.image_statistics(np.zeros((0, 3), dtype=np.uint8))


def test_file_statistics_reads_the_header(tmp_path):
    wide = _write(tmp_path / "wide.jpg", np.zeros((20, 60, 3), dtype=np.uint8), quality=90)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50).save(deep)
    jpeg, png = shortcut.file_statistics(wide), shortcut.file_statistics(deep)
    assert (jpeg["width"], jpeg["height"], jpeg["aspect"]) == (60, 20, 3.0)
    assert jpeg["format_jpeg"] == 1 and jpeg["channels"] == 3 and jpeg["bit_depth"] == 8
    assert png["format_png"] == 1 and png["bit_depth"] >= 16 and png["channels"] == 1


def test_statistics_table_prefers_the_raw_file(tmp_path):
    frame = _cohort(tmp_path, cue=False, n_patients=2)
    raw = _write(tmp_path / "raw" / "big.jpg", np.zeros((100, 50, 3), dtype=np.uint8))
    frame["raw_path"] = ""
    frame.loc[0, "raw_path"] = raw
    frame.loc[1, "path"] = str(tmp_path / "missing.png")
    stats = shortcut.statistics_table(frame)
    assert stats.loc[frame.loc[0, "image_id"], "width"] == 50
    assert stats.loc[frame.loc[2, "image_id"], "width"] == 48
    assert np.isnan(stats.loc[frame.loc[1, "image_id"], "mean"])
    assert [image_id for image_id, _ in stats.attrs["unreadable"]] == [frame.loc[1, "image_id"]]


def test_floor_finds_a_border_cue_and_nothing_without_it(tmp_path):
    tasks = {"normal_vs_covid": ("normal", "covid")}
    cued = _cohort(tmp_path / "cue", cue=True)
    floor = shortcut.shortcut_floor(cued, shortcut.statistics_table(cued), tasks, n_boot=200)
    row = floor.iloc[0]
    assert row["evaluation_set"] == "internal" and row["auc"] > 0.95 and row["auc_low"] > 0.8

    plain = _cohort(tmp_path / "plain", cue=False, n_patients=100)
    floor = shortcut.shortcut_floor(plain, shortcut.statistics_table(plain), tasks, n_boot=200)
    row = floor.iloc[0]
    assert abs(row["auc"] - 0.5) < 0.25 and row["auc_low"] < 0.5 < row["auc_high"]


def test_floor_on_an_external_cohort_of_positives_gives_sensitivity_only(tmp_path):
    tasks = {"normal_vs_covid": ("normal", "covid")}
    development = _cohort(tmp_path / "dev", cue=True)
    external = _cohort(tmp_path / "ext", cue=True, seed=1, prefix="x")
    external = external[external["label"] == "covid"].assign(split="test")
    sets = {"ext": (external, shortcut.statistics_table(external))}
    floor = shortcut.shortcut_floor(development, shortcut.statistics_table(development), tasks, sets, n_boot=200)
    ext = floor.set_index("evaluation_set").loc["ext"]
    assert np.isnan(ext["auc"]) and np.isnan(ext["specificity"])
    assert ext["sensitivity"] > 0.75 and ext["n_pos"] == ext["n"] == len(external)


def test_floor_explains_an_untrainable_task(tmp_path):
    frame = _cohort(tmp_path, cue=True, n_patients=20)
    floor = shortcut.shortcut_floor(frame, shortcut.statistics_table(frame),
                                    {"pneumonia_vs_covid": ("pneumonia", "covid")}, n_boot=50)
    assert floor["auc"].isna().all() and floor["note"].str.contains("both classes").all()


def test_source_separability(tmp_path):
    cued = _cohort(tmp_path / "cue", cue=True)
    result = shortcut.source_separability(cued, shortcut.statistics_table(cued), n_boot=200)
    assert result["column"] == "source" and result["auc"] > 0.95
    plain = _cohort(tmp_path / "plain", cue=False, n_patients=100)
    result = shortcut.source_separability(plain, shortcut.statistics_table(plain), n_boot=200)
    assert result["auc_low"] < 0.5 < result["auc_high"] or abs(result["auc"] - 0.5) < 0.15
    with pytest.raises(ValueError, match="source"):
        shortcut.source_separability(plain.assign(source="a"), shortcut.statistics_table(plain))


def test_against_floor_marks_overlapping_intervals():
    floor = pd.DataFrame({"task": ["t", "t"], "evaluation_set": ["internal", "ext"],
                          "auc": [0.8, 0.6], "auc_low": [0.75, 0.5], "auc_high": [0.85, 0.7]})
    results = pd.DataFrame({"task": ["t", "t", "t"], "evaluation_set": ["internal", "ext", "ext"],
                            "auc": [0.9, 0.68, np.nan], "auc_low": [0.87, 0.6, np.nan],
                            "auc_high": [0.93, 0.75, np.nan]})
    marked = shortcut.against_floor(results, floor)
    assert marked["versus_floor"].tolist() == [shortcut.ABOVE, shortcut.NOT_SHOWN, ""]
    assert marked["beats_floor"].tolist() == [True, False, False]
    assert marked["floor_auc"].tolist() == [0.8, 0.6, 0.6]
    long = pd.DataFrame({"task": ["t", "t"], "metric": ["auc", "sensitivity"],
                         "estimate": [0.9, 0.9], "low": [0.86, 0.86], "high": [0.95, 0.95]})
    marked = shortcut.against_floor(long, floor, estimate="estimate")
    assert marked["versus_floor"].tolist() == [shortcut.ABOVE, ""]


@pytest.mark.parametrize("correlation, drops", [(1.0, True), (0.0, False)])
def test_held_out_site_drop_appears_only_with_a_site_label_correlation(tmp_path, correlation, drops):
    """Trained where each class comes from its own site, the floor learns the site and falls on a
    site it never saw; trained where the site says nothing, it holds up there."""
    import warnings

    from cxrlib.data import cohort

    development, external = cohort.load_or_make_held_out_phantom(
        150, 48, 0, site_label_correlation=correlation, base=tmp_path, progress=False)
    assert "valley_imaging" not in set(development["site"]) and set(external["site"]) == {"valley_imaging"}
    assert (external["split"] == "test").all() and external["patient_id"].str.startswith("heldout:").all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split, _ = cohort.assemble(development, seed=0)
    floor = shortcut.shortcut_floor(
        split, shortcut.statistics_table(split), {"normal_vs_covid": ("normal", "covid")},
        {"heldout": (external, shortcut.statistics_table(external))}, n_boot=200).set_index("evaluation_set")
    drop = floor.loc["internal", "auc"] - floor.loc["heldout", "auc"]
    if drops:
        assert drop > 0.3 and floor.loc["heldout", "auc_high"] < floor.loc["internal", "auc_low"]
    else:
        assert drop < 0.1


def test_hold_out_sites_splits_whole_sites_and_names_the_cohort():
    from cxrlib.data import cohort

    frame = pd.DataFrame({"image_id": list("abcd"), "patient_id": ["1", "1", "2", "3"],
                          "site": ["x", "x", "y", "z"], "split": ""})
    development, external = cohort.hold_out_sites(frame, ["x"])
    assert list(external["image_id"]) == ["a", "b"] and (external["split"] == "test").all()
    assert list(development["image_id"]) == ["c", "d"]
    with pytest.raises(ValueError, match="held-out site: unknown site"):
        cohort.hold_out_sites(frame, ["w"])
    with pytest.raises(ValueError, match="leaves no development image"):
        cohort.hold_out_sites(frame, ["x", "y", "z"])
    with pytest.raises(ValueError, match="mine: the manifest has no 'scanner'"):
        cohort.hold_out_sites(frame, ["x"], column="scanner", name="mine")
    with pytest.raises(ValueError, match="unknown site"):
        cohort.load_or_make_held_out_phantom(10, 48, held_out=("nowhere",))


def test_cohort_separability_within_one_label(tmp_path):
    cued = _cohort(tmp_path / "a", cue=True, n_patients=40)
    other = _cohort(tmp_path / "b", cue=False, n_patients=40, seed=3)  # same ids, other images
    result = shortcut.cohort_separability(
        {"a": (cued, shortcut.statistics_table(cued)), "b": (other, shortcut.statistics_table(other))},
        label="covid", n_boot=100)
    assert result["column"] == "cohort" and result["values"] == {"a": 40, "b": 40} and result["auc"] > 0.95
    with pytest.raises(ValueError, match="two cohorts"):
        shortcut.cohort_separability({"a": (cued, shortcut.statistics_table(cued))})


def test_against_floor_gives_no_verdict_on_per_view_rows():
    floor = pd.DataFrame({"task": ["t"], "evaluation_set": ["internal"], "auc": [0.6], "auc_low": [0.5],
                          "auc_high": [0.7]})
    summary = pd.DataFrame({"task": ["t", "t"], "evaluation_set": ["internal"] * 2, "view": ["all", "PA"],
                            "metric": ["auc", "auc"], "estimate": [0.9, 0.9], "low": [0.8, 0.8], "high": [1, 1]})
    marked = shortcut.against_floor(summary, floor, estimate="estimate")
    assert marked["versus_floor"].tolist() == [shortcut.ABOVE, ""]
