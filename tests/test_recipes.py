"""Recipes pick rows of public datasets for each class (fixtures with the real column names)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib.data import manifest as mf
from cxrlib.data.recipes import (
    RecipeError,
    available_recipes,
    build_manifest,
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
    mf.validate(df, check_files=True)
    assert df.attrs["root"] == str(base.resolve())
    by_id = df.set_index("image_id")
    # COVID: any COVID-19 spelling, PA or AP (supine included), no lateral, no missing view, no SARS
    assert sorted(by_id.index[by_id["label"] == "covid"]) == ["covid-chestxray:a.jpg", "covid-chestxray:b.jpg"]
    assert sorted(by_id.index[by_id["label"] == "pneumonia"]) == ["nih:00000001_001", "nih:00000002_000"]
    assert len(by_id[by_id["label"] == "normal"]) == 4
    assert by_id.loc["covid-chestxray:a.jpg", "path"] == "covid-chestxray/images/a.jpg"
    assert by_id.loc["nih:00000001_001", "source"] == "nih" and by_id.loc["nih:00000001_001", "source_label"] == "pneumonia"
    assert report.counts.loc["normal", "nih"] == 4 and report.offered == {"covid-chestxray": 5, "nih": 7}


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
    assert reasons["nih:00000001_001"] == "ambiguous: taken by classes sick, anything"
    assert set(df.loc[df["label"] == "sick", "image_id"]) == {"nih:00000005_000"}
    normal = df[df["label"] == "normal"]
    assert len(normal) <= 3 and normal.groupby("patient_id").size().to_dict() in (
        {"nih-cxr14:4": 2, "nih-cxr14:1": 1}, {"nih-cxr14:4": 2, "nih-cxr14:3": 1},
        {"nih-cxr14:1": 1, "nih-cxr14:3": 1})
    assert (reasons.str.startswith("cap:")).sum() == 4 - len(normal)
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
