"""DICOM reading (display pipeline, errors) and de-identified header records."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxrlib.data import dicom
from cxrlib.data.dicom import (
    RECORD_FIELDS,
    DicomReadError,
    dicom_record,
    hash_patient_id,
    parse_age,
    read_dicom,
)
from cxrlib.data.io import ImageReadError, read_image

PERSONAL = {
    "PatientName": "Doe^Jane^Q",
    "PatientBirthDate": "19470312",
    "InstitutionName": "Saint Example General Hospital",
    "AccessionNumber": "ACC99887766",
    "StudyDate": "20200401",
    "ReferringPhysicianName": "House^Gregory",
    "StudyDescription": "CHEST PA Jane Doe follow-up",
}
PATIENT_ID = "MRN-00424242"


def ramp(rows: int = 8, cols: int = 16, top: int = 4095) -> np.ndarray:
    """A 12-bit ramp covering 0..top, row-major."""
    values = np.linspace(0, top, rows * cols)
    return np.rint(values).astype(np.uint16).reshape(rows, cols)


def make_dicom(
    path,
    pixels: np.ndarray | None = None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    window: tuple[float, float] | None = None,
    voi_function: str | None = None,
    rescale: tuple[float, float] | None = None,
    voi_lut: np.ndarray | None = None,
    personal: bool = True,
    age: str | None = "045Y",
    view: str | None = "PA",
    patient_id: str | None = PATIENT_ID,
    transfer_syntax: str = ExplicitVRLittleEndian,
    pixel_bytes: bytes | None = None,
):
    """Write a DICOM Part 10 file built with pydicom; returns the path."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.PatientSex = "F"
    if age is not None:
        ds.PatientAge = age
    if view is not None:
        ds.ViewPosition = view
    if personal:
        for keyword, value in PERSONAL.items():
            setattr(ds, keyword, value)
    if pixels is not None or pixel_bytes is not None:
        shape = pixels.shape if pixels is not None else (8, 8)
        ds.Rows, ds.Columns = shape[0], shape[1]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16 if bits_stored > 8 else 8
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        if pixel_bytes is not None:
            ds.PixelData = pixel_bytes
        else:
            dtype = "<u2" if bits_stored > 8 else "u1"
            ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 12]
        item.add(DataElement(0x00283006, "OW", voi_lut.astype("<u2").tobytes()))  # LUTData
        ds.VOILUTSequence = Sequence([item])
    ds.save_as(path, enforce_file_format=True)
    return path


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..255, written out independently."""
    c, w = center - 0.5, width - 1
    out = ((values - c) / w + 0.5) * 255.0
    out = np.where(values <= c - w / 2, 0.0, out)
    out = np.where(values > c + w / 2, 255.0, out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ pixels


def test_12bit_without_window_is_stretched_by_percentiles(tmp_path):
    pixels = ramp(8, 16)
    path = make_dicom(tmp_path / "ramp.dcm", pixels)
    image = read_dicom(path, percentiles=(0, 100))
    assert image.dtype == np.uint8 and image.shape == (8, 16)
    expected = np.rint(pixels / 4095.0 * 255).astype(np.uint8)
    np.testing.assert_array_equal(image, expected)

    default = read_dicom(path)  # (0.5, 99.5): the extreme pixels saturate
    low, high = np.percentile(pixels.astype(float), [0.5, 99.5])
    assert default[0, 0] == 0 and default[-1, -1] == 255
    assert np.all(np.diff(default.ravel().astype(int)) >= 0)  # still monotone
    mid = pixels.ravel()[64]
    assert abs(int(default.ravel()[64]) - (mid - low) / (high - low) * 255) <= 0.5


def test_monochrome1_is_inverted(tmp_path):
    pixels = ramp()
    mono2 = read_dicom(make_dicom(tmp_path / "m2.dcm", pixels, photometric="MONOCHROME2"))
    mono1 = read_dicom(make_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(mono1, 255 - mono2)
    assert mono1[0, 0] == 255  # lowest stored value is white in MONOCHROME1


def test_window_from_the_file_follows_the_dicom_formula(tmp_path):
    pixels = ramp(16, 16)
    path = make_dicom(tmp_path / "w.dcm", pixels, window=(2048, 1024))
    image = read_dicom(path)
    np.testing.assert_array_equal(image, linear_window(pixels.astype(float), 2048, 1024))
    assert image[pixels < 1536].max() == 0 and image[pixels > 2560].min() == 255


def test_window_argument_overrides_the_file_window(tmp_path):
    pixels = ramp(16, 16)
    path = make_dicom(tmp_path / "w.dcm", pixels, window=(2048, 1024))
    image = read_dicom(path, window=(1000, 500))
    np.testing.assert_array_equal(image, linear_window(pixels.astype(float), 1000, 500))


def test_window_is_in_rescaled_units(tmp_path):
    pixels = ramp(16, 16)
    path = make_dicom(tmp_path / "r.dcm", pixels, rescale=(2.0, -1024.0))
    image = read_dicom(path, window=(0.0, 2001.0))
    modality = pixels * 2.0 - 1024.0
    np.testing.assert_array_equal(image, linear_window(modality, 0.0, 2001.0))


def test_sigmoid_window_is_monotone_and_centred(tmp_path):
    pixels = np.array([[0, 1024, 2048, 3072, 4095]], dtype=np.uint16)
    path = make_dicom(tmp_path / "s.dcm", pixels, window=(2048, 1024), voi_function="SIGMOID")
    image = read_dicom(path).ravel().astype(int)
    assert np.all(np.diff(image) > 0)
    assert image[2] in (127, 128)  # the centre maps to half of the output range


def test_voi_lut_sequence_is_applied(tmp_path):
    pixels = ramp(8, 16)
    lut = np.rint(np.sqrt(np.arange(4096) / 4095.0) * 4095).astype(np.uint16)
    path = make_dicom(tmp_path / "lut.dcm", pixels, voi_lut=lut, window=(100, 10))
    image = read_dicom(path)  # the LUT wins over the window (pydicom's prefer_lut)
    expected = np.rint(lut[pixels] / 4095.0 * 255).astype(np.uint8)
    np.testing.assert_array_equal(image, expected)


def test_8bit_monochrome2_keeps_its_values_under_minmax(tmp_path):
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = make_dicom(tmp_path / "8.dcm", pixels, bits_stored=8)
    np.testing.assert_array_equal(read_dicom(path, percentiles=(0, 100)), pixels)


def test_constant_image_without_window_is_black(tmp_path):
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        path = make_dicom(tmp_path / f"flat-{photometric}.dcm", np.full((4, 4), 700, dtype=np.uint16),
                          photometric=photometric)
        image = read_dicom(path)
        assert image.shape == (4, 4) and not image.any()


def test_jpeg_baseline_dicom_is_decoded(tmp_path):
    """RSNA's files are JPEG baseline; pydicom decodes them with Pillow."""
    pixels = (np.add.outer(np.arange(32), np.arange(32)) * 4).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    jpeg = buffer.getvalue()
    path = make_dicom(
        tmp_path / "jpeg.dcm", pixels, bits_stored=8, transfer_syntax=JPEGBaseline8Bit,
        pixel_bytes=encapsulate([jpeg]),
    )
    # rows / columns were set from `pixels`; the encapsulated data decodes to the same size
    image = read_dicom(path, percentiles=(0, 100))
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)))
    lo, hi = decoded.min(), decoded.max()
    expected = np.rint((decoded - float(lo)) * 255.0 / (hi - lo)).astype(np.uint8)
    assert image.shape == (32, 32)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1


def test_read_image_dispatches_dicom(tmp_path):
    pixels = ramp()
    path = make_dicom(tmp_path / "scan.DCM", pixels, window=(2048, 4000))
    expected = read_dicom(path)
    np.testing.assert_array_equal(read_image(path), expected)
    np.testing.assert_array_equal(read_image(path.read_bytes()), expected)
    other = tmp_path / "scan_without_suffix"
    other.write_bytes(path.read_bytes())
    np.testing.assert_array_equal(read_image(other), expected)
    dicom_named = tmp_path / "scan.dicom"
    dicom_named.write_bytes(path.read_bytes())
    np.testing.assert_array_equal(read_image(dicom_named), expected)


# ------------------------------------------------------------------------------ errors


def test_non_dicom_file_is_refused_by_name(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("not an image at all" * 20)
    with pytest.raises(DicomReadError, match="not a DICOM file") as caught:
        read_dicom(path)
    assert "notes.dcm" in str(caught.value)
    with pytest.raises(ImageReadError, match="notes.dcm"):  # read_image says the same
        read_image(path)
    with pytest.raises(DicomReadError, match="no such file"):
        read_dicom(tmp_path / "absent.dcm")


def test_missing_pixel_data_is_refused(tmp_path):
    path = make_dicom(tmp_path / "report.dcm", None)
    with pytest.raises(DicomReadError, match="no pixel data") as caught:
        read_dicom(path)
    assert "report.dcm" in str(caught.value)


def test_compressed_without_decoder_names_the_syntax(tmp_path):
    path = make_dicom(
        tmp_path / "jls.dcm", ramp(), transfer_syntax=JPEGLSLossless,
        pixel_bytes=encapsulate([b"\xff\xd8\xff\xf7 not really JPEG-LS"]),
    )
    with pytest.raises(DicomReadError, match="JPEG-LS") as caught:
        read_dicom(path)
    assert "jls.dcm" in str(caught.value) and "decoder" in str(caught.value)


def test_truncated_pixel_data_is_refused(tmp_path):
    path = make_dicom(tmp_path / "cut.dcm", ramp(8, 8), pixel_bytes=b"\0" * 20)
    with pytest.raises(DicomReadError, match="cut.dcm"):
        read_dicom(path)


def test_colour_and_multiframe_are_refused(tmp_path):
    path = make_dicom(tmp_path / "rgb.dcm", ramp(4, 4))
    ds = __import__("pydicom").dcmread(path)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.save_as(path)
    with pytest.raises(DicomReadError, match="colour DICOM"):
        read_dicom(path)

    path = make_dicom(tmp_path / "cine.dcm", ramp(4, 4))
    ds = __import__("pydicom").dcmread(path)
    ds.NumberOfFrames = 2
    ds.save_as(path)
    with pytest.raises(DicomReadError, match="multi-frame"):
        read_dicom(path)


def test_bad_arguments_are_value_errors(tmp_path):
    path = make_dicom(tmp_path / "a.dcm", ramp())
    with pytest.raises(ValueError, match="window"):
        read_dicom(path, window=(100, 0))
    with pytest.raises(ValueError, match="percentiles"):
        read_dicom(path, percentiles=(90, 10))


# ------------------------------------------------------------------------------ records


def test_record_keeps_only_safe_fields(tmp_path):
    path = make_dicom(tmp_path / "a.dcm", ramp(6, 10))
    record = dicom_record(path, salt="s3cret")
    assert tuple(record) == RECORD_FIELDS
    assert record["view"] == "PA" and record["sex"] == "F" and record["age_years"] == 45
    assert record["modality"] == "CR" and record["photometric_interpretation"] == "MONOCHROME2"
    assert (record["rows"], record["columns"], record["bits_stored"]) == (6, 10, 12)
    assert record["patient_id"] == hash_patient_id(PATIENT_ID, salt="s3cret")


def test_no_personal_value_reaches_the_record_or_a_manifest(tmp_path):
    import pydicom

    paths = [make_dicom(tmp_path / f"{i}.dcm", ramp(4, 4)) for i in range(2)]
    records = [dicom_record(p, salt="pepper") for p in paths]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(records).to_csv(manifest, index=False)
    text = manifest.read_text() + repr(records)
    ds = pydicom.dcmread(paths[0])
    secrets = [*PERSONAL.values(), PATIENT_ID, "Doe", "Jane", "1947", "Example",
               str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
               hashlib.sha256(PATIENT_ID.encode()).hexdigest()[:16]]
    for secret in secrets:
        assert secret.lower() not in text.lower(), secret


def test_hash_depends_on_id_and_salt():
    a1 = hash_patient_id("patient-1", salt="alpha")
    assert a1 == hash_patient_id("patient-1", salt="alpha")
    assert a1 == hash_patient_id(" patient-1 ", salt=b"alpha")  # DICOM pads values
    assert a1 != hash_patient_id("patient-1", salt="beta")
    assert a1 != hash_patient_id("patient-2", salt="alpha")
    assert len(a1) == dicom.HASH_CHARS and int(a1, 16) >= 0
    assert a1 not in hashlib.sha256(b"patient-1").hexdigest()  # not a bare hash


def test_salt_is_required(tmp_path):
    path = make_dicom(tmp_path / "a.dcm", ramp(4, 4))
    for salt in ("", "   ", b""):
        with pytest.raises(ValueError, match="salt"):
            dicom_record(path, salt=salt)
    with pytest.raises(TypeError):
        dicom_record(path)  # keyword-only and no default


def test_missing_fields_are_none(tmp_path):
    path = make_dicom(
        tmp_path / "bare.dcm", ramp(4, 4), personal=False, age=None, view=None, patient_id=None
    )
    record = dicom_record(path, salt="x")
    assert record["patient_id"] is None and record["view"] is None and record["age_years"] is None


def test_record_of_a_non_dicom_file_names_it(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    with pytest.raises(DicomReadError, match="x.png"):
        dicom_record(path, salt="x")


@pytest.mark.parametrize(
    ("raw", "years"),
    [("045Y", 45), ("45", 45), ("006M", 0), ("018M", 1), ("010D", 0), ("104W", 1),
     ("095Y", 90), ("120Y", 90), ("", None), ("abc", None), (None, None)],
)
def test_parse_age(raw, years):
    assert parse_age(raw) == years


def test_default_salt_from_env_or_a_created_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.delenv(dicom.SALT_ENV, raising=False)
    first = dicom.default_salt()
    assert len(first) == 64 and (tmp_path / ".id_salt").exists()
    assert dicom.default_salt() == first
    monkeypatch.setenv(dicom.SALT_ENV, "from-env")
    assert dicom.default_salt() == "from-env"


# ------------------------------------------------------------------------------ RSNA adapter

RSNA_LABELS = """patientId,x,y,width,height,Target
img-a,264.0,152.0,213.0,379.0,1
img-a,562.0,152.0,256.0,453.0,1
img-b,,,,,0
img-c,,,,,0
img-missing,,,,,0
img-bad,,,,,1
"""
RSNA_CLASSES = """patientId,class
img-a,Lung Opacity
img-a,Lung Opacity
img-b,Normal
img-c,No Lung Opacity / Not Normal
img-missing,Normal
img-bad,Lung Opacity
"""


def make_rsna(root):
    """A four-image RSNA-layout folder; PatientID = patientId, as in the released files."""
    images = root / "stage_2_train_images"
    images.mkdir(parents=True)
    for image_id, view, age in (("img-a", "AP", "58"), ("img-b", "PA", "034Y"), ("img-c", "PA", "151"),
                                ("img-bad", "PA", "40")):
        make_dicom(images / f"{image_id}.dcm", np.full((8, 8), 100, np.uint8), bits_stored=8,
                   patient_id=image_id, view=view, age=age)
    (root / "stage_2_train_labels.csv").write_text(RSNA_LABELS)
    (root / "stage_2_detailed_class_info.csv").write_text(RSNA_CLASSES)
    return root


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")  # bare ages, written as RSNA does
def test_rsna_adapter_reads_labels_boxes_and_headers(tmp_path):
    from cxrlib.data.sources import open_dataset

    root = make_rsna(tmp_path / "rsna")
    adapter = open_dataset("rsna-pneumonia", root, salt="rsna-test-salt")
    with pytest.warns(UserWarning, match="skipped 2"):
        manifest = adapter.manifest()
    by_id = manifest.set_index("image_id")
    assert list(by_id.index) == ["img-a", "img-b", "img-c"]
    assert dict(by_id["label"]) == {"img-a": "pneumonia", "img-b": "normal", "img-c": "other"}
    assert by_id.loc["img-a", "n_boxes"] == "2"
    assert json.loads(by_id.loc["img-a", "boxes"]) == [[264.0, 152.0, 213.0, 379.0], [562.0, 152.0, 256.0, 453.0]]
    assert by_id.loc["img-b", "boxes"] == "[]"
    assert dict(by_id["view"]) == {"img-a": "AP", "img-b": "PA", "img-c": "PA"}
    assert dict(by_id["age"]) == {"img-a": "58", "img-b": "34", "img-c": "90"}  # 151 capped
    assert by_id.loc["img-a", "patient_id"] == "rsna-pneumonia:" + hash_patient_id("img-a", salt="rsna-test-salt")
    assert by_id.loc["img-a", "path"] == str(root.resolve() / "stage_2_train_images" / "img-a.dcm")
    reasons = {item.row: item.reason for item in adapter.skipped}
    assert reasons["img-missing"] == "DICOM file not found" and "invalid box" in reasons["line 7"]
    image = read_image(root / by_id.loc["img-a", "path"])
    assert image.shape == (8, 8) and image.dtype == np.uint8

    csv = tmp_path / "manifest.csv"
    manifest.to_csv(csv, index=False)
    text = csv.read_text().lower()
    for secret in PERSONAL.values():
        assert secret.lower() not in text


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
def test_rsna_adapter_errors(tmp_path):
    from cxrlib.data.sources import open_dataset

    with pytest.raises(FileNotFoundError, match="stage_2_train_labels.csv"):
        open_dataset("rsna-pneumonia", tmp_path, salt="x")
    root = make_rsna(tmp_path / "rsna")
    with pytest.raises(ValueError, match="salt"):
        open_dataset("rsna-pneumonia", root, salt="")
    (root / "stage_2_detailed_class_info.csv").write_text("patientId,label\nimg-a,Normal\n")
    with pytest.raises(ValueError, match="lacks column"):
        open_dataset("rsna-pneumonia", root, salt="x").manifest()
