"""Exact and near duplicates across sources, the patients they link, and the leakage check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlib.data import cohort, dedup
from cxrlib.data import manifest as mf
from cxrlib.data.io import read_image, read_mask, write_png


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    """A random but smooth image (pHash looks at low frequencies)."""
    from scipy.ndimage import gaussian_filter

    noise = np.random.default_rng(seed).normal(size=(size, size))
    field = gaussian_filter(noise, 3)
    return np.clip((field - field.min()) / np.ptp(field) * 255, 0, 255).astype(np.uint8)


def build(tmp_path: Path) -> pd.DataFrame:
    """Six images: an exact copy across sources, a near copy (re-scaled), a label conflict, others."""
    base = smooth_image(0)
    bigger = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(base).resize((96, 96)))
    images = {
        "a:1": base, "b:1": base.copy(),            # exact copy, two sources, same label
        "a:2": smooth_image(1), "b:2": bigger,       # b:2 is a:1 resized -> near copy
        "a:3": smooth_image(2), "b:3": smooth_image(2),  # exact copy with conflicting labels
        "a:4": smooth_image(3),
    }
    labels = {"a:3": "covid", "b:3": "normal"}
    rows = []
    for image_id, pixels in images.items():
        write_png(tmp_path / f"{image_id.replace(':', '_')}.png", pixels)
        rows.append({"image_id": image_id, "path": f"{image_id.replace(':', '_')}.png",
                     "label": labels.get(image_id, "covid"), "patient_id": f"p-{image_id}",
                     "source": image_id[0], "view": "PA", "split": "", "mask_path": "", "origin": "real"})
    return mf.absolute_paths(pd.DataFrame(rows), tmp_path)


def test_near_duplicate_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    hashes = ["".join(rng.choice(list("0123456789abcdef"), 16)) for _ in range(40)]
    hashes[5] = hashes[3][:-1] + ("0" if hashes[3][-1] != "0" else "1")
    pairs = dedup.near_duplicate_pairs(hashes, 20, chunk=7)
    expected = {(i, j, bin(int(hashes[i], 16) ^ int(hashes[j], 16)).count("1"))
                for i in range(40) for j in range(i + 1, 40)
                if bin(int(hashes[i], 16) ^ int(hashes[j], 16)).count("1") <= 20}
    assert set(map(tuple, pairs.to_numpy())) == expected and (3, 5) in {(a, b) for a, b, _ in expected}
    with pytest.raises(ValueError, match="max_distance"):
        dedup.near_duplicate_pairs(hashes, -1)


def test_hash_images_lists_unreadable_files(tmp_path):
    df = build(tmp_path)
    (tmp_path / "a_4.png").write_bytes(b"not a png")
    hashed, report = dedup.hash_images(df)
    assert report.n_ok == 6 and [bad.path for bad in report.bad] == [str(tmp_path / "a_4.png")]
    assert hashed.loc[6, "content_hash"] == "" and len(hashed.loc[0, "phash"]) == 64  # 256 bits
    assert hashed.loc[0, "content_hash"] == hashed.loc[1, "content_hash"]


def test_deduplicate_drops_copies_groups_near_copies_and_links_patients(tmp_path):
    hashed, _ = dedup.hash_images(build(tmp_path))
    kept, report = dedup.deduplicate(hashed, max_distance=24)
    table = report.table[report.table["kind"] == "exact"].set_index("image_id")
    assert table.loc["b:1", "action"] == "dropped" and table.loc["a:1", "action"] == "kept"
    assert table.loc["b:1", "reason"] == "exact duplicate: same pixels as a:1"
    assert set(report.dropped) == {"b:1", "a:3", "b:3"}  # the label conflict drops both copies
    assert table.loc["a:3", "reason"].startswith("label conflict")
    near = report.table[report.table["kind"] == "near"].set_index("image_id")
    assert set(near.index) == {"a:1", "b:2"} and near["group"].nunique() == 1
    by_id = kept.set_index("image_id")
    assert by_id.loc["a:1", "near_dup_group"] == by_id.loc["b:2", "near_dup_group"] != ""
    # a:1, its dropped copy b:1 and its near copy b:2 are one patient group
    assert by_id.loc["a:1", "patient_group"] == by_id.loc["b:2", "patient_group"] != ""
    assert by_id.loc["a:4", "patient_group"] == ""
    metrics = report.metrics()
    assert metrics["exact_duplicate_groups"] == 2 and metrics["near_duplicate_groups"] == 1
    assert metrics["dropped_by_reason"] == {"exact duplicate": 1, "label conflict": 2}
    kept_all, report_all = dedup.deduplicate(hashed, max_distance=24, drop_exact=False)
    assert len(kept_all) == len(hashed) and not report_all.dropped


def test_split_keeps_linked_patients_together_and_leakage_sees_near_copies(tmp_path):
    hashed, _ = dedup.hash_images(build(tmp_path))
    kept, _ = dedup.deduplicate(hashed)
    many = pd.concat([kept] + [kept.assign(image_id=kept["image_id"] + f"#{k}",
                                            patient_id=kept["patient_id"] + f"#{k}",
                                            near_dup_group=kept["near_dup_group"].where(
                                                kept["near_dup_group"] == "", kept["near_dup_group"] + f"#{k}"),
                                            patient_group=kept["patient_group"].where(
                                                kept["patient_group"] == "", kept["patient_group"] + f"#{k}"))
                              for k in range(6)], ignore_index=True)
    for seed in range(5):
        split = mf.split_by_patient(many, seed=seed, stratify=None)
        assert mf.check_leakage(split).ok
        by_id = split.set_index("image_id")
        assert by_id.loc["a:1", "split"] == by_id.loc["b:2", "split"]
    leaky = split.copy()
    rows = leaky.index[leaky["image_id"].isin(["a:1", "b:2"])]
    leaky.loc[rows, "split"] = ["train", "test"]
    report = mf.check_leakage(leaky, raise_on_leak=False)
    assert len(report.near_duplicates_across_splits) == 1 and len(report.patient_groups_across_splits) == 1
    with pytest.raises(mf.LeakageError, match="near-identical images"):
        mf.check_leakage(leaky)


def test_synthetic_image_resembling_a_real_one_follows_it_into_its_split(tmp_path):
    df = build(tmp_path).iloc[[0, 2, 6]].reset_index(drop=True)
    synthetic = np.clip(smooth_image(0).astype(int) + 3, 0, 255).astype(np.uint8)  # "translated" a:1
    write_png(tmp_path / "syn.png", synthetic)
    df.loc[len(df)] = {"image_id": "syn:1", "path": str(tmp_path / "syn.png"), "label": "covid", "patient_id": "syn:1",
                       "source": "zunair2021", "view": "", "split": "train", "mask_path": "",
                       "origin": mf.make_origin("G_NC", "zunair2021")}
    hashed, _ = dedup.hash_images(df)
    kept, report = dedup.deduplicate(hashed)
    by_id = kept.set_index("image_id")
    assert by_id.loc["syn:1", "origin"] == "G_NC:zunair2021:a:1"
    assert "taken as its source image" in report.table.set_index("image_id").loc["syn:1", "reason"]
    split = mf.split_by_patient(kept, fractions=(0.34, 0.33, 0.33), seed=0, stratify=None)
    by_id = split.set_index("image_id")
    assert by_id.loc["syn:1", "split"] == by_id.loc["a:1", "split"]
    assert mf.check_leakage(split).ok


def test_materialize_resizes_images_and_masks_and_lists_bad_files(tmp_path):
    raw = tmp_path / "raw"
    # images at least 32 pixels a side and not constant: cohorts refuse smaller or blank ones
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    rgb[..., 0] = np.where(np.arange(60) // 6 % 2, 190, 210)  # red stripes
    __import__("PIL.Image", fromlist=["Image"]).fromarray(rgb).save(raw / "c.jpg" if raw.mkdir() is None else None)
    write_png(raw / "g.png", np.tile(np.arange(70, 118, dtype=np.uint8), (48, 1)))
    mask = np.zeros((48, 48), dtype=bool)
    mask[:, 24:] = True
    write_png(raw / "m.png", mask)
    (raw / "bad.png").write_bytes(b"broken")
    df = pd.DataFrame({"image_id": ["src:c", "src:g", "src:bad"], "path": ["c.jpg", "g.png", "bad.png"],
                       "label": ["covid"] * 3, "patient_id": ["p1", "p2", "p3"], "source": ["my src"] * 3,
                       "view": "", "split": "", "mask_path": ["", "m.png", ""], "origin": "real"})
    df = mf.absolute_paths(df, raw)
    out, report = cohort.materialize(df, tmp_path / "run", 16, raw_root=raw)
    assert [bad.path for bad in report.bad] == [str(raw / "bad.png")] and report.n_ok == 2
    run = (tmp_path / "run").resolve()
    assert out["path"].tolist() == [str(run / "images/my_src/src_c.png"), str(run / "images/my_src/src_g.png")]
    assert out["raw_path"].tolist() == ["c.jpg", "g.png"]  # relative to the raw data folder, as recorded
    assert cohort.materialize(df, tmp_path / "run", 16)[0]["raw_path"].tolist() == df["path"][:2].tolist()
    image = read_image(mf.resolve_path(out, out.loc[0, "path"]))
    assert image.shape == (16, 16) and image.dtype == np.uint8 and 50 < image.mean() < 70  # red -> luminance
    resized_mask = read_mask(mf.resolve_path(out, out.loc[1, "mask_path"]))
    assert resized_mask.shape == (16, 16) and resized_mask[:, 9:].all() and not resized_mask[:, :7].any()
    assert out.loc[0, "mask_path"] == ""
    mf.validate(out, check_files=True)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "run").rglob("*"))
