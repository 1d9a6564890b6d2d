"""Property-based fuzzing of everything that reads untrusted input.

Random bytes and mutated valid files (PNG, JPEG, 16-bit PNG, DICOM, zip, tar, tar.gz, CSV
manifests, YAML recipes) go to the image readers, the DICOM record reader, the archive
extractor and the manifest and recipe loaders. Each call either succeeds or raises the
project's own :class:`cxrlib.errors.CxrInputError` (never a bare ``KeyError``, ``struct.error``,
``zlib.error``, ...), returns within :data:`SECONDS_PER_CALL` and, where memory is measured,
allocates less than :data:`PEAK_BYTES`.

Size: ``CXR_FUZZ_EXAMPLES`` examples per test (default 100, which keeps this file to about
ten to twenty seconds on two CPU cores); the default run is derandomized, so it tests the
same inputs every time. For a deeper on-demand run, e.g.
``CXR_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz_inputs.py``: more examples, drawn
at random.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxrlib.data.dicom import dicom_record, read_dicom
from cxrlib.data.download import safe_extract
from cxrlib.data.io import image_problem, read_image
from cxrlib.data.manifest import read_manifest
from cxrlib.data.recipes import load_recipe
from cxrlib.errors import CxrInputError

# broken files make Pillow and pydicom warn (corrupt EXIF, invalid VR); the warnings are expected
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXAMPLES = int(os.environ.get("CXR_FUZZ_EXAMPLES", "100"))
#: Wall-clock bound of one call on a slow, shared machine (a bomb or a hang takes far longer).
SECONDS_PER_CALL = 10.0
#: Bound on what one call allocates (Python and NumPy allocations, as tracemalloc sees them).
PEAK_BYTES = 256 * 1024**2

FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize="CXR_FUZZ_EXAMPLES" not in os.environ,
    deadline=None,  # timing is asserted per call below, with a bound a loaded machine meets
    database=None,  # write nothing into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def bounded(call, *args, measure_memory: bool = False, **kwargs):
    """Run ``call``; only a :class:`CxrInputError` may escape; time (and memory) bounded."""
    if measure_memory:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        return call(*args, **kwargs)
    except CxrInputError as error:
        assert str(error).strip(), "an error must say what is wrong"
        return error
    finally:
        elapsed = time.perf_counter() - start
        if measure_memory:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak < PEAK_BYTES, f"{call.__name__} allocated {peak / 1e6:.0f} MB"
        assert elapsed < SECONDS_PER_CALL, f"{call.__name__} took {elapsed:.1f} s"


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """``seed`` with a few random edits: byte flips, overwritten runs, inserts, cuts."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            patch = draw(st.binary(min_size=1, max_size=16))
            data[at:at + len(patch)] = patch
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


# ------------------------------------------------------------------------ seed files


def _encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


_RNG = np.random.default_rng(9)
_GRAY = _RNG.integers(0, 256, (40, 48), dtype=np.uint8)
PNG = _encoded(_GRAY, "PNG")
PNG16 = _encoded(_RNG.integers(0, 65536, (40, 48), dtype=np.uint16), "PNG")
JPEG = _encoded(np.stack([_GRAY] * 3, axis=-1), "JPEG", quality=80)
GIF = _encoded(_GRAY, "GIF")
TIFF = _encoded(_GRAY, "TIFF")


def _dicom() -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("f.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid(entropy_srcs=["f"])
    ds.Modality, ds.PatientID, ds.PatientAge, ds.ViewPosition = "CR", "MRN-7", "045Y", "PA"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 24, 32, 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4000
    ds.PixelData = _RNG.integers(0, 4096, (24, 32)).astype("<u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


DICOM = _dicom()


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("set/readme.txt", b"chest x-rays\n" * 20)
        archive.writestr("set/images/a.png", PNG)
        archive.writestr("set/sub/", b"")
    return buffer.getvalue()


def _tar(mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in (("set/readme.txt", b"chest x-rays\n" * 20), ("set/images/a.png", PNG)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("set/latest.png")
        link.type, link.linkname = tarfile.SYMTYPE, "images/a.png"
        archive.addfile(link)
    return buffer.getvalue()


ARCHIVES = {"zip": _zip(), "tar": _tar("w"), "tar.gz": _tar("w:gz")}

MANIFEST = (
    b"image_id,path,label,patient_id,source,view,split,mask_path,origin\n"
    b"a,images/a.png,normal,p1,test,PA,,,real\n"
    b"b,images/b.png,covid,p2,test,AP,train,,real\n"
)

RECIPE = b"""name: fuzzed
seed: 0
sources:
  nih: {adapter: nih-cxr14, root: nih-cxr14-sample}
  cc: {adapter: ieee8023, root: covid-chestxray}
classes:
  covid:
    - source: cc
      label: covid
      view: [PA, AP]
  normal:
    - source: nih
      finding: {equals: No Finding}
caps: {normal: 50}
"""


# ------------------------------------------------------------------------ image readers


def check_image_result(result) -> None:
    if not isinstance(result, CxrInputError):
        assert result.dtype == np.uint8 and result.ndim == 2 and result.size > 0
        image_problem(result)  # the degenerate-image check takes whatever a reader returns


@FUZZ
@given(st.binary(max_size=4096))
def test_image_reader_on_random_bytes(data):
    check_image_result(bounded(read_image, data, measure_memory=True))


@FUZZ
@given(st.sampled_from([PNG, PNG16, JPEG, GIF, TIFF]).flatmap(mutated))
def test_image_reader_on_mutated_images(data):
    check_image_result(bounded(read_image, data, measure_memory=True))
    check_image_result(bounded(read_image, data, normalize="dtype"))


@FUZZ
@given(mutated(DICOM))
def test_dicom_readers_on_mutated_files(data):
    check_image_result(bounded(read_dicom, io.BytesIO(data), measure_memory=True))
    check_image_result(bounded(read_image, data))
    record = bounded(dicom_record, io.BytesIO(data), salt="fuzz")
    if not isinstance(record, CxrInputError):
        assert isinstance(record, dict) and record["rows"] and record["columns"]


def test_the_seed_files_are_valid():
    """The mutations start from files every reader accepts."""
    for data in (PNG, PNG16, JPEG, GIF, TIFF, DICOM):
        assert read_image(data).shape in ((40, 48), (24, 32))
    assert dicom_record(io.BytesIO(DICOM), salt="fuzz")["view"] == "PA"


# ---------------------------------------------------------------------------- archives


def _extract(data: bytes, fmt: str):
    with tempfile.TemporaryDirectory() as folder:
        archive = Path(folder) / f"fuzzed.{fmt}"
        archive.write_bytes(data)
        result = bounded(safe_extract, archive, Path(folder) / "out", fmt=fmt)
        outside = {p.name for p in Path(folder).iterdir()} - {archive.name, "out"}
        assert not outside, f"left behind: {outside}"  # no staging folder survives
        if isinstance(result, CxrInputError):
            assert not (Path(folder) / "out").exists()  # refused: nothing in place
            assert str(archive) in str(result) or archive.name in str(result)
        else:
            for path in result.rglob("*"):  # nothing points outside the target
                assert Path(os.path.realpath(path)).is_relative_to(Path(folder).resolve() / "out")


@FUZZ
@given(st.sampled_from(sorted(ARCHIVES)).flatmap(lambda fmt: st.tuples(st.just(fmt), mutated(ARCHIVES[fmt]))))
def test_extractor_on_mutated_archives(fmt_and_data):
    fmt, data = fmt_and_data
    _extract(data, fmt)


@FUZZ
@given(st.sampled_from(sorted(ARCHIVES)), st.binary(max_size=2048))
def test_extractor_on_random_bytes(fmt, data):
    _extract(data, fmt)


def test_the_seed_archives_unpack(tmp_path):
    for fmt, data in ARCHIVES.items():
        archive = tmp_path / f"seed.{fmt}"
        archive.write_bytes(data)
        assert (safe_extract(archive, tmp_path / fmt, fmt=fmt) / "images" / "a.png").read_bytes() == PNG


# ------------------------------------------------------------------- manifests, recipes


def _load(loader, data: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzzed{suffix}"
        path.write_bytes(data)
        return bounded(loader, path)


@FUZZ
@given(st.one_of(mutated(MANIFEST), st.binary(max_size=1024),
                 st.text(alphabet=st.sampled_from(list(',\n"\r\tab01 .:/\\\x00é')), max_size=300)
                 .map(lambda text: text.encode())))
def test_manifest_reader_on_broken_csv(data):
    result = _load(read_manifest, data, ".csv")
    if not isinstance(result, CxrInputError):
        assert {"image_id", "path", "label", "patient_id"} <= set(result.columns)


@FUZZ
@given(st.one_of(mutated(RECIPE), st.binary(max_size=1024),
                 st.text(alphabet=st.sampled_from(list(":-[]{}\n &*!|>'\"#abc01.")), max_size=300)
                 .map(lambda text: text.encode())))
def test_recipe_loader_on_broken_yaml(data):
    result = _load(load_recipe, data, ".yaml")
    if not isinstance(result, CxrInputError):
        assert result.sources and result.classes


def test_the_seed_manifest_and_recipe_load(tmp_path):
    (tmp_path / "m.csv").write_bytes(MANIFEST)
    (tmp_path / "r.yaml").write_bytes(RECIPE)
    assert len(read_manifest(tmp_path / "m.csv")) == 2
    assert set(load_recipe(tmp_path / "r.yaml").classes) == {"covid", "normal"}


@pytest.mark.parametrize("payload", [b"a: &a [*a, *a]\n", b"[" * 5000, b"x: " + b"[" * 200 + b"]" * 200])
def test_recipe_loader_on_yaml_traps(tmp_path, payload):
    """Alias loops, deep nesting: refused (or read) quickly, not a RecursionError."""
    path = tmp_path / "trap.yaml"
    path.write_bytes(payload)
    bounded(load_recipe, path)


def test_unknown_transfer_syntax_is_refused():
    """Found by the fuzzer: a file naming a UID that is no transfer syntax made pydicom raise
    a bare ValueError while the reader built its error message."""
    data = DICOM.replace(b"1.2.840.10008.1.2.1\x00", b"0.2.840.10008.1.2.1\x00", 1)
    for call in (lambda: read_dicom(io.BytesIO(data)), lambda: read_image(data),
                 lambda: dicom_record(io.BytesIO(data), salt="fuzz")):
        with pytest.raises(CxrInputError, match="unknown transfer syntax"):
            call()


def test_garbled_header_element_is_refused():
    """Found by the fuzzer: an element with an unknown VR ('TS' for BitsStored) made pydicom
    raise NotImplementedError when the record read it."""
    tag = b"\x28\x00\x01\x01US"  # (0028,0101) BitsStored, explicit VR little endian
    assert DICOM.count(tag) == 1
    data = DICOM.replace(tag, b"\x28\x00\x01\x01TS")
    for call in (lambda: read_dicom(io.BytesIO(data)), lambda: read_image(data),
                 lambda: dicom_record(io.BytesIO(data), salt="fuzz")):
        result = bounded(call)
        assert isinstance(result, CxrInputError) or result is not None
    with pytest.raises(CxrInputError, match="garbled DICOM header element"):
        dicom_record(io.BytesIO(data), salt="fuzz")
