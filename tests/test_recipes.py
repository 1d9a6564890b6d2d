"""Recipes pick rows of public datasets for each class (fixtures with the real column names)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib.data import dedup
from cxrlib.data import manifest as mf
from cxrlib.data.recipes import (
    DROP_REASONS,
    DROPPED_COLUMNS,
    UNREAD_CLASS,
    RecipeError,
    available_recipes,
    build_manifest,
    kept_and_dropped,
    kept_and_dropped_totals,
    load_recipe,
    recipe_from_dict,
)


def tiny(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def build_base(base: Path) -> Path:
    """A base folder with an ieee8023 collection and an NIH sample, as the realdata recipe expects."""
    ieee = [("1", "COVID-19", "PA", "a.jpg"), ("1", "COVID-19", "AP Supine", "b.jpg"),
            ("2", "Pneumonia/Viral/COVID-19", "L", "c.jpg"), ("3", "SARS", "PA", "d.jpg"),
            ("4", "COVID-19", "", "e.jpg")]
    (base / "covid-chestxray").mkdir(parents=True)
    pd.DataFrame([{"patientid": p, "finding": f, "view": v, "modality": "X-ray", "folder": "images",
                   "filename": n} for p, f, v, n in ieee]).to_csv(base / "covid-chestxray" / "metadata.csv",
                                                                  index=False)
    for index, (*_, name) in enumerate(ieee):
        tiny(base / "covid-chestxray" / "images" / name, index)
    nih = [("00000001_000.png", "No Finding", 1), ("00000001_001.png", "Pneumonia", 1),
           ("00000002_000.png", "Infiltration|Pneumonia", 2), ("00000003_000.png", "No Finding", 3),
           ("00000004_000.png", "No Finding", 4), ("00000004_001.png", "No Finding", 4),
           ("00000005_000.png", "Mass", 5)]
    (base / "nih-cxr14-sample").mkdir()
    pd.DataFrame([{"Image Index": i, "Finding Labels": f, "Patient ID": p, "View Position": "PA"}
                  for i, f, p in nih]).to_csv(base / "nih-cxr14-sample" / "Data_Entry_2017.csv", index=False)
    for index, (name, *_) in enumerate(nih):
        tiny(base / "nih-cxr14-sample" / "images" / name, 100 + index)
    return base


def test_shipped_recipes_load():
    assert {"realdata", "zunair2021"} <= set(available_recipes())
    recipe = load_recipe("realdata")
    assert set(recipe.classes) == {"covid", "normal", "pneumonia"}
    assert {s.adapter for s in recipe.sources.values()} == {"ieee8023", "nih-cxr14"}
    assert all(not Path(s.root).is_absolute() for s in recipe.sources.values())
    zunair = load_recipe("zunair2021")
    assert "zunair2021" in {s.adapter for s in zunair.sources.values()}
    assert recipe_from_dict(recipe.to_dict()) == recipe  # the dict form round-trips


def test_realdata_recipe_on_a_fixture(tmp_path):
    base = build_base(tmp_path / "data")
    df, report = build_manifest(load_recipe("realdata"), base)
    mf.validate(df, check_files=True, allowed_roots=[base])  # absolute paths under the base folder
    by_id = df.set_index("image_id")
    # COVID: any COVID-19 spelling, PA or AP (supine included), no lateral, no missing view, no SARS
    assert sorted(by_id.index[by_id["label"] == "covid"]) == ["covid-chestxray:a.jpg", "covid-chestxray:b.jpg"]
    assert sorted(by_id.index[by_id["label"] == "pneumonia"]) == ["nih:00000001_001", "nih:00000002_000"]
    assert len(by_id[by_id["label"] == "normal"]) == 4
    assert by_id.loc["covid-chestxray:a.jpg", "path"] == str(base.resolve() / "covid-chestxray/images/a.jpg")
    # the report of dropped rows names files relative to the base folder, as the recipe does
    assert "nih-cxr14-sample/images/00000005_000.png" in set(report.dropped["path"])
    assert by_id.loc["nih:00000001_001", "source"] == "nih" and by_id.loc["nih:00000001_001", "source_label"] == "pneumonia"
    assert report.counts.loc["normal", "nih"] == 4 and report.offered == {"covid-chestxray": 5, "nih": 7}
    # every offered row not in the manifest is accounted for, raw finding and view kept
    dropped = report.dropped.set_index("image_id")
    assert list(report.dropped.columns) == list(DROPPED_COLUMNS)
    assert len(df) + len(dropped) == 12
    assert dropped.loc["covid-chestxray:c.jpg", ["reason", "finding", "view"]].tolist() == [
        "non-frontal view", "Pneumonia/Viral/COVID-19", "L"]
    assert dropped.loc["covid-chestxray:d.jpg", ["reason", "label"]].tolist() == ["finding matches no class", "pneumonia"]
    assert dropped.loc["covid-chestxray:e.jpg", ["reason", "detail"]].tolist() == [
        "missing view", "no view given; allowed views ['AP', 'PA']"]
    assert dropped.loc["nih:00000005_000", ["reason", "finding"]].tolist() == ["finding matches no class", "Mass"]
    assert report.metrics()["dropped_by_reason"] == {"finding matches no class": 2, "non-frontal view": 1,
                                                     "missing view": 1}


def test_ambiguous_rows_are_dropped_and_caps_keep_whole_patients(tmp_path):
    base = build_base(tmp_path / "data")
    recipe = recipe_from_dict({
        "name": "t", "seed": 3,
        "sources": {"nih": {"adapter": "nih-cxr14", "root": "nih-cxr14-sample"}},
        "classes": {"normal": [{"source": "nih", "finding": {"equals": "no finding"}}],
                    "sick": [{"source": "nih", "finding": {"one_of": ["Pneumonia", "Mass"]}},
                             {"source": "nih", "finding": {"startswith": "Infiltration"}}],
                    "anything": [{"source": "nih", "finding": {"contains": "pneumonia"}}]},
        "caps": {"normal": 3},
    })
    df, report = build_manifest(recipe, base)
    reasons = report.dropped.set_index("image_id")["reason"]
    assert reasons["nih:00000001_001"] == "ambiguous"
    assert report.dropped.set_index("image_id").at["nih:00000001_001", "detail"] == "taken by classes sick, anything"
    assert set(df.loc[df["label"] == "sick", "image_id"]) == {"nih:00000005_000"}
    normal = df[df["label"] == "normal"]
    assert len(normal) <= 3 and normal.groupby("patient_id").size().to_dict() in (
        {"nih-cxr14:4": 2, "nih-cxr14:1": 1}, {"nih-cxr14:4": 2, "nih-cxr14:3": 1},
        {"nih-cxr14:1": 1, "nih-cxr14:3": 1})
    assert (reasons == "over cap").sum() == 4 - len(normal)
    assert set(report.dropped.loc[reasons.to_numpy() == "over cap", "class"]) <= {"normal"}
    again, _ = build_manifest(recipe, base)
    assert again["image_id"].tolist() == df["image_id"].tolist()  # seeded


@pytest.mark.parametrize("change, message", [
    ({"sources": {"x": {"adapter": "nope", "root": "x"}}}, "unknown adapter 'nope'"),
    ({"sources": {"x": {"adapter": "nih-cxr14", "root": "/abs/x"}}}, "must be relative"),
    ({"classes": {"a": [{"source": "y"}]}}, "rule 1: 'source' must name one of the sources"),
    ({"classes": {"a": [{"source": "x", "finding": {"like": "P"}}]}}, "unknown test 'like'"),
    ({"caps": {"b": 3}}, "cap for unknown class 'b'"),
    ({"caps": {"a": -1}}, "integer >= 0"),
    ({"colour": 1}, r"unknown key\(s\) \['colour'\]"),
])
def test_recipe_errors_name_the_place(change, message):
    data = {"name": "bad", "sources": {"x": {"adapter": "nih-cxr14", "root": "x"}},
            "classes": {"a": [{"source": "x"}]}}
    data.update(change)
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data, where="bad.yaml")


def test_recipe_files_and_missing_folders(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nsources: {nih: {adapter: nih-cxr14, root: nih-cxr14-sample}}\n"
                    "classes: {normal: [{source: nih, finding: No Finding, view: PA}]}\n")
    recipe = load_recipe(path)
    assert recipe.classes["normal"][0].views == ("PA",)
    with pytest.raises(FileNotFoundError, match="source 'nih' .* expects .*nih-cxr14-sample"):
        build_manifest(recipe, tmp_path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="mine.yaml: not valid YAML"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="unknown recipe 'nope'; shipped recipes"):
        load_recipe("nope")


def build_every_reason(base: Path) -> Path:
    """A base folder in which each drop reason happens (see the comments)."""
    ieee = [("1", "COVID-19", "PA", "a.jpg", 10),        # kept
            ("1", "COVID-19", "AP Supine", "b.jpg", 11),  # view not allowed (the recipe takes PA only)
            ("2", "Pneumonia/Viral/COVID-19", "L", "c.jpg", 12),  # non-frontal view
            ("3", "SARS", "PA", "d.jpg", 13),            # finding matches no class
            ("4", "COVID-19", "", "e.jpg", 14),          # missing view
            ("5", "todo", "PA", "f.jpg", 15),            # unlabeled
            ("6", "COVID-19", "PA", "g.jpg", None),      # unreadable: the file is missing
            ("7", "COVID-19", "PA", "h.jpg", 10),        # duplicate: same pixels as a.jpg
            ("8", "SARS", "L", "i.jpg", 18),             # non-frontal view (before the finding)
            ("9", "todo", "L", "j.jpg", 19)]             # unlabeled (before the view)
    (base / "covid-chestxray").mkdir(parents=True)
    pd.DataFrame([{"patientid": p, "finding": f, "view": v, "modality": "X-ray", "folder": "images",
                   "filename": n} for p, f, v, n, _ in ieee]).to_csv(base / "covid-chestxray" / "metadata.csv",
                                                                     index=False)
    for *_, name, value in ieee:
        if value is not None:
            tiny(base / "covid-chestxray" / "images" / name, value)
    nih = [("00000001_000.png", "No Finding", 1), ("00000002_000.png", "No Finding", 2),
           ("00000003_000.png", "No Finding", 3),           # normal is capped at 2: one is over cap
           ("00000004_000.png", "Infiltration|Pneumonia", 4),  # ambiguous: pneumonia and infiltration
           ("00000005_000.png", "Pneumonia", 5),            # kept
           ("00000006_000.png", "Mass", 6),                 # finding matches no class
           ("00000007_000.png", "Pneumonia", 7)]            # unreadable: not a PNG inside
    (base / "nih-cxr14-sample").mkdir()
    pd.DataFrame([{"Image Index": i, "Finding Labels": f, "Patient ID": p, "View Position": "PA"}
                  for i, f, p in nih]).to_csv(base / "nih-cxr14-sample" / "Data_Entry_2017.csv", index=False)
    for index, (name, *_) in enumerate(nih):
        tiny(base / "nih-cxr14-sample" / "images" / name, 100 + index)
    (base / "nih-cxr14-sample" / "images" / "00000007_000.png").write_bytes(b"not a png")
    return base


EVERY_REASON_RECIPE = {
    "name": "every-reason", "seed": 0,
    "sources": {"covid-chestxray": {"adapter": "ieee8023", "root": "covid-chestxray"},
                "nih": {"adapter": "nih-cxr14", "root": "nih-cxr14-sample"}},
    "classes": {"covid": [{"source": "covid-chestxray", "label": "covid", "view": ["PA"]}],
                "normal": [{"source": "nih", "finding": {"equals": "No Finding"}, "view": ["PA", "AP"]}],
                "pneumonia": [{"source": "nih", "finding": {"contains": "Pneumonia"}, "view": ["PA", "AP"]}],
                "infiltration": [{"source": "nih", "finding": {"contains": "Infiltration"}}]},
    "caps": {"normal": 2},
}


def test_every_offered_row_is_kept_or_dropped_with_one_reason(tmp_path):
    base = build_every_reason(tmp_path / "data")
    with pytest.warns(UserWarning, match="skipped 1 unusable rows"):
        df, report = build_manifest(recipe_from_dict(EVERY_REASON_RECIPE), base)
    dropped = report.dropped
    assert list(dropped.columns) == list(DROPPED_COLUMNS) and set(dropped["reason"]) <= set(DROP_REASONS)
    by_id = dropped[dropped["image_id"] != ""].set_index("image_id")
    assert by_id.index.is_unique and not set(by_id.index) & set(df["image_id"])
    ieee = {f"covid-chestxray:{name}": reason for name, reason in [
        ("b.jpg", "view not allowed"), ("c.jpg", "non-frontal view"), ("d.jpg", "finding matches no class"),
        ("e.jpg", "missing view"), ("f.jpg", "unlabeled"), ("i.jpg", "non-frontal view"), ("j.jpg", "unlabeled")]}
    nih = {"nih:00000004_000": "ambiguous", "nih:00000006_000": "finding matches no class"}
    capped = by_id.index[by_id["reason"] == "over cap"]
    assert len(capped) == 1 and capped[0] in {"nih:00000001_000", "nih:00000002_000", "nih:00000003_000"}
    assert by_id["reason"].drop(capped).to_dict() == {**ieee, **nih}
    assert by_id.at[capped[0], "class"] == "normal" and by_id.at[capped[0], "detail"] == "class 'normal' capped at 2 images"
    # what the row was stays visible: raw finding, raw view, the adapter's label
    assert by_id.loc["covid-chestxray:b.jpg", ["finding", "view", "label"]].tolist() == ["COVID-19", "AP Supine", "covid"]
    assert by_id.at["covid-chestxray:b.jpg", "detail"] == "view 'AP Supine' (AP); allowed views ['PA']"
    assert by_id.loc["covid-chestxray:f.jpg", ["finding", "label"]].tolist() == ["todo", "unknown"]
    assert by_id.at["nih:00000004_000", "detail"] == "taken by classes pneumonia, infiltration"
    assert by_id.at["nih:00000006_000", "finding"] == "Mass"
    # the adapter's unusable row: no image id, the file and line named
    unreadable = dropped[dropped["reason"] == "unreadable"]
    assert len(unreadable) == 1 and unreadable["source"].tolist() == ["covid-chestxray"]
    assert unreadable["detail"].iloc[0] == "metadata.csv line 8: image file images/g.jpg not found"
    assert report.metrics()["dropped_by_reason"] == {
        "non-frontal view": 2, "unlabeled": 2, "finding matches no class": 2, "view not allowed": 1,
        "missing view": 1, "unreadable": 1, "ambiguous": 1, "over cap": 1}

    # the notebook's next steps: decode + hash, drop exact copies; then count everything
    hashed, hash_report = dedup.hash_images(df)
    assert [bad.path for bad in hash_report.bad] == [str(base.resolve() / "nih-cxr14-sample/images/00000007_000.png")]
    deduped, dedup_report = dedup.deduplicate(hashed[hashed["content_hash"] != ""])
    assert dedup_report.dropped == ["covid-chestxray:h.jpg"]
    table = kept_and_dropped(df, report, dedup_report, unreadable=hash_report)
    assert list(table.columns) == ["kept", *DROP_REASONS, "duplicate", "total"]
    cells = {(source, label, column): int(n) for (source, label), row in table.drop(index="total", level=0).iterrows()
             for column, n in row.items() if n and column != "total"}
    assert cells == {
        ("covid-chestxray", "covid", "kept"): 1, ("covid-chestxray", "covid", "duplicate"): 1,
        ("covid-chestxray", "covid", "view not allowed"): 1, ("covid-chestxray", "covid", "missing view"): 1,
        ("covid-chestxray", "covid", "non-frontal view"): 1,
        ("covid-chestxray", "pneumonia", "finding matches no class"): 1,
        ("covid-chestxray", "pneumonia", "non-frontal view"): 1,
        ("covid-chestxray", "unknown", "unlabeled"): 2,
        ("covid-chestxray", UNREAD_CLASS, "unreadable"): 1,
        ("nih", "normal", "kept"): 2, ("nih", "normal", "over cap"): 1,
        ("nih", "pneumonia", "kept"): 1, ("nih", "pneumonia", "unreadable"): 1,
        ("nih", "pneumonia", "ambiguous"): 1, ("nih", "other", "finding matches no class"): 1,
    }
    assert table.loc[("total", ""), "kept"] == len(deduped) == 4
    # each row counted once: offered + unusable rows per source
    totals = kept_and_dropped_totals(table)
    assert totals["per_source"]["covid-chestxray"]["total"] == report.offered["covid-chestxray"] + 1 == 10
    assert totals["per_source"]["nih"]["total"] == report.offered["nih"] == 7
    assert totals["all"]["total"] == 17 and totals["all"]["duplicate"] == 1 and totals["all"]["unreadable"] == 2
    assert (table["total"] == table.drop(columns="total").sum(axis=1)).all()
    # without the later steps every manifest row counts as kept
    assert kept_and_dropped(df, report).loc[("total", ""), "kept"] == len(df) == 6


def test_kept_and_dropped_refuses_reports_of_another_manifest(tmp_path):
    base = build_base(tmp_path / "data")
    df, report = build_manifest(load_recipe("realdata"), base)
    hashed, _ = dedup.hash_images(df)
    _, dedup_report = dedup.deduplicate(hashed)
    dedup_report.dropped = ["elsewhere:1"]
    with pytest.raises(ValueError, match="deduplication dropped image id.*elsewhere:1"):
        kept_and_dropped(df, report, dedup_report)
    with pytest.raises(ValueError, match="unreadable path.*not in the manifest.*x.png"):
        kept_and_dropped(df, report, unreadable=["x.png"])
