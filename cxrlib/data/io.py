"""Image I/O that copes with what real chest X-ray files bring.

Public CXR collections mix PNG and JPEG, 8-bit and 16-bit, grayscale, RGB and palette
images, the odd alpha channel, EXIF-rotated phone photos of films and now and then a
truncated download. Everything downstream wants one thing: an ``(H, W)`` ``uint8``
grayscale array. :func:`read_image` produces it or raises :class:`ImageReadError`
naming the file; :func:`load_images` reads many files and reports the bad ones
instead of stopping at the first.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

# ImageReadError and MAX_PIXELS live beside the DICOM reader's error, importable from here too
from cxrlib.data.errors import MAX_PIXELS, DicomReadError, ImageReadError
from cxrlib.runs import atomic_write

#: What :func:`read_image` accepts: a path, an open binary file, or the encoded bytes.
ImageSource = str | os.PathLike | IO[bytes] | bytes | bytearray | memoryview

NORMALIZE_MODES = ("minmax", "dtype")

#: Modes whose samples are wider than 8 bits and need scaling to 0..255.
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

#: Most bad files a :class:`LoadReport` lists in its text form.
_MAX_LISTED = 20

#: Smallest side, in pixels, of an image a cohort accepts (:func:`image_problem`).
MIN_SIDE = 32
#: Smallest intensity standard deviation (0..255 grey levels) of an image a cohort accepts:
#: below it the image is blank or nearly so (a failed export, a constant fill).
MIN_SPREAD = 2.0
#: Samples converted at a time when scaling high-bit-depth images, to bound temporary memory.
_BLOCK_PIXELS = 1 << 18


def _source_name(source: Any) -> str:
    """A name for error messages: the path, a file object's ``name``, or a placeholder."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    name = getattr(source, "name", None)
    return str(name) if isinstance(name, (str, os.PathLike)) else "<file object>"


def _open_source(source: ImageSource) -> tuple[IO[bytes], bool]:
    """An open binary stream for ``source`` and whether this module must close it."""
    if isinstance(source, (str, os.PathLike)):
        return open(source, "rb"), True
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), True
    if hasattr(source, "read"):
        return source, False  # the caller owns the stream; leave it open
    raise TypeError(
        f"read_image expects a path, a binary file object or bytes, got {type(source).__name__}"
    )


def _looks_like_dicom(stream: IO[bytes]) -> bool:
    try:
        position = stream.tell()
        stream.seek(128)
        magic = stream.read(4)
        stream.seek(position)
    except (OSError, ValueError):
        return False
    return magic == b"DICM"


def _high_depth_to_uint8(pixels: np.ndarray, mode: str, normalize: str) -> np.ndarray:
    """Scale 16-bit / 32-bit integer / float samples to 0..255 ``uint8``.

    ``minmax`` stretches the image's own range (a constant image falls back to ``dtype``
    scaling because it has no range); ``dtype`` maps the type's nominal range: 0..65535 for
    16-bit and 32-bit integer modes (PNG / TIFF store at most 16 significant bits there)
    and 0..1 for float, clipping anything outside. NaN / inf carry no intensity and count
    as the image's finite minimum.

    Memory: the result plus one block of :data:`_BLOCK_PIXELS` float64 samples; the image is
    never copied to float64 as a whole (a 50-megapixel 16-bit image would take 400 MB).
    """
    rows = pixels.shape[0]
    step = max(1, _BLOCK_PIXELS // max(1, int(np.prod(pixels.shape[1:], dtype=np.int64))))
    blocks = [slice(start, min(start + step, rows)) for start in range(0, rows, step)]
    floating = pixels.dtype.kind == "f"
    low = high = None
    if normalize == "minmax" or floating:
        lows, highs = [], []
        for block in blocks:
            values = pixels[block]
            if floating:
                values = values[np.isfinite(values)]
            if values.size:
                lows.append(float(values.min()))
                highs.append(float(values.max()))
        low, high = (min(lows), max(highs)) if lows else (0.0, 0.0)
    fill = low if low is not None else 0.0  # what NaN / inf become
    if normalize == "dtype" or low is None or high <= low:
        low, high = (0.0, 1.0) if mode == "F" else (0.0, 65535.0)
    scale = 255.0 / (high - low)
    out = np.empty(pixels.shape, dtype=np.uint8)
    for block in blocks:
        values = pixels[block].astype(np.float64)
        if floating:
            values[~np.isfinite(values)] = fill
        values -= low
        values *= scale
        np.rint(values, out=values)
        np.clip(values, 0, 255, out=values)
        out[block] = values
    return out


def _to_gray_uint8(image: Image.Image, normalize: str) -> np.ndarray:
    """Any PIL image -> ``(H, W)`` ``uint8``; alpha is composited on black."""
    mode = image.mode
    if mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_uint8(np.asarray(image), mode, normalize)
    if mode == "P":
        # a palette may mark one index as transparent; expand it so that becomes alpha
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        # Compositing on black = luminance * alpha; luminance is linear in R, G, B, so
        # converting to luminance first and multiplying after gives the same image.
        # PIL turns a `transparency` colour (tRNS chunk) into alpha during convert("LA"),
        # and un-premultiplies RGBa / La, which the multiplication below undoes again.
        gray_alpha = np.asarray(image.convert("LA"), dtype=np.float32)
        gray = gray_alpha[..., 0] * (gray_alpha[..., 1] / 255.0)
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    if mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode not in ("1", "RGB"):
        # CMYK, YCbCr, LAB, HSV, ...: go through RGB, which every mode converts to
        image = image.convert("RGB")
    return np.asarray(image.convert("L"), dtype=np.uint8).copy()


def read_image(
    source: ImageSource, *, normalize: str = "minmax", max_pixels: int | None = None
) -> np.ndarray:
    """Read an image file as grayscale.

    ``source`` is a path, an open binary file object (left open) or the encoded bytes.
    Returns an ``(H, W)`` ``uint8`` array, 0..255. 8-bit images keep their values;
    16-bit / 32-bit / float images (PIL modes ``I;16``, ``I``, ``F``) are scaled to 0..255
    by their own min-max (``normalize="minmax"``) or by their type's range (``"dtype"``).
    Colour, palette and bilevel images become luminance; alpha is composited on black; the
    EXIF orientation tag is applied, so a rotated JPEG comes back upright. A multi-frame
    file gives its first frame.

    DICOM files (a ``.dcm`` / ``.dicom`` path, or any source with the ``DICM`` marker) go
    to :func:`cxrlib.data.dicom.read_dicom`, which applies the file's modality LUT, VOI LUT
    or window and MONOCHROME1 inversion; ``normalize`` does not apply to them.

    Images larger than ``max_pixels`` (default :data:`MAX_PIXELS`) are refused from their
    header, before any pixel is decoded. High-bit-depth scaling works block by block, so
    reading takes about the decoded image's size in memory, not eight times that.

    Raises :class:`ImageReadError` naming the file for anything that goes wrong: missing
    file, unknown format, truncated or corrupt data, zero-size image, too many pixels.
    Degenerate but readable images (tiny, blank) are returned; :func:`image_problem` flags them.
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    name = _source_name(source)
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in (".dcm", ".dicom"):
        from cxrlib.data.dicom import read_dicom

        return read_dicom(source, max_pixels=limit)
    try:
        stream, owned = _open_source(source)
    except FileNotFoundError:
        raise ImageReadError(name, "no such file") from None
    except IsADirectoryError:
        raise ImageReadError(name, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageReadError(name, "permission denied") from None
    except OSError as error:
        raise ImageReadError(name, f"cannot open ({error})") from error
    try:
        return _decode(stream, name, normalize, limit)
    finally:
        if owned:
            stream.close()


def _too_large(width: int, height: int, max_pixels: int) -> str | None:
    """Why a ``width`` x ``height`` image is refused, or ``None`` when it is within the limit."""
    if width * height <= max_pixels:
        return None
    return (f"image is {width} x {height} = {width * height / 1e6:.0f} megapixels, above the "
            f"limit of {max_pixels / 1e6:g} megapixels (cxrlib.data.io.MAX_PIXELS); refused "
            "before decoding")


def _decode(stream: IO[bytes], name: str, normalize: str, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # the project's own limit (checked below, from the header) replaces Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(stream)
        with opened as image:
            too_large = _too_large(image.width, image.height, max_pixels)
            if too_large:
                raise ImageReadError(name, too_large)
            image.load()  # decode now, so truncated data fails here and not later
            image = ImageOps.exif_transpose(image)
            pixels = _to_gray_uint8(image, normalize)
    except UnidentifiedImageError:
        if _looks_like_dicom(stream):
            return _decode_dicom(stream, name, max_pixels)
        if _is_empty(stream):
            reason = "file is empty (0 bytes)"
        else:
            reason = "unknown image format or corrupt header"
        raise ImageReadError(name, reason) from None
    except Image.DecompressionBombError as error:
        raise ImageReadError(
            name, f"image too large ({str(error).rstrip('.')}), above the limit of "
            f"{max_pixels / 1e6:g} megapixels (cxrlib.data.io.MAX_PIXELS); refused before decoding"
        ) from None
    except (MemoryError, ImageReadError):
        raise
    except (OSError, SyntaxError, EOFError) as error:
        # PIL reports truncated streams and bad chunks as OSError / SyntaxError / EOFError
        raise ImageReadError(name, f"truncated or corrupt image data ({error})") from error
    except Exception as error:  # noqa: BLE001 - a decoder failing in an unusual way is still a bad file
        raise ImageReadError(name, f"{type(error).__name__}: {error}") from error
    if pixels.ndim != 2 or pixels.size == 0:
        raise ImageReadError(name, f"zero-size image (shape {pixels.shape})")
    return pixels


def _decode_dicom(stream: IO[bytes], name: str, max_pixels: int) -> np.ndarray:
    """A DICOM stream without a ``.dcm`` name (bytes, file object, extension-less file)."""
    from cxrlib.data.dicom import read_dicom

    stream.seek(0)
    try:
        return read_dicom(stream, max_pixels=max_pixels)
    except DicomReadError as error:
        raise ImageReadError(name, error.reason) from error


def _is_empty(stream: IO[bytes]) -> bool:
    try:
        stream.seek(0, os.SEEK_END)
        return stream.tell() == 0
    except (OSError, ValueError):
        return False


def read_mask(source: ImageSource, *, threshold: int = 127) -> np.ndarray:
    """Read a segmentation mask as an ``(H, W)`` ``bool`` array (``pixel > threshold``).

    Masks stored as 0/1 label images (every value 0 or 1) are taken as they are, so they
    do not come back empty. 16-bit masks are min-max scaled first, which also maps 0/1.
    """
    pixels = read_image(source, normalize="minmax")
    if pixels.max(initial=0) <= 1:
        return pixels.astype(bool)
    return pixels > threshold


def image_problem(
    image: np.ndarray, *, min_side: int = MIN_SIDE, min_spread: float = MIN_SPREAD
) -> str | None:
    """Why a decoded image is unfit for a cohort, or ``None`` when it is fine.

    ``image``: ``(H, W)`` ``uint8`` (what :func:`read_image` returns). Refused: a side below
    ``min_side`` pixels (a 1 x 1 file resized to 256 x 256 is a blank square), and a
    near-constant image whose intensity standard deviation is below ``min_spread`` grey
    levels (blank, a constant fill, a failed export). Computed from the 256-bin histogram,
    so it takes no memory beyond the image. Masks are not images: do not apply it to them.
    """
    pixels = np.asarray(image)
    if pixels.ndim != 2:
        return f"expected a 2-D grayscale image, got shape {pixels.shape}"
    if pixels.dtype != np.uint8:
        raise ValueError(f"image_problem expects a uint8 image (read_image's output), got {pixels.dtype}")
    height, width = pixels.shape
    if min(height, width) < min_side:
        return f"image is {width} x {height} pixels, below the minimum side of {min_side}"
    counts = np.bincount(pixels.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    mean = counts @ levels / counts.sum()
    spread = float(np.sqrt(counts @ (levels - mean) ** 2 / counts.sum()))
    if spread < min_spread:
        return (f"near-constant image (intensity standard deviation {spread:.2f} < {min_spread:g} "
                "grey levels): blank or a failed export")
    return None


def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a 2-D array as PNG, atomically; returns the path.

    ``array``: ``(H, W)`` ``uint8`` (8-bit), ``bool`` (written as 0 / 255) or ``uint16``
    (16-bit PNG). The file is written to a temporary name in the same folder and moved
    into place with ``os.replace``, so a reader never sees half a file and an interrupted
    write leaves the old file intact. Parent folders are created.
    """
    array = np.asarray(array)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"write_png expects a non-empty (H, W) array, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = array.astype("<u2", copy=False)  # PIL's I;16 is little-endian
    elif array.dtype != np.uint8:
        raise ValueError(
            f"write_png accepts uint8, bool or uint16 arrays, got {array.dtype}; convert first, "
            "e.g. np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for floats in 0..1"
        )
    target = Path(path)
    image = Image.fromarray(np.ascontiguousarray(array))
    atomic_write(target, lambda handle: image.save(handle, format="PNG"))
    return target


@dataclass
class BadFile:
    """One file that could not be read, and why."""

    path: str
    error: str


#: Columns of :meth:`LoadReport.table` and of the CSV :meth:`LoadReport.write_csv` writes.
REPORT_COLUMNS: tuple[str, ...] = ("path", "step", "status", "reason")


@dataclass
class LoadReport:
    """How a batch of reads went: ``n_ok`` images read, ``bad`` the files that failed.

    ``dropped``: files that were read but refused (a degenerate image, see
    :func:`image_problem`); they are not in ``n_ok``. ``step`` names what was being done
    (``"decoding"``, ``"resizing"``, ``"hashing"``) in the table and the CSV.
    """

    n_ok: int = 0
    bad: list[BadFile] = field(default_factory=list)
    dropped: list[BadFile] = field(default_factory=list)
    step: str = ""

    @property
    def n_bad(self) -> int:
        return len(self.bad)

    @property
    def n_dropped(self) -> int:
        return len(self.dropped)

    @property
    def ok(self) -> bool:
        """True when every file was read."""
        return not self.bad

    def to_frame(self) -> pd.DataFrame:
        """The bad (unreadable) files as a table with columns ``path``, ``error``."""
        return pd.DataFrame(
            [(item.path, item.error) for item in self.bad], columns=["path", "error"]
        )

    def table(self, step: str | None = None) -> pd.DataFrame:
        """Unreadable and dropped files, one row each: :data:`REPORT_COLUMNS`; ``status`` is
        ``"unreadable"`` or ``"dropped"``, ``step`` is ``step`` or :attr:`step`."""
        name = self.step if step is None else step
        rows = [(item.path, name, "unreadable", item.error) for item in self.bad]
        rows += [(item.path, name, "dropped", item.error) for item in self.dropped]
        return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`table` as CSV, atomically; returns the path."""
        return write_table_csv(self.table(), path)

    def __str__(self) -> str:
        total = self.n_ok + self.n_bad + self.n_dropped
        dropped = f"; {self.n_dropped} dropped" if self.dropped else ""
        if not self.bad:
            return f"read {self.n_ok} of {total} images; no unreadable files{dropped}"
        lines = [f"read {self.n_ok} of {total} images; {self.n_bad} unreadable{dropped}:"]
        lines += [f"  {item.path}: {item.error}" for item in self.bad[:_MAX_LISTED]]
        if self.n_bad > _MAX_LISTED:
            lines.append(f"  ... and {self.n_bad - _MAX_LISTED} more (see .to_frame())")
        return "\n".join(lines)


def write_table_csv(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``table`` as CSV without its index, atomically (temporary file + rename)."""
    target = Path(path)
    atomic_write(target, lambda stream: table.to_csv(stream, index=False, lineterminator="\n"), mode="w")
    return target


def load_images(
    paths: Iterable[ImageSource], *, progress: bool = False, **read_kwargs: Any
) -> tuple[list[np.ndarray | None], LoadReport]:
    """Read every image in ``paths`` with :func:`read_image`, carrying on past bad files.

    Returns the images in input order (``None`` where a file could not be read) and a
    :class:`LoadReport` listing the failures. ``read_kwargs`` go to :func:`read_image`.
    ``progress=True`` shows a tqdm bar.
    """
    normalize = read_kwargs.get("normalize", "minmax")
    if normalize not in NORMALIZE_MODES:  # a wrong argument is not a bad file: fail once, now
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    items = list(paths)
    if progress:
        from tqdm.auto import tqdm

        items_iter: Iterable[ImageSource] = tqdm(items, desc="reading images", unit="img")
    else:
        items_iter = items
    images: list[np.ndarray | None] = []
    report = LoadReport()
    for item in items_iter:
        try:
            images.append(read_image(item, **read_kwargs))
            report.n_ok += 1
        except ImageReadError as error:
            images.append(None)
            report.bad.append(BadFile(path=error.path, error=error.reason))
    return images, report


def pixel_hash(image: np.ndarray) -> str:
    """SHA-256 hex digest of an array's shape, dtype and pixel bytes.

    Computed on decoded pixels, so the same image saved twice, or re-encoded losslessly
    (PNG at another compression level, metadata stripped), gives the same hash; any pixel
    change gives another. Byte order is normalised so equal values hash equally.
    """
    array = np.asarray(image)
    if array.dtype.hasobject:
        raise TypeError("pixel_hash needs a numeric array, not an object array")
    array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
    digest = hashlib.sha256()
    digest.update(f"{array.shape}|{array.dtype.str}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()
