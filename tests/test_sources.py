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
    assert len(df) == 8 and not df.attrs  # paths are absolute: no root rides on the frame
    assert df["label"].value_counts().to_dict() == {"normal": 3, "covid": 2, "pneumonia": 2, "lung_opacity": 1}
    row = df.set_index("image_id").loc["Viral Pneumonia-2"]
    assert row["path"] == str(root.resolve() / "Viral Pneumonia/images/Viral Pneumonia-2.png")
    assert row["mask_path"] == str(root.resolve() / "Viral Pneumonia/masks/Viral Pneumonia-2.png")
    assert row["patient_id"] == "Viral Pneumonia-2"  # no patient ids in the database
    assert set(df["origin"]) == {"real"} and set(df["split"]) == {""} and set(df["view"]) == {""}
    assert set(df["source"]) == {"covid19-radiography"}


def test_union_masks_become_left_and_right_lungs_on_a_common_grid(tmp_path):
    root = build_radiography(tmp_path / "db", {"Viral Pneumonia": 3})
    df = Covid19RadiographyDatabase(root).manifest()
    labels = load_label_map(df.iloc[0].to_dict(), size=None)
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
    assert df.iloc[0]["path"] == str(root.resolve() / "COVID/COVID-1.png")


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


# ----------------------------------------------------------------------------- more adapters

import warnings  # noqa: E402

import pandas as pd  # noqa: E402

from cxrlib.data.sources import (  # noqa: E402
    JSRT,
    CheXpert,
    CovidChestXrayDataset,
    DatasetFormatError,
    ImageFolderDataset,
    KermanyPediatricPneumonia,
    MontgomeryTB,
    NIHChestXray14,
    ShenzhenTB,
    ZunairSyntheticCovid,
    convert_jsrt_image,
    normalize_view,
)


def tiny(path: Path, value: int = 0, rgb: bool = False) -> Path:
    """An 8x8 image (grayscale, or RGB through PIL) at ``path``."""
    from PIL import Image

    pixels = (np.arange(64, dtype=np.uint8).reshape(8, 8) + value).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert("RGB" if rgb else "L").save(path)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def build_ieee8023(root: Path) -> Path:
    rows = [
        {"patientid": "1", "offset": "0", "finding": "COVID-19", "view": "PA", "modality": "X-ray", "folder": "images", "filename": "a.jpg", "license": "CC BY"},
        {"patientid": "1", "offset": "5", "finding": "COVID-19, ARDS", "view": "AP Supine", "modality": "X-ray", "folder": "images", "filename": "b.png", "license": ""},
        {"patientid": "2", "offset": "", "finding": "Pneumonia/Viral/COVID-19", "view": "AP", "modality": "X-ray", "folder": "images", "filename": "c.jpeg", "license": ""},
        {"patientid": "3", "offset": "", "finding": "Pneumonia/Bacterial/Streptococcus", "view": "L", "modality": "X-ray", "folder": "images", "filename": "d.jpg", "license": ""},
        {"patientid": "4", "offset": "", "finding": "todo", "view": "", "modality": "X-ray", "folder": "images", "filename": "e.jpg", "license": ""},
        {"patientid": "5", "offset": "", "finding": "No Finding", "view": "?", "modality": "X-ray", "folder": "images", "filename": "f.JPG", "license": ""},
        {"patientid": "6", "offset": "", "finding": "COVID-19", "view": "", "modality": "CT", "folder": "volumes", "filename": "g.nii.gz", "license": ""},
    ]
    write_csv(root / "metadata.csv", rows)
    for index, row in enumerate(rows[:6]):
        tiny(root / "images" / row["filename"], index, rgb=index % 2 == 0)
    return root


def test_ieee8023_labels_views_and_patients(tmp_path):
    root = build_ieee8023(tmp_path / "ieee")
    adapter = CovidChestXrayDataset(root)
    df = adapter.manifest().set_index("image_id")
    mf.validate(df.reset_index(), check_files=True, allowed_roots=[root])
    assert df["label"].to_dict() == {"a.jpg": "covid", "b.png": "covid", "c.jpeg": "covid",
                                     "d.jpg": "pneumonia", "e.jpg": "unknown", "f.JPG": "normal"}
    assert df.loc["b.png", "view"] == "AP" and df.loc["b.png", "view_raw"] == "AP Supine"
    assert df.loc["d.jpg", "view"] == "L" and df.loc["f.JPG", "view"] == ""
    assert df.loc["a.jpg", "patient_id"] == "ieee8023:1" and df.loc["c.jpeg", "finding"] == "Pneumonia/Viral/COVID-19"
    assert df.loc["a.jpg", "license"] == "CC BY"
    # the CT row is excluded by design, listed but without a warning
    assert [(s.kind, s.row) for s in adapter.skipped] == [("excluded", "line 8")]


def test_ieee8023_missing_image_is_listed_and_the_rest_is_read(tmp_path):
    root = build_ieee8023(tmp_path / "ieee")
    (root / "images" / "c.jpeg").unlink()
    adapter = CovidChestXrayDataset(root)
    with pytest.warns(UserWarning, match=r"skipped 1 unusable rows.*metadata.csv line 4 \(image file images/c.jpeg not found\)"):
        df = adapter.manifest()
    assert len(df) == 5 and "c.jpeg" not in set(df["image_id"])
    assert adapter.skipped_frame().loc[lambda t: t["kind"] == "bad", "reason"].tolist() == ["image file images/c.jpeg not found"]


def test_ieee8023_missing_column_and_bad_csv_name_the_file(tmp_path):
    root = build_ieee8023(tmp_path / "ieee")
    table = pd.read_csv(root / "metadata.csv").drop(columns=["finding"])
    table.to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DatasetFormatError, match=r"metadata.csv lacks column\(s\) 'finding'"):
        CovidChestXrayDataset(root).manifest()
    (root / "metadata.csv").write_text('patientid,finding\n"1,COVID\n2,"x"y"\n')
    with pytest.raises(DatasetFormatError, match="metadata.csv"):
        CovidChestXrayDataset(root).manifest()
    (root / "metadata.csv").unlink()
    with pytest.raises(DatasetFormatError, match="metadata.csv not found"):
        CovidChestXrayDataset(root).manifest()


@pytest.mark.parametrize("raw, view", [("PA", "PA"), ("AP Supine", "AP"), ("ap erect", "AP"), ("L", "L"),
                                       ("Lateral", "L"), ("", ""), ("?", "")])
def test_normalize_view(raw, view):
    assert normalize_view(raw) == view


def build_nih(root: Path, archive_layout: bool = True) -> Path:
    rows = [
        {"Image Index": "00000001_000.png", "Finding Labels": "No Finding", "Follow-up #": 0, "Patient ID": 1, "Patient Age": 50, "Patient Gender": "M", "View Position": "PA"},
        {"Image Index": "00000001_001.png", "Finding Labels": "Infiltration|Pneumonia", "Follow-up #": 1, "Patient ID": 1, "Patient Age": 51, "Patient Gender": "M", "View Position": "AP"},
        {"Image Index": "00000002_000.png", "Finding Labels": "Effusion", "Follow-up #": 0, "Patient ID": 2, "Patient Age": 30, "Patient Gender": "F", "View Position": "PA"},
        {"Image Index": "00000003_000.png", "Finding Labels": "No Finding", "Follow-up #": 0, "Patient ID": 3, "Patient Age": 30, "Patient Gender": "F", "View Position": "PA"},
    ]
    write_csv(root / "Data_Entry_2017.csv", rows)
    for index, row in enumerate(rows[:3]):
        folder = root / (f"images_00{index + 1}/images" if archive_layout else "images")
        tiny(folder / row["Image Index"], index)
    return root


def test_nih_labels_archive_layout_and_missing_images(tmp_path):
    root = build_nih(tmp_path / "nih")
    with pytest.warns(UserWarning, match="00000003_000.png not found"):
        df = NIHChestXray14(root).manifest()
    mf.validate(df, check_files=True)
    df = df.set_index("image_id")
    assert df["label"].to_dict() == {"00000001_000": "normal", "00000001_001": "pneumonia", "00000002_000": "other"}
    assert df.loc["00000001_001", "path"] == str(root.resolve() / "images_002/images/00000001_001.png")
    assert df.loc["00000001_001", "finding"] == "Infiltration|Pneumonia"
    assert df.loc["00000001_000", "patient_id"] == df.loc["00000001_001", "patient_id"] == "nih-cxr14:1"
    assert df.loc["00000001_001", "view"] == "AP" and df.loc["00000001_001", "follow_up"] == "1"


def test_nih_missing_column(tmp_path):
    root = build_nih(tmp_path / "nih", archive_layout=False)
    pd.read_csv(root / "Data_Entry_2017.csv").drop(columns=["View Position"]).to_csv(
        root / "Data_Entry_2017.csv", index=False)
    with pytest.raises(DatasetFormatError, match=r"Data_Entry_2017.csv lacks column\(s\) 'View Position'"):
        NIHChestXray14(root).manifest()


def test_kermany_patients_findings_and_published_split(tmp_path):
    base = tmp_path / "download" / "chest_xray"
    for relative in ("train/NORMAL/IM-0115-0001.jpeg", "train/NORMAL/NORMAL2-IM-0115-0002.jpeg",
                     "train/PNEUMONIA/person1_bacteria_1.jpeg", "test/PNEUMONIA/person1_virus_6.jpeg",
                     "val/NORMAL/odd-name.jpeg"):
        tiny(base / relative)
    df = KermanyPediatricPneumonia(tmp_path / "download").manifest()  # wrapper folder accepted
    mf.validate(df, check_files=True)
    df = df.set_index("image_id")
    assert df.loc["train/NORMAL/IM-0115-0001", "patient_id"] == df.loc["train/NORMAL/NORMAL2-IM-0115-0002", "patient_id"] == "kermany:IM-0115"
    assert df.loc["test/PNEUMONIA/person1_virus_6", "patient_id"] == "kermany:person1"
    assert df.loc["test/PNEUMONIA/person1_virus_6", "finding"] == "virus"
    assert df.loc["train/PNEUMONIA/person1_bacteria_1", "finding"] == "bacteria"
    assert df.loc["val/NORMAL/odd-name", "patient_id"] == "kermany:val/NORMAL/odd-name"
    assert set(df["published_split"]) == {"train", "val", "test"} and set(df["split"]) == {""}
    assert KermanyPediatricPneumonia.patient_and_finding("person12_virus_3") == ("person12", "virus")


def build_chexpert(root: Path) -> Path:
    observations = CheXpert.OBSERVATIONS
    def row(path, frontal, appa, **values):
        return {"Path": path, "Sex": "Female", "Age": 60, "Frontal/Lateral": frontal, "AP/PA": appa,
                **{name: values.get(name.replace(" ", "_"), "") for name in observations}}
    rows = [
        row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP", Pneumonia=1.0, Lung_Opacity=1.0),
        row("CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg", "Lateral", "", Pneumonia=-1.0),
        row("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", "Frontal", "PA", No_Finding=1.0),
        row("CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg", "Frontal", "PA", No_Finding=1.0),
    ]
    write_csv(root / "train.csv", rows)
    for r in rows[:3]:
        tiny(root / Path(r["Path"]).relative_to("CheXpert-v1.0-small"))
    return root


def test_chexpert_observations_views_and_paths(tmp_path):
    root = build_chexpert(tmp_path / "CheXpert-v1.0-small")
    with pytest.warns(UserWarning, match="patient00003/study1/view1_frontal.jpg not found"):
        df = CheXpert(root).manifest()
    mf.validate(df, check_files=True)
    df = df.set_index("image_id")
    first = df.loc["patient00001_study1_view1_frontal"]
    assert first["path"] == str(root.resolve() / "train/patient00001/study1/view1_frontal.jpg")
    assert first["label"] == "pneumonia" and first["finding"] == "Lung Opacity|Pneumonia" and first["view"] == "AP"
    assert first["obs_pneumonia"] == "1" and first["obs_edema"] == "" and first["patient_id"] == "chexpert:patient00001"
    lateral = df.loc["patient00001_study1_view2_lateral"]
    assert lateral["view"] == "L" and lateral["label"] == "other" and lateral["uncertain"] == "Pneumonia"
    assert df.loc["patient00002_study1_view1_frontal", "label"] == "normal"


def test_chexpert_missing_observation_column(tmp_path):
    root = build_chexpert(tmp_path / "CheXpert-v1.0-small")
    pd.read_csv(root / "train.csv").drop(columns=["Edema"]).to_csv(root / "train.csv", index=False)
    with pytest.raises(DatasetFormatError, match=r"train.csv lacks column\(s\) 'Edema'"):
        CheXpert(root).manifest()


def half_mask(side: str) -> np.ndarray:
    mask = np.zeros((8, 8), dtype=bool)
    if side == "image_left":
        mask[2:6, 1:3] = True
    else:
        mask[2:6, 5:7] = True
    return mask


def test_montgomery_labels_readings_and_mask_sides(tmp_path):
    root = tmp_path / "MontgomerySet"
    for stem in ("MCUCXR_0001_0", "MCUCXR_0002_1"):
        tiny(root / "CXR_png" / f"{stem}.png")
        # as published: leftMask is the lung on the image's left = the patient's right lung
        write_png(root / "ManualMask" / "leftMask" / f"{stem}.png", half_mask("image_left"))
        write_png(root / "ManualMask" / "rightMask" / f"{stem}.png", half_mask("image_right"))
    (root / "ClinicalReadings").mkdir()
    (root / "ClinicalReadings" / "MCUCXR_0002_1.txt").write_text("Patient's Sex: F\nPatient's Age: 040Y\n\nright upper lobe cavity\n")
    df = MontgomeryTB(tmp_path).manifest().set_index("image_id")
    assert df["label"].to_dict() == {"MCUCXR_0001_0": "normal", "MCUCXR_0002_1": "tb"}
    assert df.loc["MCUCXR_0002_1", "clinical_reading"] == "Patient's Sex: F Patient's Age: 040Y right upper lobe cavity"
    assert df.loc["MCUCXR_0001_0", "mask_lung_left"] == str(root.resolve() / "ManualMask/rightMask/MCUCXR_0001_0.png")
    assert df.loc["MCUCXR_0001_0", "mask_lung_right"] == str(root.resolve() / "ManualMask/leftMask/MCUCXR_0001_0.png")
    assert df.loc["MCUCXR_0001_0", "patient_id"] == "montgomery:0001"


def test_shenzhen_bad_file_name_is_listed_and_masks_are_read(tmp_path):
    root = tmp_path / "ChinaSet_AllFiles"
    tiny(root / "CXR_png" / "CHNCXR_0001_0.png")
    tiny(root / "CXR_png" / "CHNCXR_0002_1.png")
    tiny(root / "CXR_png" / "scan.png")
    write_png(root / "mask" / "CHNCXR_0002_1_mask.png", half_mask("image_left"))
    adapter = ShenzhenTB(root)
    with pytest.warns(UserWarning, match=r"scan.png \(file name does not end in _0"):
        df = adapter.manifest()
    df = df.set_index("image_id")
    assert df["label"].to_dict() == {"CHNCXR_0001_0": "normal", "CHNCXR_0002_1": "tb"}
    assert df.loc["CHNCXR_0002_1", "mask_path"] == str(root.resolve() / "mask/CHNCXR_0002_1_mask.png")
    assert df.loc["CHNCXR_0001_0", "mask_path"] == ""


def test_jsrt_raw_images_are_converted_into_the_cache_with_scr_masks(tmp_path):
    from PIL import Image

    root = tmp_path / "jsrt"
    (root / "All247images").mkdir(parents=True)
    raw = np.zeros((2048, 2048), dtype=">u2")
    raw[:, 1024:] = 4095  # right half: maximal film density -> black after conversion
    raw.tofile(root / "All247images" / "JPCLN001.IMG")
    raw.tofile(root / "All247images" / "JPCNN002.IMG")
    (root / "All247images" / "JPCNN003.IMG").write_bytes(b"\x00" * 100)  # truncated
    for kind in ("left lung", "right lung", "heart"):
        folder = root / "scr" / "masks" / kind
        folder.mkdir(parents=True)
        Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(folder / "JPCLN001.gif")
    cache = tmp_path / "cache"
    adapter = JSRT(root, cache_dir=cache, size=16)
    with pytest.warns(UserWarning, match=r"JPCNN003.IMG .*expected 2048x2048 16-bit samples"):
        df = adapter.manifest()
    df = df.set_index("image_id")
    assert df["label"].to_dict() == {"JPCLN001": "nodule", "JPCNN002": "normal"}
    image = np.asarray(Image.open(df.loc["JPCLN001", "path"]))
    assert Path(df.loc["JPCLN001", "path"]).parent == cache.resolve()
    assert image.shape == (16, 16) and image[:, :8].min() == 255 and image[:, 8:].max() == 0
    assert df.loc["JPCLN001", "mask_lung_left"].endswith("masks/left lung/JPCLN001.gif")
    assert df.loc["JPCNN002", "mask_heart"] == ""
    assert not any(p.suffix == ".png" for p in root.rglob("*"))  # raw folder untouched
    with pytest.raises(ValueError, match="JPCNN003.IMG: expected 2048x2048"):
        convert_jsrt_image(root / "All247images" / "JPCNN003.IMG")


def test_zunair_synthetic_rows_are_train_only_with_unknown_sources(tmp_path):
    root = tmp_path / "release" / "unpacked"
    tiny(root / "G_NC" / "0001.png")
    tiny(root / "G_PC" / "0001.png", 3)
    df = ZunairSyntheticCovid(tmp_path / "release").manifest()
    assert set(df["label"]) == {"covid"} and set(df["split"]) == {"train"}
    assert sorted(df["origin"]) == ["G_NC:zunair2021", "G_PC:zunair2021"]
    assert all(mf.parse_origin(o)[2] == "" for o in df["origin"])
    assert df["image_id"].is_unique and set(df["translated_from"]) == {"normal", "pneumonia"}
    assert mf.check_leakage(df).ok


def test_image_folder_normalises_classes_and_reads_patients(tmp_path):
    root = tmp_path / "folder"
    tiny(root / "COVID-19" / "x1.png")
    tiny(root / "COVID-19" / "x2.jpg", 1)
    tiny(root / "NORMAL" / "n1.jpeg")
    tiny(root / "Tuberculosis" / "t1.png")
    write_csv(root / "patients.csv", [{"image": "COVID-19/x1.png", "patient_id": "P1"},
                                      {"image": "x2.jpg", "patient_id": "P1"}])
    df = ImageFolderDataset(root, source="my-set").manifest().set_index("image_id")
    assert df["label"].to_dict() == {"COVID-19/x1": "covid", "COVID-19/x2": "covid", "NORMAL/n1": "normal",
                                     "Tuberculosis/t1": "tuberculosis"}
    assert df.loc["COVID-19/x1", "patient_id"] == df.loc["COVID-19/x2", "patient_id"] == "my-set:P1"
    assert df.loc["NORMAL/n1", "patient_id"] == "my-set:NORMAL/n1" and set(df["source"]) == {"my-set"}
    assert df.loc["COVID-19/x1", "finding"] == "COVID-19"


def test_every_adapter_is_registered_and_open_dataset_passes_options(tmp_path):
    for name in ("ieee8023", "nih-cxr14", "kermany", "chexpert", "montgomery", "shenzhen", "jsrt",
                 "zunair2021", "image-folder"):
        assert name in ADAPTERS and ADAPTERS[name].name == name
    tiny(tmp_path / "f" / "normal" / "a.png")
    adapter = open_dataset("image-folder", tmp_path / "f", source="other")
    assert adapter.manifest()["source"].tolist() == ["other"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_ieee8023(tmp_path / "i")
        CovidChestXrayDataset(tmp_path / "i").manifest()  # excluded CT rows do not warn
