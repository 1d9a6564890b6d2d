"""Manifest: schema checks, round trips, duplicates, patient-level splits, leakage."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxrlib.data.io import write_png
from cxrlib.data.manifest import (
    COLUMNS,
    LABELS,
    SPLITS,
    LeakageError,
    LeakageReport,
    ManifestError,
    add_content_hashes,
    check_leakage,
    find_duplicates,
    make_origin,
    parse_origin,
    patient_groups,
    read_manifest,
    resolve_path,
    split_by_patient,
    summarize,
    validate,
    write_manifest,
)


def cohort(
    n_patients: int = 60,
    *,
    seed: int = 0,
    labels: tuple[str, ...] = ("normal", "pneumonia", "covid"),
    weights: tuple[float, ...] = (0.5, 0.3, 0.2),
    max_images: int = 3,
) -> pd.DataFrame:
    """A manifest of real rows: each patient has 1..max_images images of one label."""
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(n_patients):
        label = labels[rng.choice(len(labels), p=np.asarray(weights) / sum(weights))]
        for study in range(int(rng.integers(1, max_images + 1))):
            rows.append(
                {
                    "image_id": f"p{patient:04d}_s{study}",
                    "path": f"images/p{patient:04d}_s{study}.png",
                    "label": label,
                    "patient_id": f"p{patient:04d}",
                    "source": "site_a" if patient % 2 else "site_b",
                    "view": "PA",
                    "split": "",
                    "mask_path": "",
                    "origin": "real",
                }
            )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def splits_per_patient(df: pd.DataFrame) -> pd.Series:
    real = df[df["origin"] == "real"]
    return real.groupby("patient_id")["split"].nunique()


# ----------------------------------------------------------------------------- origin


def test_origin_round_trip_and_malformed_values():
    assert parse_origin("real") is None
    value = make_origin("G_NC", "ckpt_epoch10.pt", "p0003_s1")
    assert value == "G_NC:ckpt_epoch10.pt:p0003_s1"
    assert parse_origin(value) == ("G_NC", "ckpt_epoch10.pt", "p0003_s1")
    assert make_origin("ldm", "unet.safetensors") == "ldm:unet.safetensors"
    assert parse_origin("ldm:unet.safetensors") == ("ldm", "unet.safetensors", "")
    # the source id comes last, so it may itself contain ':'
    assert parse_origin("G_PC:last.pt:nih:00001") == ("G_PC", "last.pt", "nih:00001")
    for bad in ("", "Real", "G_NC", ":ckpt.pt", "G_NC::p1"):
        with pytest.raises(ValueError, match="malformed origin"):
            parse_origin(bad)
    with pytest.raises(ValueError, match="checkpoint"):
        make_origin("G_NC", "C:/runs/last.pt")
    with pytest.raises(ValueError):
        make_origin("", "last.pt")


# ----------------------------------------------------------------------------- validate


def test_validate_accepts_a_clean_manifest():
    df = cohort(10)
    assert validate(df) is df


def test_validate_names_every_problem():
    df = cohort(10)
    df.loc[1, "image_id"] = df.loc[0, "image_id"]
    df.loc[3, "label"] = ""
    df.loc[4, "patient_id"] = "  "
    df.loc[5, "split"] = "holdout"
    df.loc[6, "origin"] = "cyclegan"
    df = df.drop(columns=["view"])

    with pytest.raises(ManifestError) as caught:
        validate(df)
    message = str(caught.value)
    assert "missing columns: view" in message
    assert "duplicate image_id" in message and repr(df.loc[0, "image_id"]) in message
    assert "empty label in 1 rows: 3" in message
    assert "empty patient_id in 1 rows: 4" in message
    assert "'holdout'" in message and "rows: 5" in message
    assert "malformed origin ('cyclegan'" in message and "rows: 6" in message
    assert len(caught.value.problems) == 6


def test_validate_caps_long_lists():
    df = cohort(40, max_images=1)
    df["label"] = ""
    message = str(pytest.raises(ManifestError, validate, df).value)
    assert "empty label in 40 rows" in message and "(+20 more)" in message


def test_validate_checks_files(tmp_path):
    df = cohort(3, max_images=1)
    df["path"] = [str(tmp_path / relative) for relative in df["path"]]
    for path in df["path"][:2]:
        write_png(path, np.zeros((4, 4), np.uint8))
    df.loc[0, "mask_path"] = str(tmp_path / "masks" / "lung_missing.png")
    with pytest.raises(ManifestError) as caught:
        validate(df, check_files=True)
    message = str(caught.value)
    assert df.loc[2, "path"] in message and df.loc[0, "path"] not in message
    assert "lung_missing.png" in message and "'mask_path'" in message
    relative = cohort(1, max_images=1)
    with pytest.raises(ManifestError, match="relative paths in column 'path' cannot be checked"):
        validate(relative, check_files=True)


def test_validate_refuses_labels_outside_the_declared_set():
    df = cohort(4, max_images=1)
    df.loc[2, "label"] = "banana"
    with pytest.raises(ManifestError) as caught:
        validate(df)
    assert len(caught.value.problems) == 1
    message = str(caught.value)
    assert "label not in the declared label set" in message and "'banana'" in message
    assert f"rows: 2 ({df.loc[2, 'image_id']!r})" in message
    assert validate(df, labels=[*LABELS, "banana"]) is df  # a recipe declares its own classes
    assert validate(df, labels=None) is df


# ----------------------------------------------------------------------------- read / write


def test_write_read_round_trip_keeps_strings_and_empties(tmp_path):
    df = cohort(4)
    df["patient_id"] = ["0001"] * len(df)  # leading zeros must survive
    df["age"] = ["007"] + [""] * (len(df) - 1)
    df.loc[0, "view"] = ""
    df.loc[0, "source"] = "NA"  # pandas' default would turn this into NaN
    df = df[["age", *reversed(COLUMNS)]]  # extras first, schema columns shuffled

    path = write_manifest(df, tmp_path / "sub" / "manifest.csv")
    assert [p.name for p in path.parent.iterdir()] == ["manifest.csv"]  # no temporary left
    back = read_manifest(path)

    assert list(back.columns) == [*COLUMNS, "age"]
    assert not back.attrs  # no root rides on the frame: paths are absolute
    assert all(isinstance(value, str) for value in back.to_numpy().ravel())
    expected = df[[*COLUMNS, "age"]].reset_index(drop=True)
    expected["path"] = [str(path.parent.resolve() / value) for value in expected["path"]]
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)
    assert back.loc[0, "patient_id"] == "0001" and back.loc[0, "view"] == ""
    assert back.loc[0, "source"] == "NA" and back.loc[1, "age"] == ""


def test_write_manifest_converts_values_and_refuses_invalid(tmp_path):
    from pathlib import PurePosixPath

    df = cohort(2, max_images=1)
    df["mask_path"] = [PurePosixPath("masks") / "a.png", None]
    df["severity"] = [1.5, np.nan]
    back = read_manifest(write_manifest(df, tmp_path / "m.csv"))
    assert back["mask_path"].tolist() == [str(tmp_path / "masks" / "a.png"), ""]
    assert back["severity"].tolist() == ["1.5", ""]

    df.loc[0, "split"] = "training"
    with pytest.raises(ManifestError, match="training"):
        write_manifest(df, tmp_path / "m.csv")
    assert read_manifest(tmp_path / "m.csv")["split"].tolist() == ["", ""]  # old file kept


def test_read_manifest_reports_the_file_and_problems(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"image_id": ["a", "a"], "path": ["x.png", "y.png"]}).to_csv(path, index=False)
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    message = str(caught.value)
    assert "bad.csv" in message and "missing columns" in message and "duplicate image_id" in message


def test_resolve_path(tmp_path):
    assert resolve_path(tmp_path / "other", "a.png") == tmp_path / "other" / "a.png"
    assert resolve_path(None, str(tmp_path / "abs.png")) == tmp_path / "abs.png"
    assert resolve_path(cohort(1), str(tmp_path / "abs.png")) == tmp_path / "abs.png"
    with pytest.raises(ValueError, match="absolute in memory"):
        resolve_path(cohort(1), "images/a.png")


# ----------------------------------------------------------------------------- duplicates


def test_identical_pixels_saved_twice_are_found(tmp_path):
    df = cohort(4, max_images=1)
    rng = np.random.default_rng(1)
    for relative in df["path"]:
        write_png(tmp_path / relative, rng.integers(0, 256, (16, 16), dtype=np.uint8))
    # the same pixels written again under another patient, with other PNG settings
    pixels = np.asarray(Image.open(tmp_path / df.loc[0, "path"]))
    Image.fromarray(pixels).save(tmp_path / df.loc[3, "path"], compress_level=0)
    df.loc[2, "path"] = "images/unreadable.png"
    (tmp_path / "images" / "unreadable.png").write_bytes(b"not a png")
    df["path"] = [str(tmp_path / value) for value in df["path"]]

    hashed, report = add_content_hashes(df)
    assert "content_hash" not in df.columns  # the input is left alone
    assert hashed.loc[2, "content_hash"] == "" and report.n_ok == 3
    assert [bad.path for bad in report.bad] == [str(tmp_path / "images" / "unreadable.png")]

    duplicates = find_duplicates(hashed)
    assert list(duplicates.columns[:5]) == [
        "content_hash",
        "image_id",
        "patient_id",
        "source",
        "group_size",
    ]
    assert sorted(duplicates["image_id"]) == sorted(df.loc[[0, 3], "image_id"])
    assert (duplicates["group_size"] == 2).all()
    assert duplicates["content_hash"].nunique() == 1


def test_find_duplicates_needs_hashes():
    with pytest.raises(ValueError, match="add_content_hashes"):
        find_duplicates(cohort(2))


# ----------------------------------------------------------------------------- splitting


def test_split_by_patient_has_no_overlap_and_keeps_class_proportions():
    df = cohort(300, seed=3)
    out = split_by_patient(df, seed=0)
    assert set(out["split"]) == set(SPLITS)
    assert (splits_per_patient(out) == 1).all()
    shares = out["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.7) < 0.06
    assert abs(shares["val"] - 0.15) < 0.05 and abs(shares["test"] - 0.15) < 0.05
    overall = out["label"].value_counts(normalize=True)
    for name in SPLITS:
        within = out.loc[out["split"] == name, "label"].value_counts(normalize=True)
        assert (within.reindex(overall.index, fill_value=0) - overall).abs().max() < 0.08
    assert df["split"].eq("").all()  # input untouched


def test_split_by_patient_is_deterministic_and_order_free():
    df = cohort(120, seed=4)
    first = split_by_patient(df, seed=7)
    again = split_by_patient(df, seed=7)
    pd.testing.assert_frame_equal(first, again)
    shuffled = split_by_patient(df.sample(frac=1.0, random_state=1), seed=7)
    pd.testing.assert_series_equal(shuffled["split"].sort_index(), first["split"])
    other = split_by_patient(df, seed=8)
    assert not other["split"].equals(first["split"])


def test_split_without_stratification_and_without_val():
    out = split_by_patient(cohort(80), fractions=(0.8, 0.0, 0.2), stratify=None)
    assert set(out["split"]) == {"train", "test"}
    assert (splits_per_patient(out) == 1).all()
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_patient(cohort(5), fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="stratify"):
        split_by_patient(cohort(5), stratify="diagnosis")


def test_duplicate_linked_patients_land_in_the_same_split():
    df = cohort(60, seed=5)
    df["content_hash"] = [f"h{i}" for i in range(len(df))]
    # p0002 - p0041 - p0050 chain through two different images of p0041
    assert (df["patient_id"] == "p0041").sum() >= 2
    pairs = [("p0001", "p0040", 0), ("p0002", "p0041", 0), ("p0041", "p0050", -1)]
    for left, right, which in pairs:
        shared = f"dup-{left}-{right}"
        df.loc[df.index[df["patient_id"] == left][which], "content_hash"] = shared
        df.loc[df.index[df["patient_id"] == right][0], "content_hash"] = shared
    groups = patient_groups(df)
    assert groups[df["patient_id"] == "p0050"].iloc[0] == "p0002"

    for seed in range(5):
        out = split_by_patient(df, seed=seed)
        split_of = out.groupby("patient_id")["split"].first()
        assert split_of["p0001"] == split_of["p0040"]
        assert split_of["p0002"] == split_of["p0041"] == split_of["p0050"]
        check_leakage(out)  # no duplicate crosses a split


def test_synthetic_rows_inherit_the_split_of_their_source():
    df = cohort(40, seed=6)
    real_ids = df["image_id"].tolist()
    synthetic = [
        {
            **df.iloc[i].to_dict(),
            "image_id": f"syn_{real_ids[i]}",
            "label": "covid",
            "origin": make_origin("G_NC", "ckpt_epoch10.pt", real_ids[i]),
        }
        for i in range(0, len(df), 3)
    ]
    # a generated image made from a generated image follows the chain back to the real one
    synthetic.append(
        {
            **synthetic[0],
            "image_id": "syn2",
            "origin": make_origin("G_PC", "e5.pt", "syn_" + real_ids[0]),
        }
    )
    synthetic.append({**synthetic[0], "image_id": "ldm_1", "origin": "ldm:unet.pt", "split": ""})
    synthetic.append(
        {**synthetic[0], "image_id": "ldm_2", "origin": "ldm:unet.pt", "split": "train"}
    )
    # no ignore_index: the index repeats labels 0, 1, 2, ..., which must not confuse rows
    df = pd.concat([df, pd.DataFrame(synthetic)])

    out = split_by_patient(df, seed=2)
    assert out.index.equals(df.index) and (out["image_id"] == df["image_id"]).all()
    split_of = dict(zip(out["image_id"], out["split"], strict=True))
    for row in synthetic[:-3]:
        assert split_of[row["image_id"]] == split_of[parse_origin(row["origin"])[2]]
    assert split_of["syn2"] == split_of[real_ids[0]]
    assert split_of["ldm_1"] == "train" and split_of["ldm_2"] == "train"
    assert check_leakage(out).ok


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    patients=st.lists(
        st.tuples(st.sampled_from(["normal", "covid", "pneumonia"]), st.integers(1, 4)),
        min_size=1,
        max_size=40,
    ),
    mixed_patient=st.booleans(),
    seed=st.integers(0, 2**16),
    fractions=st.sampled_from(
        [(0.7, 0.15, 0.15), (0.6, 0.2, 0.2), (0.8, 0.0, 0.2), (1.0, 0.0, 0.0)]
    ),
)
def test_split_property_no_patient_in_two_splits(patients, mixed_patient, seed, fractions):
    rows = []
    for number, (label, n_images) in enumerate(patients):
        for study in range(n_images):
            # optionally a patient whose follow-up has another label
            row_label = "normal" if mixed_patient and number == 0 and study == 1 else label
            rows.append(
                [
                    f"i{number}_{study}",
                    f"{number}_{study}.png",
                    row_label,
                    f"p{number}",
                    "s",
                    "PA",
                    "",
                    "",
                    "real",
                ]
            )
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tiny cohorts cannot fill every class
        out = split_by_patient(df, seed=seed, fractions=fractions)
    assert len(out) == len(df)
    assert out["split"].isin(SPLITS).all()  # every row assigned
    assert (splits_per_patient(out) == 1).all()
    assert check_leakage(out, raise_on_leak=False).ok
    if fractions[0] == 1.0:
        assert (out["split"] == "train").all()


def test_tiny_cohort_warns_about_missing_classes():
    df = cohort(6, seed=0, max_images=1)
    with pytest.warns(UserWarning, match="no rows in"):
        split_by_patient(df)


# ----------------------------------------------------------------------------- leakage


def split_cohort() -> pd.DataFrame:
    df = cohort(60, seed=8)
    df["content_hash"] = [f"h{i}" for i in range(len(df))]
    return split_by_patient(df, seed=0)


def test_check_leakage_passes_a_clean_split():
    report = check_leakage(split_cohort())
    assert isinstance(report, LeakageReport) and report.ok
    assert report.summary() == dict.fromkeys(
        [
            "patients_in_several_splits",
            "duplicate_hashes_across_splits",
            "synthetic_split_mismatch",
            "synthetic_in_eval",
            "near_duplicates_across_splits",
            "patient_groups_across_splits",
        ],
        0,
    )
    assert "no leakage" in str(report)


def test_check_leakage_finds_a_patient_in_two_splits():
    df = split_cohort()
    patient = df.groupby("patient_id").filter(lambda rows: len(rows) > 1)["patient_id"].iloc[0]
    rows = df.index[df["patient_id"] == patient]
    df.loc[rows[0], "split"] = "test" if df.loc[rows[1], "split"] != "test" else "train"
    with pytest.raises(LeakageError) as caught:
        check_leakage(df)
    assert patient in str(caught.value) and "several splits" in str(caught.value)
    report = check_leakage(df, raise_on_leak=False)
    assert report.patients_in_several_splits == [patient] and not report.ok


def test_check_leakage_finds_a_duplicate_across_splits():
    df = split_cohort()
    train_row = df.index[df["split"] == "train"][0]
    test_row = df.index[df["split"] == "test"][0]
    df.loc[test_row, "content_hash"] = df.loc[train_row, "content_hash"]
    report = check_leakage(df, raise_on_leak=False)
    assert report.duplicate_hashes_across_splits == [df.loc[train_row, "content_hash"]]
    assert report.summary()["duplicate_hashes_across_splits"] == 1
    assert df.loc[test_row, "image_id"] in str(report)


def test_check_leakage_finds_synthetic_images_in_the_wrong_split():
    df = split_cohort()
    source = df[df["split"] == "test"].iloc[0]
    synthetic = pd.DataFrame(
        [
            {
                **source.to_dict(),
                "image_id": "syn_bad",
                "split": "train",
                "origin": make_origin("G_NC", "e10.pt", source["image_id"]),
            },
            {
                **source.to_dict(),
                "image_id": "syn_ok",
                "split": "test",
                "origin": make_origin("G_NC", "e10.pt", source["image_id"]),
            },
            {**source.to_dict(), "image_id": "ldm_val", "split": "val", "origin": "ldm:unet.pt"},
        ]
    )
    synthetic["content_hash"] = ["s1", "s2", "s3"]
    df = pd.concat([df, synthetic])  # repeated index labels on purpose
    with pytest.raises(LeakageError) as caught:
        check_leakage(df)
    message = str(caught.value)
    assert "syn_bad" in message and source["image_id"] in message and "ldm_val" in message
    report = check_leakage(df, raise_on_leak=False)
    assert report.synthetic_split_mismatch == ["syn_bad"]
    assert report.synthetic_in_eval == ["ldm_val"]
    assert report.patients_in_several_splits == []  # synthetic rows do not count as patients


# ----------------------------------------------------------------------------- summary


def test_summarize_is_json_ready():
    df = split_cohort()
    synthetic = df.iloc[[0]].assign(
        image_id="syn0", origin=make_origin("G_NC", "e1.pt", df.iloc[0]["image_id"])
    )
    df = pd.concat([df, synthetic], ignore_index=True)
    summary = summarize(df)
    json.dumps(summary)
    assert summary["n_images"] == len(df)
    assert summary["n_real"] == len(df) - 1 and summary["n_synthetic"] == 1
    assert summary["n_patients"] == df.loc[df["origin"] == "real", "patient_id"].nunique()
    assert sum(summary["images_per_split"].values()) == len(df)
    assert sum(summary["patients_per_split"].values()) == summary["n_patients"]
    per_class_split = summary["images_per_split_and_class"]
    assert sum(sum(counts.values()) for counts in per_class_split.values()) == len(df)
    assert all(type(value) is int for value in summary["images_per_class"].values())
    assert summarize(cohort(3))["images_per_split"] == {"unassigned": len(cohort(3))}


def row(image_id: str, path: str, **values: str) -> dict[str, str]:
    return {"image_id": image_id, "path": path, "label": "normal", "patient_id": f"p_{image_id}",
            "source": "s", "view": "PA", "split": "train", "mask_path": "", "origin": "real", **values}


def test_write_manifest_elsewhere_keeps_paths_valid(tmp_path):
    """A manifest written into another folder (e.g. a run folder) still points at the same files."""
    cohort_dir = tmp_path / "cohort"
    write_png(cohort_dir / "images" / "a.png", np.zeros((8, 8), np.uint8))
    df = pd.DataFrame([row("a", str(cohort_dir / "images" / "a.png"))])
    out = write_manifest(df, tmp_path / "runs" / "01_data" / "manifest.csv")
    assert "../../cohort/images/a.png," in out.read_text()  # relative on disk
    again = read_manifest(out, allowed_roots=[cohort_dir])
    assert again.loc[0, "path"] == str((cohort_dir / "images" / "a.png").resolve())
    assert again.loc[0, "mask_path"] == ""
    # written back where it came from: byte-identical
    before = out.read_bytes()
    write_manifest(again, out)
    assert out.read_bytes() == before


def test_read_manifest_makes_every_path_column_absolute(tmp_path):
    folder = tmp_path / "cohort"
    pd.DataFrame([row("a", "images/a.png", mask_path="masks/a.png", mask_lung_left="l/a.png",
                      path_lung_crop="crops/../crops/a.png", raw_path="x.jpg")]).to_csv(
        folder.mkdir() or folder / "manifest.csv", index=False)
    back = read_manifest(folder / "manifest.csv")
    base = folder.resolve()
    assert back.loc[0, ["path", "mask_path", "mask_lung_left", "path_lung_crop"]].tolist() == [
        str(base / "images/a.png"), str(base / "masks/a.png"), str(base / "l/a.png"),
        str(base / "crops/a.png")]
    assert back.loc[0, "raw_path"] == "x.jpg"  # a record of where a copy came from, not opened


def hostile(folder, path: str, **values: str):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row("good", "images/a.png"), row("evil", path, **values)]).to_csv(
        folder / "manifest.csv", index=False)
    write_png(folder / "images" / "a.png", np.zeros((8, 8), np.uint8))
    return folder / "manifest.csv"


@pytest.mark.parametrize("escape", ["../../../../../../../../etc/passwd", "/etc/passwd",
                                    "images/../../outside.png"])
def test_read_manifest_refuses_paths_escaping_its_folder(tmp_path, escape):
    (tmp_path / "outside.png").write_bytes(b"x")
    path = hostile(tmp_path / "cohort", escape)
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    message = str(caught.value)
    assert "\n" not in message  # one line
    assert str(path) in message and "'evil'" in message and repr(escape) in message
    assert "'good'" not in message and "allowed_roots" in message


def test_read_manifest_refuses_an_escaping_mask_column(tmp_path):
    path = hostile(tmp_path / "cohort", "images/a.png", mask_lung_left="../secret.png")
    with pytest.raises(ManifestError, match="'evil' mask_lung_left '../secret.png'"):
        read_manifest(path)


def test_read_manifest_resolves_links_before_the_containment_check(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_png(elsewhere / "real.png", np.zeros((8, 8), np.uint8))
    path = hostile(tmp_path / "cohort", "images/link.png")
    (tmp_path / "cohort" / "images" / "link.png").symlink_to(elsewhere / "real.png")
    (tmp_path / "cohort" / "linked_folder").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ManifestError, match=r"'evil' path 'images/link.png' \(-> .*real.png\)"):
        read_manifest(path)
    hostile(tmp_path / "cohort", "linked_folder/real.png")
    with pytest.raises(ManifestError, match="'evil' path 'linked_folder/real.png'"):
        read_manifest(path)
    # a data root the caller allows explicitly
    again = read_manifest(path, allowed_roots=[elsewhere])
    validate(again, check_files=True)
    with pytest.raises(ManifestError, match="'evil' path"):
        validate(again, check_files=True, allowed_roots=[tmp_path / "cohort"])


def test_read_manifest_allows_a_data_root_only_when_asked(tmp_path):
    data_root = tmp_path / "datasets"
    write_png(data_root / "x" / "b.png", np.zeros((8, 8), np.uint8))
    path = hostile(tmp_path / "run", str(data_root / "x" / "b.png"))
    with pytest.raises(ManifestError, match="'evil'"):
        read_manifest(path)
    back = read_manifest(path, allowed_roots=[data_root])
    assert back.loc[1, "path"] == str(data_root / "x" / "b.png")
    # the frame remembers nothing: a second read without the root is refused again
    write_manifest(back, path)
    with pytest.raises(ManifestError, match="'evil'"):
        read_manifest(path)


def test_stage_manifest_may_point_into_its_run_folder(tmp_path):
    run = tmp_path / "run"
    write_png(run / "01_data" / "images" / "a.png", np.zeros((8, 8), np.uint8))
    df = pd.DataFrame([row("a", str(run / "01_data" / "images" / "a.png"))])
    stage_manifest = write_manifest(df, run / "02_lung_segmentation" / "manifest.csv")
    assert read_manifest(stage_manifest).loc[0, "path"] == str(run.resolve() / "01_data/images/a.png")
    other = write_manifest(df, tmp_path / "run" / "notastage" / "manifest.csv")
    with pytest.raises(ManifestError, match="'a' path '../01_data/images/a.png'"):
        read_manifest(other)


def test_read_manifest_refuses_labels_outside_the_declared_set(tmp_path):
    path = hostile(tmp_path / "cohort", "images/a.png", label="banana")
    with pytest.raises(ManifestError, match=r"manifest.csv: label not in the declared label set.*'banana'"):
        read_manifest(path)
    assert read_manifest(path, labels=[*LABELS, "banana"]).loc[1, "label"] == "banana"


def test_paths_that_cannot_be_placed_count_as_outside(tmp_path):
    df = pd.DataFrame([row("nul", str(tmp_path / "a\x00.png")), row("rel", "images/a.png"),
                       row("ok", str(tmp_path / "images" / "a.png"))])
    with pytest.raises(ManifestError, match="2 paths outside the allowed folders") as caught:
        validate(df, allowed_roots=[tmp_path])
    assert "'nul'" in str(caught.value) and "'rel'" in str(caught.value) and "'ok'" not in str(caught.value)


def test_an_absolute_path_climbing_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "outside.png").write_bytes(b"x")
    climbing = f"{tmp_path}/cohort/images/../../outside.png"
    path = hostile(tmp_path / "cohort", climbing)
    with pytest.raises(ManifestError, match=r"'evil' path .*outside.png"):
        read_manifest(path)
    assert read_manifest(path, allowed_roots=[tmp_path]).loc[1, "path"] == str(tmp_path / "outside.png")
