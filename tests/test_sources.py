"""Dataset adapters read published folder layouts into valid manifests (tiny fixtures built here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrlib.data import manifest as mf
from cxrlib.data.datasets import SegmentationDataset, load_label_map
from cxrlib.data.io import write_png
from cxrlib.data.sources import (
    ADAPTERS,
    Covid19RadiographyDatabase,
    DatasetAdapter,
    normalize_label,
    open_dataset,
)

IMAGE_SIZE, MASK_SIZE = 29, 24  # the real database: 299x299 images, 256x256 masks


def lung_union_mask(size: int) -> np.ndarray:
    """Two separate elliptic lungs in one 0/255-style bool mask."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    left = ((yy - 0.5) / 0.3) ** 2 + ((xx - 0.7) / 0.15) ** 2 <= 1
    right = ((yy - 0.5) / 0.3) ** 2 + ((xx - 0.3) / 0.15) ** 2 <= 1
    return left | right


def build_radiography(root: Path, classes: dict[str, int], *, masks: bool = True,
                      layout: str = "v4") -> Path:
    """A tiny COVID-19 Radiography Database: ``<Class>/images/<Class>-<n>.png`` (+ ``masks/``).

    ``layout="v3"`` puts images directly in the class folder (older releases, no masks).
    """
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        image_dir = root / name / "images" if layout == "v4" else root / name
        for index in range(1, count + 1):
            image = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
            write_png(image_dir / f"{name}-{index}.png", image)
            if masks and layout == "v4":
                write_png(root / name / "masks" / f"{name}-{index}.png", lung_union_mask(MASK_SIZE))
        (root / f"{name}.metadata.xlsx").write_bytes(b"not read")
    return root


def test_manifest_follows_the_schema_and_normalises_labels(tmp_path):
    root = build_radiography(tmp_path / "db", {"COVID": 2, "Normal": 3, "Lung_Opacity": 1,
                                               "Viral Pneumonia": 2})
    df = Covid19RadiographyDatabase(root).manifest()
    assert list(df.columns[: len(mf.COLUMNS)]) == list(mf.COLUMNS)
    mf.validate(df, check_files=True)
    assert len(df) == 8 and df.attrs["root"] == str(root.resolve())
    assert df["label"].value_counts().to_dict() == {"normal": 3, "covid": 2, "pneumonia": 2, "lung_opacity": 1}
    row = df.set_index("image_id").loc["Viral Pneumonia-2"]
    assert row["path"] == "Viral Pneumonia/images/Viral Pneumonia-2.png"
    assert row["mask_path"] == "Viral Pneumonia/masks/Viral Pneumonia-2.png"
    assert row["patient_id"] == "Viral Pneumonia-2"  # no patient ids in the database
    assert set(df["origin"]) == {"real"} and set(df["split"]) == {""} and set(df["view"]) == {""}
    assert set(df["source"]) == {"covid19-radiography"}


def test_union_masks_become_left_and_right_lungs_on_a_common_grid(tmp_path):
    root = build_radiography(tmp_path / "db", {"Viral Pneumonia": 3})
    df = Covid19RadiographyDatabase(root).manifest()
    labels = load_label_map(df.iloc[0].to_dict(), df, size=None)
    assert labels.shape == (MASK_SIZE, MASK_SIZE) and set(np.unique(labels)) == {0, 1, 2}
    # label 1 (patient's left lung) is on the image right
    assert np.nonzero(labels == 1)[1].mean() > MASK_SIZE / 2 > np.nonzero(labels == 2)[1].mean()
    dataset = SegmentationDataset(df, size=16)
    image, target = dataset[0]
    assert tuple(image.shape) == (1, 16, 16) and tuple(target.shape) == (16, 16)


def test_images_without_masks_and_older_layouts(tmp_path):
    root = build_radiography(tmp_path / "v3", {"COVID": 2, "NORMAL": 1}, layout="v3")
    df = Covid19RadiographyDatabase(root).manifest()
    assert set(df["mask_path"]) == {""}
    assert df.set_index("image_id")["label"].to_dict() == {"COVID-1": "covid", "COVID-2": "covid",
                                                            "NORMAL-1": "normal"}
    assert df.iloc[0]["path"] == "COVID/COVID-1.png"


def test_archive_wrapper_folder_is_accepted_and_other_folders_ignored(tmp_path):
    build_radiography(tmp_path / "COVID-19_Radiography_Dataset", {"Normal": 2})
    (tmp_path / "COVID-19_Radiography_Dataset" / "notes").mkdir()
    adapter = open_dataset("covid19-radiography", tmp_path)
    assert isinstance(adapter, Covid19RadiographyDatabase)
    assert adapter.root.name == "COVID-19_Radiography_Dataset"
    assert len(adapter.manifest()) == 2


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Covid19RadiographyDatabase(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="class folders"):
        Covid19RadiographyDatabase(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dataset"):
        open_dataset("no-such-dataset", tmp_path)
    with pytest.raises(ValueError, match="unknown class 'Tuberculosis'"):
        normalize_label("Tuberculosis", Covid19RadiographyDatabase.LABELS)


def test_registry_holds_adapter_classes():
    for name, adapter in ADAPTERS.items():
        assert issubclass(adapter, DatasetAdapter) and adapter.name == name
        assert "Citation" in adapter.__doc__ and "License" in adapter.__doc__ and "Download" in adapter.__doc__
