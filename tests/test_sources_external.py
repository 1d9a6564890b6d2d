"""The adapters of external collections, on fixtures in their published layouts: COVID-CXNet
(``chest_xray_images/covid19/*`` + a partial ``metadata.csv``) and a CSV table + image folder
whose column names come from the recipe."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from cxrlib.data import recipes
from cxrlib.data.sources import (
    ADAPTERS,
    CovidCXNet,
    CsvImageFolder,
    DatasetFormatError,
    open_dataset,
)


def _image(path, mode="L", fmt=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 36), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGB":
        image = image.convert("RGB")
    image.save(path, format=fmt)


@pytest.fixture()
def cxnet(tmp_path):
    root = tmp_path / "covid-cxnet"
    folder = root / "chest_xray_images" / "covid19"
    for number, (name, fmt) in enumerate([("001.jpeg", "JPEG"), ("002-.png", "PNG"), ("003p.PNG", "PNG"),
                                          ("004p-.jpg", "JPEG"), ("005.jfif", "JPEG"), ("006.webp", "WEBP")]):
        _image(folder / name, mode="RGB" if fmt == "JPEG" else "L", fmt=fmt, seed=number)
    (folder / "notes.txt").write_text("not an image")
    (root / "metadata.csv").write_text(
        "\ufefffilename,patient_id,sex,age,view,label,pcr_test,location,url\n"
        "002-.png,10,female,68,AP,COVID-19,positive,Spain,https://example.org/a\n"
        "003p.png,10,female,68,PA,COVID-19,positive,Spain,https://example.org/b\n"  # case differs on disk
        "004p-.jpeg,11,male,5,,COVID-19,positive,Italy,\n"                           # suffix differs on disk
        "009.jpg,12,male,40,AP,COVID-19,positive,UK,\n",                             # no such file
        encoding="utf-8")
    return root


def test_covid_cxnet_reads_its_layout(cxnet):
    adapter = open_dataset("covid-cxnet", cxnet)
    with pytest.warns(UserWarning, match="009.jpg not found"):
        manifest = adapter.manifest()
    rows = manifest.set_index("image_id")
    assert list(rows.index) == ["001.jpeg", "002-.png", "003p.PNG", "004p-.jpg", "005.jfif", "006.webp"]
    assert (rows["label"] == "covid").all() and (rows["source"] == "covid-cxnet").all()
    assert rows.loc["002-.png", "normal_film"] == "1" and rows.loc["002-.png", "pediatric"] == "0"
    assert rows.loc["004p-.jpg", "name_marks"] == "p-"
    assert rows.loc["004p-.jpg", "normal_film"] == "1" and rows.loc["004p-.jpg", "pediatric"] == "1"
    assert rows.loc["002-.png", "patient_id"] == rows.loc["003p.PNG", "patient_id"] == "covid-cxnet:10"
    assert rows.loc["003p.PNG", "view"] == "PA" and rows.loc["004p-.jpg", "view"] == ""
    assert rows.loc["004p-.jpg", "age"] == "5" and rows.loc["004p-.jpg", "in_metadata"] == "1"
    assert rows.loc["001.jpeg", "patient_id"] == "covid-cxnet:image-001"
    assert rows.loc["001.jpeg", "in_metadata"] == "0" and rows.loc["001.jpeg", "view"] == ""
    assert [item.reason for item in adapter.skipped] == ["image file 009.jpg not found"]
    assert CovidCXNet.marks("481p-.jpg") == {"name_marks": "p-", "normal_film": "1", "pediatric": "1"}


def test_covid_cxnet_without_its_image_folder_is_refused(tmp_path):
    with pytest.raises(DatasetFormatError, match="chest_xray_images"):
        open_dataset("covid-cxnet", tmp_path).manifest()


def test_covid_cxnet_in_a_recipe_can_leave_out_normal_films(cxnet):
    recipe = recipes.recipe_from_dict({
        "name": "cxnet-test", "sources": {"cxnet": {"adapter": "covid-cxnet", "root": "covid-cxnet"}},
        "classes": {"covid": [{"source": "cxnet", "normal_film": "0"}]}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest, report = recipes.build_manifest(recipe, cxnet.parent)
    assert sorted(manifest["image_id"]) == ["cxnet:001.jpeg", "cxnet:003p.PNG", "cxnet:005.jfif", "cxnet:006.webp"]
    assert set(report.dropped.loc[report.dropped["reason"] != "unreadable", "image_id"]) == {
        "cxnet:002-.png", "cxnet:004p-.jpg"}


@pytest.fixture()
def collection(tmp_path):
    root = tmp_path / "mine"
    for number, name in enumerate(["a.png", "b.png", "c.png", "sub/d.png"]):
        _image(root / "png" / name, seed=number)
    (root / "table.csv").write_text(
        "file,person,projection,diagnosis,ward\n"
        "a,P1,PA,COVID-19 positive,icu\n"
        "b,P1,AP Supine,healthy,ward\n"
        "c,P2,,Viral Pneumonia,ward\n"
        "sub/d,P3,PA,Tuberculosis,ward\n"
        "e,P4,PA,healthy,ward\n"          # no such file
        "a,P1,PA,COVID-19 positive,icu\n"  # listed twice
        ",P5,PA,healthy,ward\n",           # no image
        encoding="utf-8")
    return root


def test_csv_images_takes_its_columns_from_the_options(collection):
    adapter = open_dataset("csv-images", collection, csv="table.csv", images="png", image_column="file",
                           extension=".png", patient_column="person", view_column="projection",
                           label_column="diagnosis", labels={"COVID-19 positive": "covid"}, source="mine")
    with pytest.warns(UserWarning, match="skipped 3"):
        manifest = adapter.manifest()
    rows = manifest.set_index("image_id")
    assert list(rows.index) == ["a.png", "b.png", "c.png", "sub/d.png"]
    assert rows["label"].tolist() == ["covid", "normal", "pneumonia", "tuberculosis"]
    assert rows["finding"].tolist() == ["COVID-19 positive", "healthy", "Viral Pneumonia", "Tuberculosis"]
    assert rows["patient_id"].tolist() == ["mine:P1", "mine:P1", "mine:P2", "mine:P3"]
    assert rows["view"].tolist() == ["PA", "AP", "", "PA"] and rows.loc["b.png", "view_raw"] == "AP Supine"
    assert rows["ward"].tolist() == ["icu", "ward", "ward", "ward"] and (rows["source"] == "mine").all()
    reasons = sorted(item.reason for item in adapter.skipped)
    assert any("png/e.png not found" in r for r in reasons) and any("already listed" in r for r in reasons)


def test_csv_images_with_one_label_and_no_patients(collection):
    adapter = CsvImageFolder(collection, csv="table.csv", images="png", image_column="file", extension=".png",
                             label="covid")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = adapter.manifest()
    assert (manifest["label"] == "covid").all() and manifest["patient_id"].is_unique
    assert (manifest["source"] == "csv-images").all()


@pytest.mark.parametrize("options, message", [
    (dict(label="covid", label_column="diagnosis"), "exactly one of"),
    (dict(), "exactly one of"),
    (dict(label="covid", csv="../table.csv"), "inside"),
    (dict(label="covid", images="/tmp"), "inside"),
    (dict(label="covid", images="nowhere"), "not found"),
])
def test_csv_images_refuses_bad_options(collection, options, message):
    with pytest.raises(DatasetFormatError, match=message):
        CsvImageFolder(collection, **{"csv": "table.csv", "image_column": "file", **options})


def test_csv_images_missing_column_names_the_file(collection):
    adapter = CsvImageFolder(collection, csv="table.csv", images="png", image_column="filename", label="covid")
    with pytest.raises(DatasetFormatError, match="table.csv lacks column"):
        adapter.manifest()


def test_csv_images_from_a_recipe_needs_no_code(collection):
    recipe = recipes.recipe_from_dict({
        "name": "own", "sources": {"mine": {
            "adapter": "csv-images", "root": "mine", "csv": "table.csv", "images": "png",
            "image_column": "file", "extension": ".png", "patient_column": "person",
            "view_column": "projection", "label_column": "diagnosis",
            "labels": {"COVID-19 positive": "covid"}, "source": "mine"}},
        "classes": {"covid": [{"source": "mine", "label": "covid"}],
                    "normal": [{"source": "mine", "label": "normal", "ward": "ward"}]}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest, _ = recipes.build_manifest(recipe, collection.parent)
    taken = sorted(zip(manifest["image_id"], manifest["label"], strict=True))
    assert taken == [("mine:a.png", "covid"), ("mine:b.png", "normal")]


def test_new_adapters_are_registered_with_their_metadata():
    for name in ("covid-cxnet", "csv-images"):
        adapter = ADAPTERS[name]
        assert all(str(getattr(adapter, field)).strip() for field in ("title", "citation", "license", "url"))


def test_shipped_external_recipes_load_and_cxnet_covid_reads_its_layout(cxnet):
    assert {"cxnet_covid", "chestxray_pneumonia"} <= set(recipes.available_recipes())
    within = recipes.load_recipe("chestxray_pneumonia")
    assert set(within.classes) == {"covid", "pneumonia"}
    assert {rule.source for rules in within.classes.values() for rule in rules} == {"covid-chestxray"}
    recipe = recipes.load_recipe("cxnet_covid")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest, _ = recipes.build_manifest(recipe, cxnet.parent)
    # the '-' (normal film) and 'p' (pediatric) marked files are left out
    assert sorted(manifest["image_id"]) == ["cxnet:001.jpeg", "cxnet:005.jfif", "cxnet:006.webp"]
