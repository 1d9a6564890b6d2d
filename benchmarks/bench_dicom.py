"""DICOM throughput: header records (what the RSNA adapter reads) and full image decodes.

Writes ``--n`` synthetic DICOM files of two kinds into a temporary folder:

- ``rsna``: 1024x1024 8-bit MONOCHROME2, JPEG baseline (the RSNA Pneumonia files' format),
  ``PatientAge`` written as a bare number as RSNA does;
- ``cr12``: ``--cr-size`` square 12-bit MONOCHROME1, uncompressed, with a window.

and times :func:`cxrlib.data.dicom.dicom_record` (header only, files per second) and
:func:`cxrlib.data.dicom.read_dicom` (decode + LUT / window + 8-bit, images per second),
each as the median of ``--repeats`` rounds. The file system cache is warm after writing,
so these are CPU numbers, not disk numbers.

Usage::

    python benchmarks/bench_dicom.py --n 200

Writes ``benchmarks/results/dicom.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
from _common import write_result
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxrlib.data.dicom import dicom_record, read_dicom

HERE = Path(__file__).resolve().parent


def _write(path: Path, kind: str, index: int, cr_size: int, rng: np.random.Generator) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if kind == "rsna" else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientSex, ds.ViewPosition, ds.Modality = f"id-{index}", "M", "PA", "CR"
    ds.SamplesPerPixel = 1
    if kind == "rsna":
        ds.PatientAge = str(20 + index % 60)
        pixels = rng.integers(0, 256, (1024, 1024), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        ds.Rows = ds.Columns = 1024
        ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "MONOCHROME2", 8, 8, 7
        ds.PixelRepresentation = 0
        ds.PixelData = encapsulate([buffer.getvalue()])
    else:
        ds.PatientAge = "045Y"
        pixels = rng.integers(0, 4096, (cr_size, cr_size), dtype=np.uint16)
        ds.Rows = ds.Columns = cr_size
        ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "MONOCHROME1", 16, 12, 11
        ds.PixelRepresentation = 0
        ds.WindowCenter, ds.WindowWidth = 2048, 3000
        ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _time(function, paths: list[Path], repeats: int) -> dict:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            function(path)
        rates.append(len(paths) / (time.perf_counter() - start))
    return {"per_s": round(statistics.median(rates), 1), "per_s_best": round(max(rates), 1),
            "per_s_worst": round(min(rates), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="files of each kind")
    parser.add_argument("--cr-size", type=int, default=2048, help="side of the 12-bit images")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "dicom.json")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    result: dict = {"benchmark": "dicom", "n": args.n, "cr_size": args.cr_size, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("rsna", "cr12"):
            paths = [Path(tmp) / f"{kind}-{i}.dcm" for i in range(args.n)]
            with warnings.catch_warnings():  # bare RSNA-style ages are "invalid" AS values
                warnings.filterwarnings("ignore", message="Invalid value for VR")
                for i, path in enumerate(paths):
                    _write(path, kind, i, args.cr_size, rng)
            headers = _time(lambda p: dicom_record(p, salt="bench"), paths, args.repeats)
            images = _time(read_dicom, paths, args.repeats)
            result[kind] = {"dicom_record": headers, "read_dicom": images,
                            "mean_file_bytes": int(np.mean([p.stat().st_size for p in paths]))}
            print(f"{kind}: dicom_record {headers['per_s']} files/s, read_dicom {images['per_s']} images/s")
    result.update({
        "pydicom": pydicom.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    })
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
