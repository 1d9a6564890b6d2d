"""DICOM chest X-rays: pixels for display, and the few header fields that are safe to keep.

Hospitals and several public collections (RSNA Pneumonia, Montgomery, MIMIC-CXR, ...)
ship DICOM, not PNG. A DICOM file stores detector values, not grey levels: turning them
into the ``(H, W)`` ``uint8`` image the rest of the project uses takes the same three
steps a radiology viewer takes (DICOM PS3.4 N.2, done here by :mod:`pydicom.pixels`):

1. **Modality LUT**: stored values -> physical values (``RescaleSlope`` /
   ``RescaleIntercept`` or a *Modality LUT Sequence*).
2. **VOI LUT**: the part of that range worth looking at -> display range; either the
   *VOI LUT Sequence* stored in the file or a linear / sigmoid window (``WindowCenter`` /
   ``WindowWidth``). Values below the window are black, above it white.
3. **Presentation**: ``MONOCHROME1`` files store "higher value = darker", so they are
   inverted; ``MONOCHROME2`` files are not.

The header also carries names, birth dates, hospitals, accession numbers and UIDs.
:func:`dicom_record` keeps only the fields a study needs and replaces the patient id by a
salted hash, so manifests can be shared without re-identifying anyone.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from cxrlib.data.errors import MAX_PIXELS, DicomReadError

#: File name endings that :func:`cxrlib.data.io.read_image` hands to :func:`read_dicom`.
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
#: Percentiles of the (modality-LUT) values mapped to black and white when a file has no window.
DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)
#: Hex characters kept from the HMAC-SHA-256 of a patient id (64 bits: a collision among a
#: million patients has a probability of about 3e-8).
HASH_CHARS = 16
#: Environment variable holding the salt for patient-id hashes (see :func:`default_salt`).
SALT_ENV = "CXR_ID_SALT"
#: Ages above this are reported as this value (HIPAA Safe Harbor: ages over 89 identify).
MAX_AGE_YEARS = 90

#: Samples scaled at a time by :func:`_to_uint8`, to bound its float64 temporaries.
_BLOCK_VALUES = 1 << 18
#: Values longer than this stay on disk when :func:`dicom_record` reads a header.
_DEFER_BYTES = 4096

_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def _name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(source, "name", None)
    return str(name) if isinstance(name, (str, os.PathLike)) else "<DICOM stream>"


def _read_dataset(
    source: str | os.PathLike | IO[bytes], *, stop_before_pixels: bool, defer_size: int | None = None
):
    """``pydicom.dcmread`` with every failure turned into :class:`DicomReadError`.

    ``defer_size``: values longer than this many bytes are not read (their length and file
    offset are kept), so a header can be checked without loading the pixel data."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    name = _name(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise DicomReadError(name, "no such file")
        if path.is_dir():
            raise DicomReadError(name, "is a directory, not a DICOM file")
    try:
        return pydicom.dcmread(source, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
    except InvalidDicomError:
        raise DicomReadError(
            name, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)"
        ) from None
    except PermissionError:
        raise DicomReadError(name, "permission denied") from None
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a truncated or garbled header is a bad file
        raise DicomReadError(name, f"unreadable DICOM header ({type(error).__name__}: {error})") from error


@contextmanager
def _garbled_elements_refused(name: str) -> Iterator[None]:
    """Turn any failure while header elements are read into :class:`DicomReadError`.

    pydicom converts an element when it is first accessed, so a garbled one (an unknown VR,
    a value that does not parse) fails there, with whatever exception pydicom raises."""
    try:
        yield
    except (DicomReadError, MemoryError):
        raise
    except Exception as error:  # noqa: BLE001 - any garbled element makes the file unreadable
        detail = " ".join(str(error).split())[:200]
        raise DicomReadError(name, f"garbled DICOM header element ({type(error).__name__}: {detail})") from error


def _check_single_grayscale(ds: Any, name: str) -> None:
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop_class = ds.get("SOPClassUID")
        kind = f" ({getattr(sop_class, 'name', sop_class)})" if sop_class else ""
        raise DicomReadError(name, f"DICOM file has no pixel data{kind}; it is not an image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomReadError(
            name, f"multi-frame DICOM ({frames} frames); read_dicom reads single radiographs"
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomReadError(
            name,
            f"colour DICOM (PhotometricInterpretation {photometric or 'missing'}, "
            f"SamplesPerPixel {samples}); chest X-rays are MONOCHROME1 / MONOCHROME2",
        )


def _check_pixel_count(ds: Any, name: str, max_pixels: int) -> None:
    """Refuse a header whose ``Rows`` x ``Columns`` exceed ``max_pixels`` (before decoding)."""
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not columns or rows < 0 or columns < 0:
        raise DicomReadError(name, f"DICOM header lacks a valid Rows / Columns ({rows} x {columns})")
    if rows * columns > max_pixels:
        raise DicomReadError(
            name, f"image is {columns} x {rows} = {rows * columns / 1e6:.0f} megapixels, above the "
            f"limit of {max_pixels / 1e6:g} megapixels (cxrlib.data.io.MAX_PIXELS); refused before "
            "decoding")


def _stream_size(source: str | os.PathLike | IO[bytes]) -> int | None:
    """Size in bytes of a path or seekable stream (position kept), ``None`` when unknown."""
    try:
        if isinstance(source, (str, os.PathLike)):
            return os.path.getsize(source)
        position = source.tell()
        size = source.seek(0, os.SEEK_END)
        source.seek(position)
        return int(size)
    except (OSError, ValueError, AttributeError):
        return None


def _check_pixel_length(ds: Any, name: str, file_size: int | None) -> None:
    """Refuse native (uncompressed) pixel data that is cut short, without reading it.

    ``ds`` must come from :func:`_read_dataset` with a ``defer_size`` so the pixel data's
    declared length and offset are known. Encapsulated (compressed) data has no declared
    length; a truncated one loses its delimiter and pydicom drops the element, which
    :func:`_check_single_grayscale` reports as missing pixel data."""
    from pydicom.dataelem import RawDataElement
    from pydicom.pixels.utils import get_expected_length

    if "PixelData" not in ds:
        return
    if _transfer_syntax(ds, name, "is_encapsulated"):
        return
    element = ds.get_item("PixelData", keep_deferred=True)
    if isinstance(element, RawDataElement):
        length = int(element.length)
        available = len(element.value) if element.value is not None else (
            file_size - int(element.value_tell) if file_size is not None else length)
    else:
        length = available = len(element.value or b"")
    if length == 0xFFFFFFFF:  # undefined length in a native syntax: malformed
        raise DicomReadError(name, "native pixel data with undefined length (malformed file)")
    if available < length:
        raise DicomReadError(
            name, f"truncated DICOM: pixel data declares {length} bytes but the file holds "
            f"{max(available, 0)}")
    try:
        expected = int(get_expected_length(ds))
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - missing / garbled Rows, BitsAllocated, ...
        raise DicomReadError(name, f"inconsistent image header ({type(error).__name__}: {error})") from error
    if length < expected:
        raise DicomReadError(
            name, f"truncated DICOM: pixel data holds {length} bytes, its Rows / Columns / "
            f"BitsAllocated need {expected}")


def _transfer_syntax(ds: Any, name: str, flag: str) -> bool:
    """``flag`` (``is_compressed``, ``is_encapsulated``) of the file's transfer syntax;
    ``False`` when the file names none; :class:`DicomReadError` when it names no known one."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        return False
    try:
        return bool(getattr(syntax, flag))
    except ValueError:  # pydicom: "UID is not a transfer syntax"
        raise DicomReadError(name, f"unknown transfer syntax UID {str(syntax)[:64]!r}") from None


def _decode_pixels(ds: Any, name: str) -> np.ndarray:
    compressed = _transfer_syntax(ds, name, "is_compressed")
    syntax = ds.file_meta.TransferSyntaxUID if compressed else None
    try:
        pixels = ds.pixel_array
    except MemoryError:
        raise
    except (RuntimeError, NotImplementedError) as error:
        if compressed:
            raise DicomReadError(
                name,
                f"pixel data compressed as {syntax.name} and no installed decoder reads it; "
                f"install one of the plugins pydicom lists: {error}",
            ) from error
        raise DicomReadError(name, f"cannot decode pixel data ({error})") from error
    except Exception as error:  # noqa: BLE001 - truncated / inconsistent pixel data is a bad file
        raise DicomReadError(name, f"cannot decode pixel data ({type(error).__name__}: {error})") from error
    if pixels.ndim != 2 or pixels.size == 0:
        raise DicomReadError(name, f"expected one 2-D grayscale frame, got pixel array of shape {pixels.shape}")
    return pixels


def _window_dataset(ds: Any, center: float, width: float) -> Any:
    """A minimal dataset with ``ds``'s modality-LUT fields and the given window (linear)."""
    from pydicom.dataset import Dataset

    voi = Dataset()
    for keyword in (
        "PhotometricInterpretation", "BitsStored", "PixelRepresentation",
        "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence",
    ):
        if keyword in ds:
            setattr(voi, keyword, ds[keyword].value)
    voi.WindowCenter = float(center)
    voi.WindowWidth = float(width)
    return voi


def _lut_domain(ds: Any) -> np.ndarray:
    """Every input value a VOI LUT distinguishes, plus one on each side (where it clamps)."""
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    entries = int(descriptor[0]) or 65536  # 0 means 2**16 entries (PS3.3 C.11.2.1.1)
    first = int(descriptor[1])
    return np.arange(first - 1, first + entries + 1, dtype=np.int64)


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map ``low`` -> 0, ``high`` -> 255, clipped; a zero range gives black.

    Row block by row block, so the float64 temporaries stay small whatever the image size."""
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    scale = 255.0 / (high - low)
    out = np.empty(values.shape, dtype=np.uint8)
    columns = int(np.prod(values.shape[1:], dtype=np.int64)) or 1
    step = max(1, _BLOCK_VALUES // columns)
    for start in range(0, values.shape[0], step):
        block = values[start:start + step].astype(np.float64)
        block -= low
        block *= scale
        np.rint(block, out=block)
        np.clip(block, 0, 255, out=block)
        out[start:start + step] = block
    return out


def read_dicom(
    source: str | os.PathLike | IO[bytes],
    *,
    window: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Read a single-frame grayscale DICOM as an ``(H, W)`` ``uint8`` display image.

    Parameters
    ----------
    source
        Path or open binary file of a DICOM Part 10 file.
    window
        ``(center, width)`` in modality-LUT units (after ``RescaleSlope`` /
        ``RescaleIntercept``), overriding whatever the file says; applied as DICOM's
        linear window: ``center - width / 2`` -> 0, ``center + width / 2`` -> 255.
    percentiles
        Only for files with neither a VOI LUT Sequence nor a window (and no ``window``
        given): these percentiles of the image's own values become 0 and 255. The default
        (0.5, 99.5) ignores the few extreme pixels (collimator edges, burned-in labels)
        that a plain min-max would stretch the image for. ``(0, 100)`` is min-max.
    max_pixels
        Refuse a header whose ``Rows`` x ``Columns`` exceed this before decoding (default
        :data:`cxrlib.data.io.MAX_PIXELS`).

    Returns
    -------
    numpy.ndarray
        ``uint8`` ``(H, W)``, 0 = black. Scaling, in order: modality LUT; then the first
        VOI LUT Sequence item (its output range -> 0..255), else the first
        ``WindowCenter`` / ``WindowWidth`` pair (with the file's ``VOILUTFunction``:
        ``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID``), else the percentiles above;
        ``MONOCHROME1`` images are then inverted (``255 - x``) so bone is bright as in
        ``MONOCHROME2``. A constant image without a window comes back black.

    Raises
    ------
    DicomReadError
        (an :class:`~cxrlib.data.io.ImageReadError`) naming the file: not DICOM, no pixel
        data, multi-frame, colour, too many pixels, compressed with no installed decoder,
        truncated pixel data, an invalid window in the file.
    ValueError
        For a bad ``window`` / ``percentiles`` argument.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    if window is not None:
        center, width = (float(v) for v in window)
        if not (math.isfinite(center) and math.isfinite(width) and width >= 1):
            raise ValueError(f"window must be (center, width) with finite values and width >= 1, got {window!r}")
    low_pct, high_pct = (float(p) for p in percentiles)
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")

    name = _name(source)
    ds = _read_dataset(source, stop_before_pixels=False)
    with _garbled_elements_refused(name):
        _check_single_grayscale(ds, name)
        _check_pixel_count(ds, name, MAX_PIXELS if max_pixels is None else int(max_pixels))
    stored = _decode_pixels(ds, name)
    try:
        modality = apply_modality_lut(stored, ds)
        values = np.asarray(modality, dtype=np.float64)  # no second copy when already float64
        if window is not None:
            voi_ds = _window_dataset(ds, center, width)
            shown = apply_windowing(values, voi_ds)
            with np.errstate(over="ignore"):
                low, high = apply_windowing(np.array([-1e30, 1e30]), voi_ds)
        elif ds.get("VOILUTSequence"):
            shown = apply_voi(modality, ds)  # integers in, as a LUT index expects
            extremes = apply_voi(_lut_domain(ds), ds)
            low, high = float(extremes.min()), float(extremes.max())
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            shown = apply_windowing(values, ds)
            with np.errstate(over="ignore"):
                low, high = apply_windowing(np.array([-1e30, 1e30]), ds)
        else:
            mask = np.isfinite(values)
            finite = values if mask.all() else values[mask]  # integer data: no copy
            shown = values
            if finite.size:
                low, high = (float(v) for v in np.percentile(finite, [low_pct, high_pct]))
            else:
                low = high = 0.0
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a malformed LUT / window in the file
        raise DicomReadError(name, f"cannot apply the file's LUT / window ({type(error).__name__}: {error})") from error
    image = _to_uint8(np.asarray(shown), float(low), float(high))
    if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1" and float(high) > float(low):
        image = 255 - image
    return image


# ------------------------------------------------------------------ de-identified records


def _salt_bytes(salt: str | bytes) -> bytes:
    if isinstance(salt, str):
        salt = salt.encode("utf-8")
    if not isinstance(salt, bytes) or not salt.strip():
        raise ValueError(
            "a non-empty salt is required to hash patient ids (a bare hash of an id can be "
            f"reversed by hashing candidate ids); see cxrlib.data.dicom.default_salt() / ${SALT_ENV}"
        )
    return salt


def hash_patient_id(patient_id: str, *, salt: str | bytes) -> str:
    """A pseudonym for ``patient_id``: the first :data:`HASH_CHARS` hex characters of
    HMAC-SHA-256 keyed with ``salt``.

    The same id and salt always give the same pseudonym (images of one patient stay
    together, splits are reproducible); another salt gives unrelated pseudonyms. Without
    the salt, nobody can test a guessed id against a pseudonym. ``salt`` must be non-empty.
    """
    key = _salt_bytes(salt)
    text = str(patient_id).strip()
    if not text:
        raise ValueError("cannot hash an empty patient id")
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()[:HASH_CHARS]


def default_salt() -> str:
    """The project's salt for patient-id hashes.

    ``$CXR_ID_SALT`` when set (share it between machines that must produce the same
    pseudonyms); otherwise the contents of ``<data dir>/.id_salt``, created with 256 random
    bits on first use. Keep it private: whoever holds the salt can test guessed ids.
    Deleting the file changes every pseudonym made afterwards.
    """
    from cxrlib.config import data_dir

    value = os.environ.get(SALT_ENV, "").strip()
    if value:
        return value
    path = data_dir() / ".id_salt"
    if not path.exists():
        _create_private(path, secrets.token_hex(32) + "\n")
    value = path.read_text().strip()
    if not value:
        raise ValueError(f"salt file {path} is empty; delete it to make a new one, or set ${SALT_ENV}")
    return value


def _create_private(path: Path, text: str) -> None:
    """Create ``path`` holding ``text``, readable by its owner only (mode 0600), unless it exists.

    The file is born 0600 (``os.open`` with the mode: no moment where others can read it),
    written under a temporary name and linked into place, so a reader never sees it half
    written and two processes creating it at once agree on one content (the second link fails
    and the first file stays)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # made by another process meanwhile: keep theirs
    finally:
        temporary.unlink(missing_ok=True)


def parse_age(value: Any) -> int | None:
    """DICOM ``PatientAge`` (``"045Y"``, ``"006M"``, ``"010D"``, or a bare ``"45"``) -> whole
    years, capped at :data:`MAX_AGE_YEARS`; ``None`` when missing or malformed."""
    match = _AGE_RE.match(str(value or ""))
    if not match:
        return None
    number, unit = int(match.group(1)), (match.group(2) or "Y").upper()
    years = number if unit == "Y" else int(number * _DAYS_PER_UNIT[unit] // _DAYS_PER_UNIT["Y"])
    return min(years, MAX_AGE_YEARS)


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _int(ds: Any, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


#: Keys of :func:`dicom_record`, in order.
RECORD_FIELDS: tuple[str, ...] = (
    "patient_id", "view", "sex", "age_years", "modality",
    "rows", "columns", "photometric_interpretation", "bits_stored",
)


def dicom_record(source: str | os.PathLike | IO[bytes], *, salt: str | bytes) -> dict[str, Any]:
    """The de-identified header fields of a DICOM file (pixel values are not read).

    The file is checked as :func:`read_dicom` checks it, short of decoding: it must hold
    one grayscale frame of at most :data:`cxrlib.data.io.MAX_PIXELS` pixels whose pixel
    data is all there, so an adapter never accepts a row for a file it cannot show.

    Parameters
    ----------
    source
        Path or open binary file.
    salt
        Required, non-empty: key for :func:`hash_patient_id`. Use :func:`default_salt`
        for the project's one.

    Returns
    -------
    dict
        Exactly :data:`RECORD_FIELDS`, ``None`` where the file lacks the field:
        ``patient_id`` (salted hash of ``PatientID``), ``view`` (``ViewPosition``, e.g.
        ``PA`` / ``AP`` / ``LL``), ``sex`` (``M`` / ``F`` / ``O``), ``age_years`` (int,
        see :func:`parse_age`), ``modality`` (``CR`` / ``DX`` ...), ``rows``,
        ``columns``, ``photometric_interpretation``, ``bits_stored``.
        Nothing else is copied: no names, dates, institution, accession number, UIDs or
        free-text descriptions (which may hold any of those).

    Raises
    ------
    DicomReadError
        Naming the file when it is not a readable DICOM image: not DICOM, truncated, no
        pixel data, multi-frame, colour, too many pixels.
    ValueError
        When ``salt`` is empty.
    """
    salt_bytes = _salt_bytes(salt)  # check before reading anything
    name = _name(source)
    # pixel values stay on disk (deferred), but their presence and length are checked, so a
    # truncated or pixel-less file is refused here as read_dicom refuses it
    ds = _read_dataset(source, stop_before_pixels=False, defer_size=_DEFER_BYTES)
    with _garbled_elements_refused(name), warnings.catch_warnings():
        _check_single_grayscale(ds, name)
        _check_pixel_count(ds, name, MAX_PIXELS)
        _check_pixel_length(ds, name, _stream_size(source))
        # RSNA and others write PatientAge as a bare "58"; parse_age reads that on purpose,
        # so pydicom's "Invalid value for VR AS" warning (one per distinct value) is noise
        warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning)
        patient = _text(ds, "PatientID")
        sex = (_text(ds, "PatientSex") or "").upper()
        view = (_text(ds, "ViewPosition") or "").upper()
        age = parse_age(ds.get("PatientAge"))
        record = {
            "patient_id": hash_patient_id(patient, salt=salt_bytes) if patient else None,
            "view": view or None,
            "sex": sex if sex in ("M", "F", "O") else None,
            "age_years": age,
            "modality": _text(ds, "Modality"),
            "rows": _int(ds, "Rows"),
            "columns": _int(ds, "Columns"),
            "photometric_interpretation": _text(ds, "PhotometricInterpretation"),
            "bits_stored": _int(ds, "BitsStored"),
        }
    return record


def is_dicom_path(path: str | os.PathLike) -> bool:
    """True when ``path`` ends in one of :data:`DICOM_SUFFIXES` (any case)."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES

