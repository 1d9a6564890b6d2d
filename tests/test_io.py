"""Image I/O: every format real collections bring, bad files, atomic writes, pixel hashes."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlib.data.io import (
    BadFile,
    ImageReadError,
    LoadReport,
    load_images,
    pixel_hash,
    read_image,
    read_mask,
    write_png,
)

EXIF_ORIENTATION = 0x0112


def gradient(height: int = 24, width: int = 32) -> np.ndarray:
    """(H, W) uint8 test image whose rows and columns are all different."""
    rows = np.arange(height)[:, None] * 7
    cols = np.arange(width)[None, :] * 3
    return ((rows + cols) % 256).astype(np.uint8)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


# ----------------------------------------------------------------------------- formats


def test_png_8bit_gray_is_returned_unchanged(tmp_path):
    pixels = gradient()
    path = save(Image.fromarray(pixels, mode="L"), tmp_path / "gray.png")
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == pixels.shape
    np.testing.assert_array_equal(out, pixels)


def test_png_16bit_minmax_and_dtype_scaling(tmp_path):
    pixels = np.linspace(1000, 3000, 24 * 32).reshape(24, 32).astype(np.uint16)
    path = save(Image.fromarray(pixels), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")

    stretched = read_image(path)  # default: min-max
    assert stretched.dtype == np.uint8 and stretched.shape == (24, 32)
    assert stretched.min() == 0 and stretched.max() == 255

    by_range = read_image(path, normalize="dtype")
    # 1000..3000 of 65535 -> about 4..12 of 255
    assert by_range.min() == round(1000 / 65535 * 255)
    assert by_range.max() == round(3000 / 65535 * 255)


def test_constant_16bit_image_does_not_divide_by_zero(tmp_path):
    path = save(Image.fromarray(np.full((8, 8), 65535, np.uint16)), tmp_path / "flat.png")
    np.testing.assert_array_equal(read_image(path), np.full((8, 8), 255, np.uint8))


def test_int32_and_float_tiff(tmp_path):
    ints = (np.arange(48).reshape(6, 8) * 100).astype(np.int32)
    floats = np.linspace(0.0, 0.5, 48).reshape(6, 8).astype(np.float32)
    int_path = save(Image.fromarray(ints), tmp_path / "int.tif")
    float_path = save(Image.fromarray(floats), tmp_path / "float.tif")
    assert read_image(int_path).max() == 255
    assert read_image(float_path).max() == 255
    assert read_image(float_path, normalize="dtype").max() == round(0.5 * 255)


def test_rgb_becomes_luminance(tmp_path):
    pixels = gradient()
    rgb = np.stack([pixels, pixels, pixels], axis=-1)
    path = save(Image.fromarray(rgb, mode="RGB"), tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(path), pixels)
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    path = save(Image.fromarray(red, mode="RGB"), tmp_path / "red.png")
    assert read_image(path)[0, 0] == 76  # ITU-R 601 luma of pure red


def test_rgba_alpha_is_composited_on_black(tmp_path):
    rgba = np.full((4, 6, 4), 200, np.uint8)
    rgba[:, :3, 3] = 0  # left half transparent
    rgba[:, 3:, 3] = 255
    path = save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "rgba.png")
    out = read_image(path)
    assert out.shape == (4, 6)
    assert (out[:, :3] == 0).all() and (out[:, 3:] == 200).all()


def test_la_alpha_is_composited_on_black(tmp_path):
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0] = 200
    la[..., 1] = 128
    path = save(Image.fromarray(la, mode="LA"), tmp_path / "la.png")
    assert read_image(path)[0, 0] == round(200 * 128 / 255)


def test_palette_image(tmp_path):
    pixels = gradient()
    palette_image = Image.fromarray(np.stack([pixels] * 3, axis=-1), mode="RGB").quantize(64)
    assert palette_image.mode == "P"
    path = save(palette_image, tmp_path / "palette.png")
    out = read_image(path)
    expected = np.asarray(palette_image.convert("L"))
    np.testing.assert_array_equal(out, expected)


def test_bilevel_and_cmyk(tmp_path):
    bits = Image.fromarray(gradient() > 100)
    assert bits.mode == "1"
    out = read_image(save(bits, tmp_path / "bits.png"))
    assert set(np.unique(out)) <= {0, 255}
    cmyk = Image.new("CMYK", (5, 3), (0, 0, 0, 0))  # no ink: white
    assert (read_image(save(cmyk, tmp_path / "cmyk.jpg", quality=95)) > 250).all()


def test_jpeg(tmp_path):
    pixels = np.kron(np.array([[0, 255], [128, 64]], np.uint8), np.ones((16, 16), np.uint8))
    path = save(Image.fromarray(pixels), tmp_path / "scan.jpg", quality=95)
    out = read_image(path)
    assert out.shape == pixels.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - pixels).mean() < 3  # lossy, but close


def test_exif_orientation_is_applied(tmp_path):
    # a wide image stored with orientation 6 (rotate 90 degrees clockwise to view)
    pixels = np.zeros((16, 48), np.uint8)
    pixels[:, :16] = 255  # bright block at the left of the stored image
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = save(Image.fromarray(pixels), tmp_path / "phone.jpg", exif=exif, quality=95)
    out = read_image(path)
    assert out.shape == (48, 16)  # transposed
    upright = np.rot90(pixels, k=-1)  # clockwise: the left block ends up at the top
    assert np.abs(out.astype(int) - upright).mean() < 5
    assert out[:16].mean() > 200 and out[16:].mean() < 50


def test_file_object_and_bytes_sources(tmp_path):
    pixels = gradient()
    path = save(Image.fromarray(pixels), tmp_path / "gray.png")
    with open(path, "rb") as handle:
        np.testing.assert_array_equal(read_image(handle), pixels)
        assert not handle.closed  # the caller's stream stays open
    np.testing.assert_array_equal(read_image(path.read_bytes()), pixels)
    np.testing.assert_array_equal(read_image(str(path)), pixels)


# ----------------------------------------------------------------------------- bad files


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ImageReadError, match="no_such_scan.png") as caught:
        read_image(tmp_path / "no_such_scan.png")
    assert caught.value.path.endswith("no_such_scan.png")
    assert isinstance(caught.value, OSError)


def test_truncated_png_names_the_file(tmp_path):
    path = save(Image.fromarray(gradient(64, 64)), tmp_path / "cut.png")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(path)


def test_truncated_jpeg_names_the_file(tmp_path):
    path = save(Image.fromarray(gradient(64, 64)), tmp_path / "cut.jpg")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        read_image(path)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("notes.png", b"this is not an image", "unknown image format"),
        ("empty.png", b"", "empty"),
        ("scan.dcm", b"\0" * 128 + b"DICM" + b"\0" * 64, "DICOM"),
    ],
)
def test_unreadable_content_names_the_file_and_why(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as caught:
        read_image(path)
    assert name in str(caught.value)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)


def test_error_survives_pickling():
    error = ImageReadError("a/b.png", "no such file")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.path == "a/b.png" and str(copy) == str(error)


def test_bad_normalize_argument_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="normalize"):
        read_image(b"", normalize="zscore")


# ----------------------------------------------------------------------------- masks


def test_read_mask_thresholds_and_accepts_label_maps(tmp_path):
    mask = np.zeros((8, 8), bool)
    mask[2:6, 3:7] = True
    as_255 = write_png(tmp_path / "mask255.png", mask)
    as_01 = save(Image.fromarray(mask.astype(np.uint8)), tmp_path / "mask01.png")
    for path in (as_255, as_01):
        out = read_mask(path)
        assert out.dtype == bool
        np.testing.assert_array_equal(out, mask)
    gray = save(Image.fromarray(np.array([[100, 130]], np.uint8)), tmp_path / "soft.png")
    np.testing.assert_array_equal(read_mask(gray), [[False, True]])
    np.testing.assert_array_equal(read_mask(gray, threshold=50), [[True, True]])


# ----------------------------------------------------------------------------- batches


def test_load_images_carries_on_past_bad_files(tmp_path):
    good = [write_png(tmp_path / f"ok{i}.png", gradient() + i) for i in range(3)]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    missing = tmp_path / "gone.png"
    paths = [good[0], corrupt, good[1], missing, good[2]]

    images, report = load_images(paths)

    assert [image is None for image in images] == [False, True, False, True, False]
    np.testing.assert_array_equal(images[2], gradient() + 1)
    assert isinstance(report, LoadReport)
    assert report.n_ok == 3 and report.n_bad == 2 and not report.ok
    assert [bad.path for bad in report.bad] == [str(corrupt), str(missing)]
    frame = report.to_frame()
    assert list(frame.columns) == ["path", "error"] and len(frame) == 2
    text = str(report)
    assert "corrupt.png" in text and "gone.png" in text and "3 of 5" in text


def test_load_report_text_caps_long_lists():
    report = LoadReport(n_ok=1, bad=[BadFile(f"f{i}.png", "broken") for i in range(30)])
    text = str(report)
    assert "f19.png" in text and "f25.png" not in text and "10 more" in text
    assert "no unreadable" in str(LoadReport(n_ok=2))


def test_load_images_passes_read_options(tmp_path):
    path = write_png(tmp_path / "deep.png", np.full((4, 4), 1000, np.uint16))
    images, report = load_images([path], normalize="dtype")
    assert report.ok and images[0].max() == round(1000 / 65535 * 255)
    with pytest.raises(ValueError):
        load_images([path], normalize="nope")


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize(
    "array",
    [
        gradient(),
        gradient() > 90,
        (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16),
    ],
    ids=["uint8", "bool", "uint16"],
)
def test_write_png_round_trip(tmp_path, array):
    path = write_png(tmp_path / "nested" / "deeper" / "out.png", array)
    assert path == tmp_path / "nested" / "deeper" / "out.png" and path.is_file()
    with Image.open(path) as image:
        stored = np.asarray(image)
    if array.dtype == bool:
        np.testing.assert_array_equal(stored, array.astype(np.uint8) * 255)
        np.testing.assert_array_equal(read_mask(path), array)
    else:
        assert stored.dtype == array.dtype
        np.testing.assert_array_equal(stored, array)
    assert [p.name for p in path.parent.iterdir()] == ["out.png"]  # no temporary left


def test_write_png_replaces_and_cleans_up_on_failure(tmp_path):
    path = write_png(tmp_path / "out.png", gradient())
    write_png(path, gradient() // 2)
    np.testing.assert_array_equal(read_image(path), gradient() // 2)
    with pytest.raises(ValueError, match="float"):
        write_png(path, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        write_png(path, np.zeros((4, 4, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    np.testing.assert_array_equal(read_image(path), gradient() // 2)  # old file intact


# ----------------------------------------------------------------------------- hashes


def test_pixel_hash_matches_lossless_reencoding(tmp_path):
    pixels = gradient()
    first = save(Image.fromarray(pixels), tmp_path / "a.png", compress_level=0)
    second = save(Image.fromarray(pixels), tmp_path / "b.png", compress_level=9)
    rgb_copy = save(Image.fromarray(np.stack([pixels] * 3, axis=-1)), tmp_path / "c.png")
    assert first.read_bytes() != second.read_bytes()
    hashes = {pixel_hash(read_image(p)) for p in (first, second, rgb_copy)}
    assert len(hashes) == 1
    changed = pixels.copy()
    changed[0, 0] ^= 1
    assert pixel_hash(changed) not in hashes


def test_pixel_hash_depends_on_shape_and_dtype_not_byte_order():
    values = np.arange(12, dtype=np.uint16)
    assert pixel_hash(values.reshape(3, 4)) != pixel_hash(values.reshape(4, 3))
    assert pixel_hash(values.astype(np.uint8)) != pixel_hash(values)
    assert pixel_hash(values) == pixel_hash(values.astype(">u2"))
    assert len(pixel_hash(values)) == 64
    with pytest.raises(TypeError):
        pixel_hash(np.array(["a"], dtype=object))


def test_pixel_hash_on_bytes_stream():
    buffer = io.BytesIO()
    Image.fromarray(gradient()).save(buffer, format="PNG")
    assert pixel_hash(read_image(buffer.getvalue())) == pixel_hash(gradient())
