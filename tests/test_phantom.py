"""Phantom generator: determinism, exact masks, class statistics, cohorts, files on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib.data.phantom import (
    DEFAULT_SITES,
    LABELS,
    MANIFEST_COLUMNS,
    MASK_KINDS,
    CohortConfig,
    PhantomGenerator,
    generate_cohort,
    plan_cohort,
    write_cohort,
)

SIZE = 128
N_PER_CLASS = 30


@pytest.fixture(scope="module")
def generator() -> PhantomGenerator:
    return PhantomGenerator(SIZE, seed=0)


@pytest.fixture(scope="module")
def samples(generator):
    """N_PER_CLASS samples per class, sites and views mixed."""
    out = {}
    for label in LABELS:
        out[label] = [
            generator.render(label, 1000 + k, severity=0.5 + 0.5 * (k % 3) / 2,
                             site=DEFAULT_SITES[k % len(DEFAULT_SITES)],
                             view="AP" if k % 4 == 3 else "PA")
            for k in range(N_PER_CLASS)
        ]
    return out


def centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean())


def cramers_v(a: pd.Series, b: pd.Series) -> float:
    table = pd.crosstab(a, b).to_numpy(dtype=float)
    table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    chi2 = float(((table - expected) ** 2 / expected).sum())
    return float(np.sqrt(chi2 / (table.sum() * (min(table.shape) - 1))))


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_arrays_other_seed_differs(generator):
    first = generator.render("covid", 7, severity=0.8, site=DEFAULT_SITES[2])
    again = PhantomGenerator(SIZE, seed=0).render("covid", 7, severity=0.8, site=DEFAULT_SITES[2])
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.image_clean, again.image_clean)
    for kind in MASK_KINDS:
        np.testing.assert_array_equal(first.masks[kind], again.masks[kind])
    assert first.meta == again.meta
    other = generator.render("covid", 8, severity=0.8, site=DEFAULT_SITES[2])
    assert not np.array_equal(first.image, other.image)


def test_same_seed_other_label_keeps_patient_and_pose(generator):
    normal = generator.render("normal", 11)
    sick = generator.render("pneumonia", 11)
    for kind in ("lung_left", "lung_right", "heart", "text"):
        np.testing.assert_array_equal(normal.masks[kind], sick.masks[kind])
    outside = ~sick.masks["lesion"]
    # only the lesion (and its soft margin) changes the picture
    assert np.mean(normal.image_clean[outside] == sick.image_clean[outside]) > 0.9


def test_generator_survives_pickling(generator):
    """DataLoader workers and process pools receive generators by pickling."""
    import pickle

    copy = pickle.loads(pickle.dumps(generator))
    np.testing.assert_array_equal(copy.render("covid", 4).image, generator.render("covid", 4).image)


@pytest.mark.parametrize("size", [48, 128, 200])
def test_any_size_gives_consistent_shapes(size):
    sample = PhantomGenerator(size).render("pneumonia", 3, view="AP")
    assert sample.image.shape == sample.image_clean.shape == (size, size)
    assert sample.image.dtype == sample.image_clean.dtype == np.uint8
    assert set(sample.masks) == set(MASK_KINDS)
    for mask in sample.masks.values():
        assert mask.shape == (size, size) and mask.dtype == bool
    assert sample.masks["lung_left"].any() and sample.masks["lung_right"].any()


def test_bad_arguments_raise(generator):
    with pytest.raises(ValueError):
        generator.render("flu", 0)
    with pytest.raises(ValueError):
        generator.render("normal", 0, view="LAT")
    with pytest.raises(ValueError):
        CohortConfig(images_per_patient=(0, 2))
    with pytest.raises(ValueError):
        CohortConfig(site_label_correlation=1.5)


# ----------------------------------------------------------------------------- masks


def test_masks_are_consistent(samples):
    half = SIZE // 2
    for label, group in samples.items():
        for sample in group:
            m = sample.masks
            lungs = m["lung_left"] | m["lung_right"]
            assert m["lung_left"].sum() > 0.03 * SIZE**2 and m["lung_right"].sum() > 0.03 * SIZE**2
            assert not (m["lung_left"] & m["lung_right"]).any()
            assert not (m["heart"] & lungs).any()
            assert not (m["lesion"] & ~lungs).any()
            # radiological convention: patient's left lung and the heart on the image right
            assert centroid(m["lung_left"])[1] > half > centroid(m["lung_right"])[1]
            assert m["heart"][:, half:].sum() > 0.5 * m["heart"].sum()
            if label == "normal":
                assert not m["lesion"].any()
                assert sample.meta["severity"] == 0.0
            else:
                assert m["lesion"].sum() > 20


def test_text_mask_marks_exactly_the_changed_pixels(samples, generator):
    for sample in samples["normal"][:8]:
        text = sample.masks["text"]
        assert text.sum() > 30
        np.testing.assert_array_equal(sample.image[~text], sample.image_clean[~text])
        assert (sample.image[text] != sample.image_clean[text]).all()
    plain = generator.render("normal", 1000, site=DEFAULT_SITES[0], text=False)
    assert not plain.masks["text"].any()
    np.testing.assert_array_equal(plain.image, plain.image_clean)
    np.testing.assert_array_equal(plain.image_clean, samples["normal"][0].image_clean)


def test_lungs_are_darker_than_mediastinum(samples):
    for sample in samples["normal"]:
        m = sample.masks
        lungs = m["lung_left"] | m["lung_right"]
        rows = np.nonzero(lungs.any(axis=1))[0]
        top = rows.min() + (rows.max() - rows.min()) // 4
        bottom = rows.min() + (rows.max() - rows.min()) // 2
        centre = sample.image_clean[top:bottom, SIZE // 2 - 2:SIZE // 2 + 2]
        assert sample.image_clean[lungs].mean() + 40 < centre.mean()


# ----------------------------------------------------------------------------- classes


def test_covid_is_bilateral_basal_and_peripheral(samples):
    bilateral = lower = lateral = 0
    for sample in samples["covid"]:
        m = sample.masks
        lesion, lungs = m["lesion"], m["lung_left"] | m["lung_right"]
        bilateral += (lesion & m["lung_left"]).sum() > 10 and (lesion & m["lung_right"]).sum() > 10
        lesion_row, _ = centroid(lesion)
        lower += lesion_row > centroid(lungs)[0]
        cols = np.nonzero(lesion)[1]
        lung_cols = np.nonzero(lungs)[1]
        lateral += np.abs(cols - SIZE / 2).mean() > np.abs(lung_cols - SIZE / 2).mean()
    assert bilateral >= 0.7 * N_PER_CLASS
    assert lower >= 0.8 * N_PER_CLASS
    assert lateral >= 0.8 * N_PER_CLASS


def test_pneumonia_is_mostly_unilateral(samples):
    one_sided = 0
    for sample in samples["pneumonia"]:
        m = sample.masks
        left = (m["lesion"] & m["lung_left"]).sum()
        right = (m["lesion"] & m["lung_right"]).sum()
        one_sided += max(left, right) >= 0.95 * (left + right)
    assert one_sided >= 0.7 * N_PER_CLASS


def test_consolidation_is_denser_than_ground_glass(generator):
    gain = {}
    for label in ("pneumonia", "covid"):
        values = []
        for k in range(10):
            sick = generator.render(label, 500 + k, severity=0.8, text=False)
            normal = generator.render("normal", 500 + k, text=False)
            lesion = sick.masks["lesion"]
            values.append(float(sick.image_clean[lesion].astype(float).mean()
                                - normal.image_clean[lesion].astype(float).mean()))
        gain[label] = np.mean(values)
    assert gain["covid"] > 5  # visible
    assert gain["pneumonia"] > gain["covid"] + 10


# ----------------------------------------------------------------------------- cohorts


def test_cohort_structure():
    config = CohortConfig(n_patients=12, seed=5, size=64)
    samples = list(generate_cohort(config))
    meta = pd.DataFrame([s.meta for s in samples])
    assert meta["patient_id"].nunique() == 12
    per_patient = meta.groupby("patient_id")
    assert per_patient.size().between(1, 4).all()
    for key in ("label", "site", "age", "sex"):
        assert (per_patient[key].nunique() == 1).all()
    for pid, group in per_patient:
        assert list(group["study_index"]) == list(range(len(group)))
        assert all(iid == f"{pid}_s{k}" for iid, k in zip(group["image_id"], group["study_index"], strict=True))
    assert set(meta["view"]) <= {"PA", "AP"} and meta["age"].between(18, 90).all()
    assert meta["image_id"].is_unique
    # follow-ups show the same anatomy in a slightly different pose
    pid = per_patient.size().idxmax()
    idx = meta.index[meta["patient_id"] == pid]
    if len(idx) > 1:
        a, b = samples[idx[0]].masks["lung_right"], samples[idx[1]].masks["lung_right"]
        assert (a & b).sum() / (a | b).sum() > 0.6


def test_study_does_not_depend_on_cohort_size():
    small = list(generate_cohort(CohortConfig(n_patients=3, seed=2, size=64)))
    large = list(generate_cohort(CohortConfig(n_patients=6, seed=2, size=64)))
    assert [s.meta["image_id"] for s in large[:len(small)]] == [s.meta["image_id"] for s in small]
    for a, b in zip(small, large[:len(small)], strict=True):
        np.testing.assert_array_equal(a.image, b.image)
    # other class weights change labels, never the anatomy or age of a patient
    weighted = plan_cohort(CohortConfig(n_patients=6, seed=2, size=64, class_weights=(1, 0, 0)))
    assert {s["label"] for s in weighted} == {"normal"}
    ages = {s["patient_id"]: s["age"] for s in plan_cohort(CohortConfig(n_patients=6, seed=2))}
    assert ages == {s["patient_id"]: s["age"] for s in weighted}


def test_site_label_correlation_controls_the_shortcut():
    def association(correlation: float) -> float:
        plan = pd.DataFrame(plan_cohort(CohortConfig(n_patients=300, seed=1,
                                                     site_label_correlation=correlation)))
        return cramers_v(plan["site"], plan["label"])

    assert association(1.0) > 0.8
    assert association(0.0) < 0.3


# ----------------------------------------------------------------------------- files


def test_write_cohort_files_and_manifest(tmp_path: Path):
    config = CohortConfig(n_patients=4, seed=9, size=64)
    manifest = write_cohort(tmp_path, config, progress=False)
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    on_disk = pd.read_csv(tmp_path / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(on_disk.columns) == list(MANIFEST_COLUMNS)
    assert list(on_disk["image_id"]) == list(manifest["image_id"])
    assert set(manifest["source"]) == {"phantom"} and set(manifest["origin"]) == {"real"}
    assert set(manifest["split"]) == {""} and set(manifest["mask_path"]) == {""}
    samples = {s.meta["image_id"]: s for s in generate_cohort(config)}
    for row, written in zip(manifest.itertuples(), on_disk.itertuples(), strict=True):
        assert written.path == f"images/{row.image_id}.png"  # relative on disk
        assert row.path == str(tmp_path.resolve() / written.path)  # absolute in memory
        image = np.asarray(Image.open(row.path))
        np.testing.assert_array_equal(image, samples[row.image_id].image)
        for kind in MASK_KINDS:
            rel = getattr(written, f"mask_{kind}")
            assert rel == f"masks/{kind}/{row.image_id}.png" and "\\" not in rel
            assert getattr(row, f"mask_{kind}") == str(tmp_path.resolve() / rel)
            mask = np.asarray(Image.open(tmp_path / rel))
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
            np.testing.assert_array_equal(mask == 255, samples[row.image_id].masks[kind])
        clean = np.asarray(Image.open(tmp_path / "images_clean" / f"{row.image_id}.png"))
        np.testing.assert_array_equal(clean, samples[row.image_id].image_clean)
    assert not list(tmp_path.rglob("*.tmp"))


def test_patient_rotation_turns_anatomy_and_masks_together():
    from cxrlib.data.phantom import ROTATION_MAX_DEG, PhantomGenerator, _rotate_anatomy

    gen = PhantomGenerator(size=64, seed=0)
    angles = [gen.render("covid", seed).meta["rotation_deg"] for seed in range(12)]
    assert all(abs(a) <= ROTATION_MAX_DEG for a in angles)
    assert len(set(angles)) > 6  # positioning varies from study to study
    # a quarter turn of a marked square moves the attenuation and every mask alike
    att = np.zeros((33, 33), np.float32)
    att[2:8, 10:20] = 1.0
    block = att > 0
    none = np.zeros_like(block)
    out, lungs, heart, lesion = _rotate_anatomy(att, {"lung_left": block, "lung_right": none}, none, block, 90.0)
    expected = np.rot90(block)  # OpenCV's positive angle turns counter-clockwise, like rot90
    assert np.array_equal(lungs["lung_left"], expected) and np.array_equal(lesion, expected)
    assert np.array_equal(out > 0.5, expected)
    assert not heart.any() and not lungs["lung_right"].any()
