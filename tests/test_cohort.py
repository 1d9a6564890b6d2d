"""Notebook 01's assembly logic and the phantom CLI, on small phantom cohorts."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from cxrlib.__main__ import main
from cxrlib.data import cohort
from cxrlib.data import manifest as mf


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return cohort.load_or_make_phantom(30, 64, seed=3, base=base, progress=False)


def test_cohort_is_cached_by_settings(small_cohort):
    root = mf.Path(small_cohort.loc[0, "path"]).parent.parent  # <cohort>/images/<id>.png
    from cxrlib.data.phantom import GENERATOR_VERSION

    assert root.name == f"phantom-v{GENERATOR_VERSION}-30p-64px-s3"
    again = cohort.load_or_make_phantom(30, 64, seed=3, base=root.parent, progress=False)
    pd.testing.assert_frame_equal(again, small_cohort)


def test_assemble_splits_by_patient_without_leakage(small_cohort):
    split, report = cohort.assemble(small_cohort, seed=0)
    assert set(split["split"]) == {"train", "val", "test"}
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    assert report.leakage.ok
    metrics = report.metrics()
    assert metrics["n_input"] == len(small_cohort) == metrics["n_images"]
    assert metrics["n_unreadable"] == 0 and metrics["leakage_ok"] is True


def test_assemble_reports_unreadable_and_duplicate_files(small_cohort, tmp_path):
    root = mf.Path(small_cohort.loc[0, "path"]).parent.parent
    work = tmp_path / "cohort"
    shutil.copytree(root, work)
    df = mf.read_manifest(work / "manifest.csv")
    broken = df.iloc[0]
    (work / broken["path"]).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    # the same pixels filed as another patient's image: both patients must share a split
    copy = df.iloc[1].copy()
    copy["image_id"], copy["patient_id"] = "copy_of_1", "p9999"
    shutil.copy(work / df.iloc[1]["path"], work / "images" / "copy_of_1.png")
    copy["path"] = str(work.resolve() / "images" / "copy_of_1.png")
    df = pd.concat([df, copy.to_frame().T], ignore_index=True)
    split, report = cohort.assemble(df, seed=0)
    assert report.unreadable["path"].str.contains(broken["image_id"]).any()
    assert broken["image_id"] not in set(split["image_id"])
    assert report.metrics()["n_duplicate_images"] == 2
    pair = split[split["image_id"].isin([df.iloc[1]["image_id"], "copy_of_1"])]
    assert pair["split"].nunique() == 1


def test_phantom_cli_writes_cohort(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["phantom", "--out", str(out), "--patients", "3", "--seed", "1", "--size", "64", "--quiet"]) == 0
    df = mf.read_manifest(out / "manifest.csv")
    assert len(df) >= 3 and df["patient_id"].nunique() == 3
    for kind in ("lung_left", "lung_right", "heart", "lesion"):
        assert all((out / p).exists() for p in df[f"mask_{kind}"])
    assert "wrote" in capsys.readouterr().out
