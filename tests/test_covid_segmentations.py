"""The covid-segmentations adapter: RGBA crops pasted per structure.csv, films linked to ieee8023."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib.data import manifest as mf
from cxrlib.data.datasets import load_label_map
from cxrlib.data.io import read_mask
from cxrlib.data.sources import (
    ADAPTERS,
    CovidChestXrayDataset,
    CovidSegmentations,
    DatasetFormatError,
    paste_structure_mask,
)

METADATA_COLUMNS = ["patientid", "offset", "sex", "age", "finding", "view", "modality", "date",
                    "location", "folder", "filename", "doi", "url", "license", "clinical_notes"]
STRUCTURE_COLUMNS = ["#", "Taxonomy", "Class", "Template Name", "File Folder", "Filename", "Image",
                     "Tag", "Mask", "Resolution", "Top", "Left", "Width", "Height"]
#: Colours the published crops use (any non-black colour is foreground).
COLOURS = {"Left Lung": (255, 0, 0), "Right Lung": (187, 73, 73), "Cardiomediastinum": (255, 134, 134),
           "Ground Glass Opacities": (255, 248, 11), "Consolidation": (166, 209, 6)}


def _crop(root: Path, name: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> str:
    """An RGBA crop of ``box`` = (left, top, width, height), the structure filling its top half."""
    _, _, width, height = box
    pixels = np.zeros((height, width, 4), dtype=np.uint8)
    pixels[..., 3] = 255  # opaque everywhere, as in the published files
    pixels[: height // 2, :, :3] = colour
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGBA").save(root / "masks" / f"{name}.png")
    return f"masks/{name}.png"


def build_layout(root: Path) -> Path:
    """Two patients, three films; film c.png was resized to half size after annotation."""
    (root / "images").mkdir(parents=True)
    films = {"a.jpg": (40, 60), "b.png": (40, 60), "c.png": (20, 30)}  # (H, W) on disk
    for name, shape in films.items():
        Image.fromarray(np.full(shape, 90, dtype=np.uint8)).save(root / "images" / name)
    pd.DataFrame(
        [["1", "0", "M", "60", "COVID-19", "PA", "X-ray", "", "", "images", "a.jpg", "", "", "CC BY", ""],
         ["1", "4", "M", "60", "COVID-19, ARDS", "AP Supine", "X-ray", "", "", "images", "b.png", "", "", "", ""],
         ["2", "", "F", "", "Pneumocystis", "PA", "X-ray", "", "", "images", "c.png", "", "", "", ""],
         ["3", "", "F", "", "COVID-19", "PA", "X-ray", "", "", "images", "gone.png", "", "", "", ""]],
        columns=METADATA_COLUMNS,
    ).to_csv(root / "metadata.csv", index=False)
    rows = []

    def add(film: str, kind: str, box: tuple[int, int, int, int], resolution: str = "60x40",
            mask: bool = True) -> None:
        name = f"{film.split('.')[0]}_{kind.replace(' ', '')}"
        left, top, width, height = box
        path = _crop(root, name, box, COLOURS.get(kind, (0, 255, 228))) if mask else ""
        rows.append([len(rows) + 1, "", f"COVID-19 {kind}", kind, "", film, f"images/{name}.jpg", "",
                     path, resolution, top, left, width, height])

    for film in ("a.jpg", "b.png", "c.png"):  # c.png: annotated at 60x40, stored at 30x20
        add(film, "Right Lung", (4, 4, 24, 30))    # image left = patient's right
        add(film, "Left Lung", (32, 4, 24, 30))
        add(film, "Cardiomediastinum", (20, 10, 20, 28))
    add("a.jpg", "Ground Glass Opacities", (34, 10, 10, 8))
    add("a.jpg", "Consolidation", (58, 36, 6, 6))          # reaches past the canvas: cut off
    add("b.png", "Monitoring Probes", (0, 0, 60, 40), mask=False)  # tagged, never drawn
    add("b.png", "Unicorn", (0, 0, 4, 4))                  # unknown structure
    pd.DataFrame(rows, columns=STRUCTURE_COLUMNS).to_csv(root / "structure.csv", index=False)
    return root


def test_paste_places_the_crop_and_cuts_what_leaves_the_canvas():
    crop = np.zeros((3, 4, 4), dtype=np.uint8)
    crop[..., 3] = 255
    crop[0, :, 0] = 200
    crop[2, 1, 1] = 7
    canvas = paste_structure_mask(crop, left=2, top=1, canvas_shape=(5, 5))
    expected = np.zeros((5, 5), dtype=bool)
    expected[1, 2:5] = True
    expected[3, 3] = True
    np.testing.assert_array_equal(canvas, expected)
    transparent = crop.copy()
    transparent[..., 3] = 0
    assert not paste_structure_mask(transparent, 0, 0, (5, 5)).any()
    with pytest.raises(ValueError, match="shape"):
        paste_structure_mask(np.zeros((2, 2, 2, 2)), 0, 0, (5, 5))


def test_manifest_rows_structures_and_skipped_rows(tmp_path):
    root = build_layout(tmp_path / "covseg")
    adapter = CovidSegmentations(root, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match="gone.png"):
        df = adapter.manifest()
    df = df.set_index("image_id")
    assert list(df.index) == ["covseg-a.jpg", "covseg-b.png", "covseg-c.png"]
    assert df.loc["covseg-a.jpg", "patient_id"] == df.loc["covseg-b.png", "patient_id"] == "ieee8023:1"
    assert df.loc["covseg-b.png", "view"] == "AP" and df.loc["covseg-c.png", "label"] == "pneumonia"
    assert set(df["lung_convention"]) == {"anatomical"}
    assert df.loc["covseg-b.png", "mask_ground_glass"] == "" and df.loc["covseg-a.jpg", "mask_ground_glass"]
    reasons = adapter.skipped_frame().set_index("kind")["reason"]
    assert any("gone.png" in reason for reason in reasons.loc[["bad"]])
    assert any("Unicorn" in reason for reason in reasons.loc[["excluded"]])
    assert any("empty Mask" in reason for reason in reasons.loc[["excluded"]])

    left = read_mask(df.loc["covseg-a.jpg", "mask_lung_left"])
    assert left.shape == (40, 60)
    expected = np.zeros((40, 60), dtype=bool)
    expected[4:19, 32:56] = True  # top half of the 24x30 crop at (32, 4)
    np.testing.assert_array_equal(left, expected)
    consolidation = read_mask(df.loc["covseg-a.jpg", "mask_consolidation"])
    assert consolidation.sum() == 2 * 3 and consolidation[36:39, 58:60].all()
    # the film stored at half size gets its masks on its own grid
    assert read_mask(df.loc["covseg-c.png", "mask_lung_right"]).shape == (20, 30)
    # patient's left lung lands on the image right, as label 1
    labels = load_label_map(df.reset_index().iloc[0].to_dict(), size=None)
    assert labels[10, 40] == 1 and labels[10, 10] == 2 and labels[35, 30] == 0


def test_structure_masks_in_memory_agree_with_the_written_files(tmp_path):
    root = build_layout(tmp_path / "covseg")
    adapter = CovidSegmentations(root, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning):
        df = adapter.manifest().set_index("image_id")
    masks = adapter.structure_masks("a.jpg")
    assert {"mask_lung_left", "mask_lung_right", "mask_cardiomediastinum", "mask_ground_glass",
            "mask_consolidation"} == set(masks)
    for column, mask in masks.items():
        np.testing.assert_array_equal(mask, read_mask(df.loc["covseg-a.jpg", column]))


def test_same_patients_as_the_ieee8023_adapter_so_patient_splits_keep_copies_together(tmp_path):
    root = build_layout(tmp_path / "covseg")
    segmentations = CovidSegmentations(root, cache_dir=tmp_path / "cache")
    ieee = CovidChestXrayDataset(root)  # the same metadata.csv in the ieee8023 schema
    with pytest.warns(UserWarning):
        seg_df, ieee_df = segmentations.manifest(), ieee.manifest()
    pairs = seg_df.merge(ieee_df, left_on="ieee8023_image_id", right_on="image_id", suffixes=("", "_ieee"))
    assert len(pairs) == 3 and (pairs["patient_id"] == pairs["patient_id_ieee"]).all()
    both = pd.concat([seg_df, ieee_df], ignore_index=True)
    groups = mf.patient_groups(both)
    for film in ("a.jpg", "c.png"):
        copies = groups[(both["image_id"] == film) | (both["image_id"] == f"covseg-{film}")]
        assert copies.nunique() == 1


def test_registered_and_bad_tables_name_the_file(tmp_path):
    assert ADAPTERS["covid-segmentations"] is CovidSegmentations
    assert CovidSegmentations.structure_column("COVID-19 Ground Glass Opacities") == "mask_ground_glass"
    root = build_layout(tmp_path / "covseg")
    table = pd.read_csv(root / "structure.csv").drop(columns=["Left"])
    table.to_csv(root / "structure.csv", index=False)
    with pytest.raises(DatasetFormatError, match="structure.csv.*'Left'"):
        CovidSegmentations(root, cache_dir=tmp_path / "cache").manifest()


def test_expert_masks_are_linked_to_the_cohort_films(tmp_path):
    from cxrlib.stages.lung_segmentation import expert_lesion_mask, link_expert_masks

    root = build_layout(tmp_path / "covseg")
    with pytest.warns(UserWarning):
        expert = CovidSegmentations(root, cache_dir=tmp_path / "cache").manifest()
        cohort = CovidChestXrayDataset(root).manifest()
    linked = link_expert_masks(cohort, expert).set_index("image_id")
    assert linked.loc["a.jpg", "expert_image_id"] == "covseg-a.jpg"
    assert linked.loc["a.jpg", "mask_ground_glass"] == expert.set_index("image_id").loc["covseg-a.jpg",
                                                                                          "mask_ground_glass"]
    lesions = expert_lesion_mask(linked.loc["a.jpg"].to_dict(), (20, 30))
    assert lesions.shape == (20, 30) and lesions.any()
    assert not expert_lesion_mask(linked.loc["b.png"].to_dict(), (20, 30)).any()  # drawn lungs, no lesion
    recipe_ids = link_expert_masks(cohort.assign(image_id="covid-chestxray:" + cohort["image_id"]), expert)
    assert recipe_ids.set_index("image_id").loc["covid-chestxray:a.jpg", "expert_image_id"] == "covseg-a.jpg"
    cohort.loc[cohort["image_id"] == "a.jpg", "patient_id"] = "ieee8023:99"
    with pytest.raises(ValueError, match="a.jpg"):
        link_expert_masks(cohort, expert)


def test_expert_lesions_become_the_lesion_masks_of_the_films_they_annotate(tmp_path):
    from cxrlib.data.io import read_image, read_mask
    from cxrlib.stages.umap_gradcam import with_expert_lesions

    root = build_layout(tmp_path / "covseg")
    with pytest.warns(UserWarning):
        expert = CovidSegmentations(root, cache_dir=tmp_path / "cache").manifest()
        cohort = CovidChestXrayDataset(root).manifest()
    other = cohort.iloc[[0]].assign(image_id="z.jpg", patient_id="ieee8023:7")  # a film nobody annotated
    rows = pd.concat([cohort, other]).set_index("image_id", drop=False)
    rows["mask_lesion"] = ""
    out = with_expert_lesions(rows, expert, tmp_path / "lesions")
    assert list(out.index) == list(rows.index)  # index and order kept
    annotated = out.loc["a.jpg"]
    lesion = read_mask(annotated["mask_lesion"])
    assert lesion.shape == read_image(annotated["path"]).shape and lesion.any()
    assert out.loc["b.png", "mask_lesion"] and not read_mask(out.loc["b.png", "mask_lesion"]).any()  # no lesion drawn
    assert out.loc["z.jpg", "expert_image_id"] == "" and out.loc["z.jpg", "mask_lesion"] == ""  # no reference
