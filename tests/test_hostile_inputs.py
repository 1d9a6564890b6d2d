"""Hostile and broken inputs, each built here: degenerate images, decompression bombs,
truncated DICOM, unreadable files across steps, bad command lines, huge headers, recipe roots
that climb out, the salt file's mode."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import tarfile
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib.__main__ import main
from cxrlib.data import cohort, dedup
from cxrlib.data import download as dl
from cxrlib.data import io as cio
from cxrlib.data import manifest as mf
from cxrlib.data.dicom import DicomReadError, default_salt, dicom_record, read_dicom
from cxrlib.data.download import ArchiveError, ArchiveLimitError, ExtractLimits, safe_extract
from cxrlib.data.io import ImageReadError, LoadReport, image_problem, read_image
from cxrlib.data.recipes import RecipeError, recipe_from_dict
from cxrlib.errors import CxrInputError

RNG = np.random.default_rng(16)


def noise_png(path: Path, size: int = 64, seed: int = 0) -> Path:
    """A textured 8-bit grayscale PNG: what a fine image looks like to the checks."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_cohort_folder(folder: Path, n_patients: int = 12) -> pd.DataFrame:
    """A manifest of ``n_patients`` fine images plus a 1 x 1 image and a constant one."""
    rows = []
    for index in range(n_patients):
        name = f"img{index:02d}"
        noise_png(folder / "images" / f"{name}.png", seed=index)
        rows.append((name, f"images/{name}.png", ("normal", "covid")[index % 2], f"p{index:02d}"))
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(folder / "images" / "tiny.png")
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(folder / "images" / "blank.png")
    rows += [("tiny", "images/tiny.png", "normal", "p90"), ("blank", "images/blank.png", "covid", "p91")]
    table = pd.DataFrame(rows, columns=["image_id", "path", "label", "patient_id"])
    table = table.assign(source="test", view="PA", split="", mask_path="", origin="real")
    table.to_csv(folder / "manifest.csv", index=False)
    return mf.read_manifest(folder / "manifest.csv")


# ------------------------------------------------------------------- 1. degenerate images


@pytest.mark.parametrize(
    ("pixels", "words"),
    [
        (np.full((1, 1), 7, np.uint8), "1 x 1 pixels"),
        (np.full((16, 300), 7, np.uint8), "300 x 16 pixels, below the minimum side of 32"),
        (np.full((64, 64), 255, np.uint8), "near-constant"),
        (np.where(RNG.random((64, 64)) < 0.01, 101, 100).astype(np.uint8), "near-constant"),
    ],
)
def test_degenerate_images_are_flagged_with_a_reason(pixels, words):
    assert words in image_problem(pixels)


def test_fine_and_mostly_dark_images_pass():
    assert image_problem(RNG.integers(0, 256, (64, 64), dtype=np.uint8)) is None
    film = np.zeros((64, 64), np.uint8)
    film[20:40, 20:40] = 180  # dark film with something on it
    assert image_problem(film) is None


def test_assemble_keeps_degenerate_images_out_and_lists_them(tmp_path):
    df = write_cohort_folder(tmp_path / "c")
    split, report = cohort.assemble(df, seed=0)
    assert not {"tiny", "blank"} & set(split["image_id"])
    assert len(split) == 12
    reasons = dict(zip(report.dropped["image_id"], report.dropped["reason"], strict=True))
    assert "below the minimum side" in reasons["tiny"] and "near-constant" in reasons["blank"]
    metrics = report.metrics()
    assert metrics["n_dropped"] == 2 and len(metrics["dropped_files"]) == 2
    json.dumps(metrics)  # plain JSON
    written = pd.read_csv(report.write_csv(tmp_path / "excluded.csv"), keep_default_na=False)
    assert list(written.columns) == ["path", "step", "status", "reason"]
    assert sorted(written["status"]) == ["dropped", "dropped"]


def test_materialize_drops_a_tiny_image_before_resizing_it(tmp_path):
    df = write_cohort_folder(tmp_path / "c", n_patients=2)
    written, report = cohort.materialize(df, tmp_path / "out", 64)
    assert set(written["image_id"]) == {"img00", "img01"}
    dropped = {Path(item.path).name: item.error for item in report.dropped}
    assert set(dropped) == {"tiny.png", "blank.png"} and report.n_bad == 0
    assert not list((tmp_path / "out").rglob("tiny*")) and "2 dropped" in str(report)


# ---------------------------------------------------------------- 2. archive extraction


def zeros_zip(path: Path, megabytes: int = 64) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("set/zeros.bin", bytes(megabytes << 20))
    return path


def zeros_tar_gz(path: Path, megabytes: int = 64) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("set/zeros.bin")
        info.size = megabytes << 20
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("make", [zeros_zip, zeros_tar_gz])
def test_decompression_bomb_is_refused_while_writing(tmp_path, make):
    archive = make(tmp_path / ("bomb.zip" if make is zeros_zip else "bomb.tar.gz"))
    assert archive.stat().st_size < 200_000  # 64 MiB of zeros in under 200 KB
    with pytest.raises(ArchiveLimitError, match="decompression bomb") as caught:
        safe_extract(archive, tmp_path / "out")
    message = str(caught.value)
    assert str(archive) in message and "max_ratio" in message and "\n" not in message
    assert leftovers(tmp_path) == [archive.name]  # no target, no half-unpacked staging folder


def test_unpacked_total_is_bounded(tmp_path):
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as handle:  # incompressible: ratio 1, only the total is large
        for index in range(4):
            handle.writestr(f"part{index}.bin", RNG.bytes(300_000))
    with pytest.raises(ArchiveLimitError, match="max_total_bytes"):
        safe_extract(archive, tmp_path / "out", limits=ExtractLimits(max_total_bytes=1_000_000))
    assert safe_extract(archive, tmp_path / "ok", limits=ExtractLimits(max_total_bytes=1_200_000)).is_dir()


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_member_count_is_bounded_before_writing(tmp_path, fmt):
    archive = tmp_path / f"many.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(archive, "w") as handle:
            for index in range(30):
                handle.writestr(f"f{index}.txt", b"x")
    else:
        with tarfile.open(archive, "w") as handle:
            for index in range(30):
                info = tarfile.TarInfo(f"f{index}.txt")
                info.size = 1
                handle.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ArchiveLimitError, match="more than 20 members"):
        safe_extract(archive, tmp_path / "out", limits=ExtractLimits(max_members=20))
    assert leftovers(tmp_path) == [archive.name]


def test_sizes_that_lie_do_not_get_past_the_count(tmp_path):
    """The central directory claims 64 MiB of compressed data, so the declared ratio is 1:1;
    what is written is counted against the archive's real size instead."""
    data = bytearray(zeros_zip(tmp_path / "honest.zip").read_bytes())
    central, local = data.rfind(b"PK\x01\x02"), data.find(b"PK\x03\x04")
    struct.pack_into("<I", data, central + 20, 64 << 20)
    struct.pack_into("<I", data, local + 18, 64 << 20)
    liar = tmp_path / "liar.zip"
    liar.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="liar.zip"):
        safe_extract(liar, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Zeros(io.RawIOBase):
    """A stream of ``size`` zero bytes, made as it is read (what a lying member inflates to)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


@pytest.mark.parametrize(
    ("declared", "compressed", "words"),
    [(1000, None, "writes more than its declared 1000 bytes"),
     (None, 50_000, "expands more than 200:1"),
     (None, None, "past 200:1")],  # against the archive file's own size
)
def test_bytes_are_counted_as_they_are_written(tmp_path, declared, compressed, words):
    """The count does not trust headers: whatever a decoder yields is counted chunk by chunk,
    and writing stops at the first chunk past a limit (never the whole 1 GiB)."""
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"x" * 60_000)
    budget = dl._Budget(archive, tmp_path, dl.ExtractLimits())
    target = tmp_path / "out" / "member.bin"
    with pytest.raises(ArchiveLimitError, match=words.replace("(", r"\(")):
        dl._write_counted(_Zeros(1 << 30), target, budget, "member.bin", declared=declared,
                          compressed=compressed)
    assert target.stat().st_size <= dl.ExtractLimits().ratio_floor_bytes + dl.CHUNK_SIZE


def test_offline_download_of_a_bomb_is_refused_with_exit_2(tmp_path, monkeypatch, capsys):
    zeros_zip(tmp_path / "set.zip")
    item = dl.RemoteFile(url="http://127.0.0.1:9/set.zip", filename="set.zip", unpacks_to="ds")
    monkeypatch.setitem(dl.SOURCES, "bombset", dl.DirectSource(
        name="bombset", title="t", files=(item,), homepage="http://example.invalid", size="s",
        license="l", citation="c"))
    with pytest.raises(ArchiveLimitError, match="set.zip"):
        dl.download("bombset", tmp_path, sources={"bombset": dl.SOURCES["bombset"]}, progress=False)
    assert main(["data", "download", "bombset", "--to", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "decompression bomb" in err and "set.zip" in err
    assert not (tmp_path / "ds").exists() and not (tmp_path / "bombset.download.json").exists()


# ---------------------------------------------------------------------- 3. truncated DICOM


def small_dicom(pixels: np.ndarray, window: tuple[float, float] | None = None) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.ViewPosition = "CR", "MRN-1", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.1, 0.02])
def test_dicom_record_refuses_a_truncated_file_as_read_dicom_does(tmp_path, keep):
    data = small_dicom(RNG.integers(0, 4096, (64, 64)))
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DicomReadError, match="cut.dcm"):
        read_dicom(path)
    with pytest.raises(DicomReadError, match="cut.dcm") as caught:
        dicom_record(path, salt="s")
    assert "truncated" in caught.value.reason or "no pixel data" in caught.value.reason
    whole = tmp_path / "whole.dcm"
    whole.write_bytes(data)
    assert dicom_record(whole, salt="s")["view"] == "PA"
    assert dicom_record(io.BytesIO(data), salt="s")["rows"] == 64


# ----------------------------------------------------------- 4. unreadable files, counted


def test_every_unreadable_file_is_counted_and_saved(tmp_path):
    """Notebook 01's real-data chain: decode + hash, deduplicate, resize, assemble. Files that
    fail at any step end in one report, its metrics and its CSV."""
    folder = tmp_path / "raw"
    df = write_cohort_folder(folder)
    broken = ["images/img00.png", "images/img01.png", "images/img02.png"]
    for value in broken:
        (folder / value).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "images" / "img03.png").write_bytes(b"")
    hashed, hash_report = dedup.hash_images(df)
    deduped, _ = dedup.deduplicate(hashed[hashed["content_hash"] != ""])
    resized, resize_report = cohort.materialize(deduped, tmp_path / "run", 64)
    manifest, report = cohort.assemble(
        resized, seed=0, earlier={"decoding": hash_report, "resizing": resize_report})
    metrics = report.metrics()
    assert metrics["n_unreadable"] == 4 == hash_report.n_bad
    assert metrics["n_unreadable_by_step"] == {"decoding": 4}
    assert metrics["n_dropped"] == 2 and metrics["n_dropped_by_step"] == {"resizing": 2}
    assert len(manifest) == 12 - 4
    table = pd.read_csv(report.write_csv(tmp_path / "run" / "excluded.csv"), keep_default_na=False)
    assert len(table) == 6 and set(table["status"]) == {"unreadable", "dropped"}
    assert all(table["reason"].str.len() > 0)
    assert {Path(p).name for p in table["path"]} >= {"img00.png", "img03.png", "tiny.png", "blank.png"}


def test_load_report_writes_its_csv_atomically(tmp_path, monkeypatch):
    report = LoadReport(n_ok=1, bad=[cio.BadFile("a.png", "truncated")], step="decoding")
    target = tmp_path / "bad.csv"
    target.write_text("old\n")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", fail)
    with pytest.raises(OSError, match="disk full"):
        report.write_csv(target)
    assert target.read_text() == "old\n" and leftovers(tmp_path) == ["bad.csv"]
    monkeypatch.undo()
    assert report.write_csv(target).read_text() == "path,step,status,reason\na.png,decoding,unreadable,truncated\n"


# ---------------------------------------------------------------------- 5. command line


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--patients", "-1"], "n_patients must be >= 0"),
        (["--size", "7"], "size must lie in [32, 4096]"),
        (["--size", "0"], "size must lie in"),
        (["--size", "100000"], "size must lie in"),
        (["--site-label-correlation", "2"], "site_label_correlation must lie in [0, 1]"),
        (["--seed", "-3"], "seed must be >= 0"),
    ],
)
def test_bad_phantom_arguments_end_in_one_line_and_write_nothing(tmp_path, capsys, args, words):
    out = tmp_path / "cohort"
    assert main(["phantom", "--out", str(out), "--quiet", *args]) == 2
    captured = capsys.readouterr()
    assert words in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err and captured.out == ""
    assert leftovers(tmp_path) == []


def test_phantom_out_naming_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    assert main(["phantom", "--out", str(target), "--patients", "1", "--size", "32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "exists and is not a folder" in err and str(target) in err and len(err.strip().splitlines()) == 1
    assert target.read_text() == "keep me" and leftovers(tmp_path) == ["taken.txt"]


def test_phantom_out_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken.txt").write_text("keep me")
    out = tmp_path / "taken.txt" / "cohort"
    assert main(["phantom", "--out", str(out), "--patients", "1", "--size", "32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "taken.txt" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert leftovers(tmp_path) == ["taken.txt"]


@pytest.mark.parametrize("option", ["--profile", "--dataset"])
def test_pipeline_value_errors_end_in_one_line(tmp_path, capsys, monkeypatch, option):
    import cxrlib.pipeline

    def refuse(**kwargs):
        raise ValueError(f"unknown {option[2:]} 'nosuch'; known: a, b\n(see README)")

    monkeypatch.setattr(cxrlib.pipeline, "run_pipeline", refuse)
    assert main(["pipeline", option, "nosuch", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"unknown {option[2:]} 'nosuch'" in err and "(see README)" in err


@pytest.mark.parametrize(("option", "words"), [("--profile", "unknown profile 'nosuch'"),
                                                ("--dataset", "unknown dataset 'nosuch'")])
def test_pipeline_refuses_unknown_names_before_anything_runs(tmp_path, capsys, option, words):
    run_dir = tmp_path / "run"
    assert main(["pipeline", option, "nosuch", "--run-dir", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not run_dir.exists()


def test_a_traceback_is_there_when_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_TRACEBACK", "1")
    with pytest.raises(ValueError, match="n_patients"):
        main(["phantom", "--out", str(tmp_path / "x"), "--patients", "-1"])


# ------------------------------------------------------------------ 6. pixel limit, memory


def png_header_only(width: int, height: int, bit_depth: int = 16) -> bytes:
    """A PNG signature and IHDR claiming ``width`` x ``height`` grayscale, then garbage."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))


@pytest.mark.parametrize(("width", "height"), [(10_000, 10_000), (8_000, 7_000), (20_000, 12_000)])
def test_too_many_pixels_are_refused_from_the_header(tmp_path, width, height):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(width, height))
    with pytest.raises(ImageReadError, match="above the limit of 50 megapixels") as caught:
        read_image(path)
    assert "huge.png" in str(caught.value) and "before decoding" in caught.value.reason


def test_pixel_limit_is_a_parameter(tmp_path):
    path = noise_png(tmp_path / "a.png", size=64)
    assert read_image(path).shape == (64, 64)
    with pytest.raises(ImageReadError, match="64 x 64"):
        read_image(path, max_pixels=4000)


def test_dicom_header_over_the_pixel_limit_is_refused(tmp_path):
    path = tmp_path / "big.dcm"
    path.write_bytes(small_dicom(RNG.integers(0, 4096, (64, 64))))
    with pytest.raises(DicomReadError, match="megapixels"):
        read_dicom(path, max_pixels=1000)
    with pytest.raises(ImageReadError, match="megapixels"):
        read_image(path, max_pixels=1000)


def test_16_bit_scaling_takes_no_float64_copy_of_the_image(tmp_path):
    pixels = RNG.integers(0, 65536, (2000, 2000), dtype=np.uint16)  # 8 MB as uint16
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    tracemalloc.start()
    try:
        image = read_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a float64 copy alone is 32 MB; the image, its uint8 result and one block stay under 24 MB
    assert peak < 24e6, f"peak {peak / 1e6:.1f} MB"
    low, high = int(pixels.min()), int(pixels.max())
    expected = np.clip(np.rint((pixels.astype(np.float64) - low) * (255.0 / (high - low))), 0, 255)
    np.testing.assert_array_equal(image, expected.astype(np.uint8))


@pytest.mark.parametrize("window", [None, (2048.0, 3000.0)])
def test_dicom_display_scaling_is_memory_bounded(window):
    """4 megapixels of 12-bit DICOM: the whole-image float64 temporaries took 176-177 MB; the
    block-wise scaling stays well under 35 bytes per pixel."""
    data = small_dicom(RNG.integers(0, 4096, (2000, 2000)), window=window)
    tracemalloc.start()
    try:
        image = read_dicom(io.BytesIO(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.shape == (2000, 2000) and peak < 140e6, f"peak {peak / 1e6:.0f} MB"


def test_blockwise_scaling_matches_the_whole_image_formula():
    values = RNG.normal(0.3, 0.2, (3000, 700)).astype(np.float32)
    values[5, 5], values[2999, 0], values[100, 100] = np.nan, np.inf, -np.inf
    for normalize in ("minmax", "dtype"):
        got = cio._high_depth_to_uint8(values, "F", normalize)
        reference = values.astype(np.float64)
        finite = np.isfinite(reference)
        reference[~finite] = reference[finite].min()
        low, high = (reference.min(), reference.max()) if normalize == "minmax" else (0.0, 1.0)
        want = np.clip(np.rint((reference - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ 7. recipe roots, 8. salt


@pytest.mark.parametrize("root", ["..", "../elsewhere", "data/../../etc", "a\\..\\..\\b"])
def test_recipe_root_climbing_out_is_refused(root):
    recipe = {"name": "r", "sources": {"s": {"adapter": "nih-cxr14", "root": root}},
              "classes": {"normal": [{"source": "s", "label": "normal"}]}}
    with pytest.raises(RecipeError, match=r"may not contain '\.\.'") as caught:
        recipe_from_dict(recipe)
    assert "\n" not in str(caught.value) and isinstance(caught.value, CxrInputError)


def test_salt_file_is_born_private(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CXR_ID_SALT", raising=False)
    old_umask = os.umask(0)  # even a permissive umask must not widen it
    try:
        salt = default_salt()
    finally:
        os.umask(old_umask)
    path = tmp_path / "data" / ".id_salt"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(salt) == 64 and default_salt() == salt
    assert leftovers(tmp_path / "data") == [".id_salt"]  # no temporary file left


def test_error_types_share_one_base():
    for error in (ImageReadError, DicomReadError, RecipeError, ArchiveError, ArchiveLimitError,
                  dl.UnsafeArchiveError):
        assert issubclass(error, CxrInputError) and issubclass(error, ValueError)
    assert issubclass(ImageReadError, OSError) and issubclass(ArchiveError, dl.DownloadError)
