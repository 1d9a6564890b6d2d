"""Fetching public chest X-ray datasets: open archives downloaded, checked and unpacked safely.

Two kinds of source live in :data:`SOURCES`:

- :class:`DirectSource`: files with an open, direct download address (GitHub archives and
  releases, the NLM tuberculosis sets). :func:`download` fetches each with resume
  (HTTP ``Range`` into ``<file>.part``), checks its SHA-256 / MD5 where one is published
  (otherwise prints and records the computed SHA-256), renames it into place, and
  unpacks it into ``<to>/<folder>`` without letting any archive member land outside
  that folder.
- :class:`ManualSource`: datasets behind a login, a licence agreement or a file host
  without stable links (Kaggle, Stanford AIMI, NIH Box, Mendeley, JSRT). Nothing is
  fetched: :func:`download` raises :class:`ManualDownloadRequired` whose message says
  where to get the files and which folder layout the dataset's adapter
  (:mod:`cxrlib.data.sources`) expects.

Offline machine: download the archive elsewhere, put it at ``<to>/<file name>`` (the
name ``python -m cxrlib data list`` shows) and run the same command; an archive already
there is checked and unpacked without a network connection.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import struct
import sys
import tarfile
import urllib.error
import urllib.request
import uuid
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO

from cxrlib.data.sources import ADAPTERS
from cxrlib.errors import CxrInputError

#: Archive formats :func:`safe_extract` unpacks; ``None`` in a :class:`RemoteFile` = a plain file.
ARCHIVE_FORMATS: tuple[str, ...] = ("zip", "tar", "tar.gz")
#: Bytes read per chunk while downloading and hashing.
CHUNK_SIZE = 1 << 20
#: Archive members that are packaging debris, not data (macOS resource forks, Finder files).
_JUNK = re.compile(r"(^|/)(__MACOSX(/|$)|\.DS_Store$)")
#: Errors that mean "the network or the server did not answer properly".
_NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                   http.client.HTTPException)


def _member_problem(name: str) -> str | None:
    """Why an archive path is unsafe (absolute, drive letter, ``..``), or ``None``."""
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        return "has an absolute path"
    if ".." in PurePosixPath(normalized).parts:
        return "has '..' in its path (it would land outside the target folder)"
    if "\0" in normalized:
        return "has a NUL byte in its name"
    return None



class DownloadError(RuntimeError):
    """A download or unpack that failed; the message says what happened and what to do."""


class ChecksumError(DownloadError):
    """A downloaded file whose SHA-256 / MD5 differs from the published one."""


class ArchiveError(DownloadError, CxrInputError):
    """An archive :func:`safe_extract` refuses or cannot read; the message names it and why."""


class ArchiveLimitError(ArchiveError):
    """An archive over a :class:`ExtractLimits` bound (size, compression ratio, member count)."""


class UnsafeArchiveError(ArchiveError):
    """An archive member that would be written outside the target folder (or is a device)."""

    def __init__(self, archive: str | os.PathLike, member: str, reason: str) -> None:
        self.archive = str(archive)
        self.member = member
        super().__init__(f"refusing to unpack {self.archive}: member {member!r} {reason}")


class ManualDownloadRequired(DownloadError):
    """A source that cannot be fetched automatically; the message says how to get it."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file of a source.

    ``unpacks_to`` is the folder (relative to the download folder) the archive's contents
    end up in; when an archive holds a single top-level folder, that folder's contents
    are what ``unpacks_to`` receives (so ``repo-master/`` wrappers disappear). A plain
    file (``archive=None``) is placed in that folder under ``filename``.
    """

    url: str
    filename: str
    unpacks_to: str
    archive: str | None = "zip"
    sha256: str | None = None
    md5: str | None = None

    def __post_init__(self) -> None:
        if self.archive is not None and self.archive not in ARCHIVE_FORMATS:
            raise ValueError(f"{self.filename}: archive must be one of {ARCHIVE_FORMATS} or None")
        plain = self.filename and "/" not in self.filename and self.unpacks_to.strip("/")
        if not plain or _member_problem(self.unpacks_to) or _member_problem(self.filename):
            raise ValueError(f"{self.filename}: file name and unpacks_to must be plain relative names")


@dataclass(frozen=True)
class DirectSource:
    """A dataset whose files have open, direct download addresses."""

    name: str
    title: str
    files: tuple[RemoteFile, ...]
    homepage: str
    size: str
    license: str
    citation: str
    adapter: str | None = None
    notes: str = ""

    @property
    def folders(self) -> tuple[str, ...]:
        """The folders the files unpack to, relative to the download folder."""
        return tuple(item.unpacks_to for item in self.files)


@dataclass(frozen=True)
class ManualSource:
    """A dataset behind a login / agreement: how to get it, and where its files go."""

    name: str
    title: str
    homepage: str
    access: str
    steps: str
    layout: str
    license: str
    citation: str
    adapter: str | None = None
    #: Folder inside the dataset folder that the adapter reads, when it is not the top one.
    adapter_subfolder: str = ""

    def instructions(self, to: str | os.PathLike | None = None) -> str:
        """The message :func:`download` raises: where to get the files and where to put them."""
        folder = Path(to) / self.name if to is not None else Path("<DIR>") / self.name
        adapter_root = folder / self.adapter_subfolder if self.adapter_subfolder else folder
        adapter = (
            f"\nThen read it with the '{self.adapter}' adapter: "
            f"cxrlib.data.sources.open_dataset({self.adapter!r}, {str(adapter_root)!r})."
            if self.adapter else ""
        )
        return (
            f"{self.title} cannot be downloaded automatically ({self.access}).\n"
            f"Get it from: {self.homepage}\n"
            f"{self.steps}\n"
            f"Put the files in {folder} so that it looks like:\n"
            + "\n".join(f"    {line}" for line in self.layout.strip().splitlines())
            + adapter
            + f"\nLicense: {self.license}"
        )


Source = DirectSource | ManualSource


#: Known sources by name (the names of their adapters in :data:`cxrlib.data.sources.ADAPTERS`).
#: License and citation are the adapter's (written once, on the adapter class).
SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        DirectSource(
            name="ieee8023",
            title="COVID-19 image data collection (Cohen et al., ieee8023 on GitHub)",
            files=(RemoteFile(
                url="https://github.com/ieee8023/covid-chestxray-dataset/archive/refs/heads/master.zip",
                filename="covid-chestxray-dataset-master.zip",
                unpacks_to="covid-chestxray-dataset",
            ),),
            homepage="https://github.com/ieee8023/covid-chestxray-dataset",
            size="several hundred MB (the whole repository, CT volumes included)",
            license=ADAPTERS["ieee8023"].license,
            citation=ADAPTERS["ieee8023"].citation,
            adapter="ieee8023",
            notes="The archive of a moving branch: no published checksum (the computed SHA-256 "
                  "is recorded so a run can name the exact snapshot).",
        ),
        DirectSource(
            name="zunair2021",
            title="Synthetic COVID-19 chest X-rays (Zunair & Hamza 2021), release v0.1",
            files=(
                RemoteFile(
                    url="https://github.com/hasibzunair/synthetic-covid-cxr-dataset/releases/download/v0.1/G_NC.zip",
                    filename="G_NC.zip",
                    unpacks_to="zunair2021/G_NC",
                    # MD5 as listed for this release asset by DeepMind's dm_nevis dataset catalogue
                    md5="bd82149d00283fca892bc41e997a3070",
                ),
                RemoteFile(
                    url="https://github.com/hasibzunair/synthetic-covid-cxr-dataset/releases/download/v0.1/G_PC.zip",
                    filename="G_PC.zip",
                    unpacks_to="zunair2021/G_PC",
                    md5="acf56668f97be81fd8c05c4308f80c61",
                ),
            ),
            homepage="https://github.com/hasibzunair/synthetic-covid-cxr-dataset/releases/tag/v0.1",
            size="21,295 PNG images in two archives",
            license=ADAPTERS["zunair2021"].license,
            citation=ADAPTERS["zunair2021"].citation,
            adapter="zunair2021",
            notes="G_NC: made from Normal images, G_PC: from Pneumonia images. No SHA-256 is "
                  "published; the MD5 sums are checked.",
        ),
        DirectSource(
            name="montgomery",
            title="Montgomery County tuberculosis chest X-ray set (NLM)",
            files=(RemoteFile(
                url="https://openi.nlm.nih.gov/imgs/collections/NLM-MontgomeryCXRSet.zip",
                filename="NLM-MontgomeryCXRSet.zip",
                unpacks_to="MontgomerySet",
            ),),
            homepage="https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/"
                     "Montgomery-County-CXR-Set/MontgomerySet/index.html",
            size="138 PNG images with lung masks, about 0.6 GB",
            license=ADAPTERS["montgomery"].license,
            citation=ADAPTERS["montgomery"].citation,
            adapter="montgomery",
            notes="The long-standing Open-i address; if it fails, the same files are listed "
                  "one by one on the NLM page (homepage).",
        ),
        DirectSource(
            name="shenzhen",
            title="Shenzhen tuberculosis chest X-ray set (NLM / Shenzhen No.3 People's Hospital)",
            files=(RemoteFile(
                url="https://openi.nlm.nih.gov/imgs/collections/ChinaSet_AllFiles.zip",
                filename="ChinaSet_AllFiles.zip",
                unpacks_to="ChinaSet_AllFiles",
            ),),
            homepage="https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/"
                     "Shenzhen-Hospital-CXR-Set/index.html",
            size="662 PNG images, several GB",
            license=ADAPTERS["shenzhen"].license,
            citation=ADAPTERS["shenzhen"].citation,
            adapter="shenzhen",
            notes="The long-standing Open-i address; if it fails, use the NLM page (homepage).",
        ),
        ManualSource(
            name="covid19-radiography",
            title="COVID-19 Radiography Database (Kaggle)",
            homepage="https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
            access="Kaggle account required",
            steps="With the Kaggle CLI and an API token: kaggle datasets download -d "
                  "tawsifurrahman/covid19-radiography-database, then unzip.",
            layout="COVID-19_Radiography_Dataset/\n"
                   "  COVID/images/COVID-1.png ...   COVID/masks/COVID-1.png ...\n"
                   "  Normal/  Lung_Opacity/  Viral Pneumonia/   (same images/ + masks/)",
            license=ADAPTERS["covid19-radiography"].license,
            citation=ADAPTERS["covid19-radiography"].citation,
            adapter="covid19-radiography",
        ),
        ManualSource(
            name="rsna-pneumonia",
            title="RSNA Pneumonia Detection Challenge (Kaggle competition)",
            homepage="https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data",
            access="Kaggle account and acceptance of the competition rules required",
            steps="Accept the rules on the competition page, then: kaggle competitions download "
                  "-c rsna-pneumonia-detection-challenge, and unzip.",
            layout="stage_2_train_labels.csv\n"
                   "stage_2_detailed_class_info.csv\n"
                   "stage_2_train_images/<patientId>.dcm   (26,684 DICOM files)",
            license=ADAPTERS["rsna-pneumonia"].license,
            citation=ADAPTERS["rsna-pneumonia"].citation,
            adapter="rsna-pneumonia",
        ),
        ManualSource(
            name="chexpert",
            title="CheXpert (Stanford)",
            homepage="https://stanfordmlgroup.github.io/competitions/chexpert/",
            access="registration and the Stanford CheXpert Research Use Agreement required",
            steps="Register on the page; the download link arrives by e-mail. The small "
                  "version (CheXpert-v1.0-small, about 11 GB) is enough on a CPU.",
            layout="CheXpert-v1.0-small/\n"
                   "  train.csv  valid.csv\n"
                   "  train/patient00001/study1/view1_frontal.jpg ...",
            license=ADAPTERS["chexpert"].license,
            citation=ADAPTERS["chexpert"].citation,
            adapter="chexpert",
            adapter_subfolder="CheXpert-v1.0-small",
        ),
        ManualSource(
            name="nih-cxr14",
            title="NIH ChestX-ray14 (NIH Clinical Center)",
            homepage="https://nihcc.app.box.com/v/ChestXray-NIHCC",
            access="files are shared through Box folder links, not stable direct addresses",
            steps="Download Data_Entry_2017_v2020.csv and images_001.tar.gz ... images_012.tar.gz "
                  "(about 42 GB) from the Box folder (or Kaggle: nih-chest-xrays/data), then "
                  "unpack every archive in the same folder (each holds images/).",
            layout="Data_Entry_2017_v2020.csv   (or Data_Entry_2017.csv)\n"
                   "images/00000001_000.png ...",
            license=ADAPTERS["nih-cxr14"].license,
            citation=ADAPTERS["nih-cxr14"].citation,
            adapter="nih-cxr14",
        ),
        ManualSource(
            name="kermany",
            title="Guangzhou paediatric pneumonia chest X-rays (Kermany et al. 2018)",
            homepage="https://data.mendeley.com/datasets/rscbjbr9sj/2",
            access="Mendeley Data hands out temporary links; the Kaggle copy needs an account",
            steps="Download ChestXRay2017.zip from Mendeley Data (or kaggle datasets download -d "
                  "paultimothymooney/chest-xray-pneumonia), then unzip.",
            layout="chest_xray/\n"
                   "  train/NORMAL/*.jpeg   train/PNEUMONIA/*.jpeg\n"
                   "  test/...   val/...",
            license=ADAPTERS["kermany"].license,
            citation=ADAPTERS["kermany"].citation,
            adapter="kermany",
        ),
        ManualSource(
            name="jsrt",
            title="JSRT chest X-ray database (with SCR lung masks)",
            homepage="http://db.jsrt.or.jp/eng.php",
            access="registration with the Japanese Society of Radiological Technology required",
            steps="Request the database on the JSRT page; get the SCR masks from "
                  "https://www.isi.uu.nl/Research/Databases/SCR/ and unpack them in the same folder.",
            layout="All247images/JPCLN001.IMG ... JPCNN093.IMG   (raw 2048x2048 12-bit)\n"
                   "masks/left lung/*.gif   masks/right lung/*.gif   masks/heart/*.gif",
            license=ADAPTERS["jsrt"].license,
            citation=ADAPTERS["jsrt"].citation,
            adapter="jsrt",
        ),
    )
}


# ---------------------------------------------------------------------------- transfer


@dataclass
class FetchResult:
    """A file :func:`fetch` put in place: where, how big, its hashes, whether it was resumed."""

    path: Path
    size: int
    sha256: str
    md5: str
    resumed: bool = False
    verified: bool = False


def file_hashes(path: str | os.PathLike) -> tuple[str, str]:
    """SHA-256 and MD5 hex digests of a file, in one pass."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK_SIZE):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _offline_message(url: str, error: object, dest: Path, part: Path) -> str:
    resume = f" The partial download in {part} is resumed on the next run." if part.exists() else ""
    return (
        f"could not download {url}: {error}. This machine may be offline, or the server "
        f"unreachable. Retry later, or download the file on a machine with internet access "
        f"and put it at {dest}; the same command then checks and unpacks it without a "
        f"network connection.{resume}"
    )


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """``'bytes 100-199/1000'`` -> (100, 1000); ``'bytes */1000'`` -> (None, 1000)."""
    match = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", header or "")
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _copy(response: IO[bytes], out: IO[bytes], *, total: int | None, offset: int,
          url: str, progress: bool) -> None:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=url.rsplit("/", 1)[-1], file=sys.stderr)
    try:
        while chunk := response.read(CHUNK_SIZE):
            out.write(chunk)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


def fetch(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = False,
    timeout: float = 60.0,
    hint: str = "",
    log: Callable[[str], None] | None = None,
) -> FetchResult:
    """Download ``url`` to ``dest`` through ``<dest>.part``, resuming, checking, renaming.

    A ``<dest>.part`` left by an interrupted run is resumed with an HTTP ``Range``
    request; a server that ignores ``Range`` (answers 200 instead of 206) makes the
    download start again from byte 0. When the transfer is complete its SHA-256 (and MD5)
    are computed; if ``sha256`` / ``md5`` is given and differs, the ``.part`` file is
    deleted and :class:`ChecksumError` raised, so ``dest`` never holds a bad file. On
    success ``.part`` is renamed to ``dest`` atomically.

    Parameters
    ----------
    url, dest
        What to fetch and where the finished file goes (its folder is created).
    sha256, md5
        Published checksums (hex, any case), or ``None`` when none is published.
    progress
        Show a tqdm bar on stderr.
    timeout
        Seconds to wait for the server on connect and on each read.
    hint
        Appended to HTTP error messages (e.g. the source's home page).
    log
        Called with one-line notes (resume, restart); default: silent.

    Raises
    ------
    DownloadError
        Network failure or HTTP error, with the URL and what to do (the message covers
        offline machines); an interrupted transfer keeps ``.part`` for the next run.
    ChecksumError
        Published checksum differs from the downloaded file's.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    note = log or (lambda message: None)
    resumed = False
    for _attempt in range(2):  # a second attempt only after a refused / ignored resume
        offset = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "cxrlib-download/1"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as error:
            error.close()
            if error.code == 416 and offset:
                _, total = _content_range(error.headers.get("Content-Range"))
                if total == offset:  # the partial file is already complete
                    note(f"{part.name} is already complete ({offset} bytes)")
                    resumed = True
                    break
                note(f"server refused to resume {part.name} (HTTP 416); starting again")
                part.unlink()
                continue
            part_note = f" The partial download in {part} is kept." if part.exists() else ""
            raise DownloadError(
                f"could not download {url}: the server answered HTTP {error.code} "
                f"{error.reason}.{part_note} {hint}".rstrip()
            ) from None
        except _NETWORK_ERRORS as error:
            reason = getattr(error, "reason", error)
            raise DownloadError(_offline_message(url, reason, dest, part)) from error
        with response:
            status = getattr(response, "status", 200)
            length = response.headers.get("Content-Length")
            mode = "wb"
            if offset and status == 206:
                start, _ = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    note(f"server resumed {part.name} at byte {start}, not {offset}; starting again")
                    part.unlink()
                    continue
                mode, resumed = "ab", True
                note(f"resuming {part.name} at byte {offset}")
            elif offset:
                note(f"server does not support resuming (HTTP {status}); downloading {dest.name} again")
                offset = 0
            expected = offset + int(length) if length and length.isdigit() else None
            try:
                with open(part, mode) as out:
                    _copy(response, out, total=expected, offset=offset, url=url, progress=progress)
            except _NETWORK_ERRORS as error:
                raise DownloadError(
                    f"download of {url} was interrupted ({error}); run the same command again to "
                    f"resume from {part} ({part.stat().st_size} bytes so far)"
                ) from error
        size = part.stat().st_size
        if expected is not None and size != expected:
            raise DownloadError(
                f"download of {url} stopped at {size} of {expected} bytes; run the same "
                f"command again to resume from {part}"
            )
        break
    else:
        raise DownloadError(f"could not resume or restart the download of {url}; delete {part} and retry")
    return _verify_and_place(part, dest, url=url, sha256=sha256, md5=md5, resumed=resumed, discard=True)


def _verify_and_place(source: Path, dest: Path, *, url: str, sha256: str | None, md5: str | None,
                      resumed: bool, discard: bool) -> FetchResult:
    """Hash ``source``; on a checksum mismatch delete it (``discard``) and raise; else move to ``dest``."""
    got_sha, got_md5 = file_hashes(source)
    for kind, want, got in (("SHA-256", sha256, got_sha), ("MD5", md5, got_md5)):
        if want and want.lower() != got:
            if discard:
                source.unlink(missing_ok=True)
            kept = "deleted it" if discard else f"left {source} in place; delete or replace it"
            raise ChecksumError(
                f"{source.name} from {url} has {kind} {got}, expected {want}; the file is damaged "
                f"or was replaced on the server ({kept}). Run the command again to download "
                f"it afresh; if the mismatch persists, the published checksum may be outdated."
            )
    if source != dest:
        os.replace(source, dest)
    return FetchResult(path=dest, size=dest.stat().st_size, sha256=got_sha, md5=got_md5,
                       resumed=resumed, verified=bool(sha256 or md5))


# ---------------------------------------------------------------------------- extraction


def _inside(base: Path, relative: str) -> bool:
    base = base.resolve()
    target = (base / relative).resolve()
    return target == base or base in target.parents


def _check_space(archive: Path, needed: int, folder: Path) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ArchiveLimitError(
            f"refusing to unpack {archive}: it declares {needed / 1e9:.1f} GB, only "
            f"{free / 1e9:.1f} GB free in {folder}"
        )


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds :func:`safe_extract` enforces on an archive, counted on the bytes actually written.

    ``max_total_bytes``: everything unpacked together. ``max_ratio``: bytes written per byte of
    compressed input, for each zip member (against its compressed size) and for the whole
    archive (against the archive file's size); only checked once more than
    ``ratio_floor_bytes`` are written, so small, very compressible files (a CSV of zeros)
    pass. ``max_members``: entries in the archive. The defaults hold every open chest X-ray
    archive this project knows (the largest, NIH's, is 4 GB per part at ratio ~1; text and
    repository archives stay below 20:1) and stop a 1000:1 deflate bomb after
    ``ratio_floor_bytes``.
    """

    max_total_bytes: int = 100 * 1024**3
    max_ratio: float = 200.0
    max_members: int = 500_000
    ratio_floor_bytes: int = 16 * 1024**2

    def __post_init__(self) -> None:
        if min(self.max_total_bytes, self.max_members, self.ratio_floor_bytes) < 0 \
                or not self.max_ratio >= 1:
            raise ValueError(f"ExtractLimits needs non-negative sizes and max_ratio >= 1, got {self}")


#: The limits :func:`safe_extract` and :func:`download` use unless told otherwise.
DEFAULT_LIMITS = ExtractLimits()


class _Budget:
    """Counts bytes as they are written and refuses the archive the moment a limit is crossed."""

    def __init__(self, archive: Path, into: Path, limits: ExtractLimits) -> None:
        self.archive, self.into, self.limits = archive, into, limits
        self.archive_bytes = max(1, archive.stat().st_size)
        self.total = 0

    def refuse(self, member: str, reason: str) -> ArchiveLimitError:
        return ArchiveLimitError(f"refusing to unpack {self.archive}: member {member!r} {reason}")

    def count_members(self, count: int) -> None:
        if count > self.limits.max_members:
            raise ArchiveLimitError(
                f"refusing to unpack {self.archive}: more than {self.limits.max_members} members "
                f"(ExtractLimits.max_members)")

    def check_declared(self, member: str, total: int) -> None:
        """Refuse before writing when the sizes declared so far already break a limit.

        For tar this runs while the headers are read, so a compressed stream is not inflated
        past a limit just to find the next header."""
        limits = self.limits
        if total > limits.max_total_bytes:
            raise self.refuse(member, f"takes the declared unpacked size to {total} bytes, past the "
                                      f"limit of {limits.max_total_bytes} (ExtractLimits.max_total_bytes)")
        if total > limits.ratio_floor_bytes and total > limits.max_ratio * self.archive_bytes:
            raise self.refuse(member, f"takes the archive past {limits.max_ratio:g}:1 ({total} "
                                      f"bytes declared in a {self.archive_bytes}-byte file; "
                                      "ExtractLimits.max_ratio): a decompression bomb")

    def add(self, member: str, written: int, chunk: int, *, declared: int | None,
            compressed: int | None) -> int:
        """Account for ``chunk`` more bytes of ``member`` (``written`` so far); returns the new count."""
        written += chunk
        self.total += chunk
        limits = self.limits
        if self.total > limits.max_total_bytes:
            raise self.refuse(member, f"takes the unpacked size past the limit of "
                                      f"{limits.max_total_bytes} bytes (ExtractLimits.max_total_bytes)")
        if declared is not None and written > declared:
            raise self.refuse(member, f"writes more than its declared {declared} bytes (the archive "
                                      "header lies)")
        if written > limits.ratio_floor_bytes and compressed is not None \
                and written > limits.max_ratio * max(1, compressed):
            raise self.refuse(member, f"expands more than {limits.max_ratio:g}:1 ({written} bytes "
                                      f"from {compressed} compressed; ExtractLimits.max_ratio): a "
                                      "decompression bomb")
        if self.total > limits.ratio_floor_bytes \
                and self.total > limits.max_ratio * self.archive_bytes:
            raise self.refuse(member, f"takes the archive past {limits.max_ratio:g}:1 ({self.total} "
                                      f"bytes from a {self.archive_bytes}-byte file; "
                                      "ExtractLimits.max_ratio): a decompression bomb")
        return written


def _write_counted(source: IO[bytes], dest: Path, budget: _Budget, member: str, *,
                   declared: int | None, compressed: int | None) -> None:
    """Copy ``source`` to the new file ``dest`` chunk by chunk, checking ``budget`` after each.

    ``dest``'s folder is resolved on disk first: links unpacked earlier must not lead outside."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder, base = Path(os.path.realpath(dest.parent)), budget.into.resolve()
    if folder != base and base not in folder.parents:
        raise UnsafeArchiveError(budget.archive, member, "would be written through a link outside "
                                                         "the target folder")
    written = 0
    with open(dest, "xb") as out:
        while True:
            chunk = source.read(CHUNK_SIZE)
            if not chunk:
                break
            written = budget.add(member, written, len(chunk), declared=declared, compressed=compressed)
            out.write(chunk)


def _zip_entry_count(archive: Path) -> int | None:
    """Entries the zip's end record declares, read before the central directory is parsed."""
    try:
        with open(archive, "rb") as stream:
            record = zipfile._EndRecData(stream)  # type: ignore[attr-defined]
    except (OSError, ValueError, struct.error):
        return None
    return None if not record else int(record[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]


def _extract_zip(archive: Path, into: Path, limits: ExtractLimits) -> None:
    budget = _Budget(archive, into, limits)
    declared_entries = _zip_entry_count(archive)
    if declared_entries is not None:
        budget.count_members(declared_entries)
    try:
        handle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
            struct.error, NotImplementedError, UnicodeDecodeError) as error:
        raise ArchiveError(f"{archive} is not a readable zip archive ({error})") from None
    with handle:
        infos = handle.infolist()
        budget.count_members(len(infos))
        members = [info for info in infos if not _JUNK.search(info.filename)]
        for info in members:
            problem = _member_problem(info.filename)
            if problem is None and (info.external_attr >> 16) & 0o170000 == 0o120000:
                problem = "is a symbolic link (not unpacked from zip archives)"
            if problem is None and not _inside(into, info.filename):
                problem = "would land outside the target folder"
            if problem:
                raise UnsafeArchiveError(archive, info.filename, problem)
        declared = 0
        for info in members:
            declared += info.file_size
            budget.check_declared(info.filename, declared)
        _check_space(archive, sum(info.file_size for info in members), into)
        try:
            for info in members:
                dest = into / info.filename
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                with handle.open(info) as source:
                    _write_counted(source, dest, budget, info.filename, declared=info.file_size,
                                   compressed=info.compress_size)
        except ArchiveError:
            raise
        except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, ValueError, struct.error,
                NotImplementedError, zlib.error, LookupError) as error:
            raise ArchiveError(f"cannot unpack {archive}: {type(error).__name__}: {error}") from error


def _tar_problem(member: tarfile.TarInfo, into: Path) -> str | None:
    problem = _member_problem(member.name)
    if problem:
        return problem
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        return "is a device or FIFO"
    if member.issym():
        link = member.linkname.replace("\\", "/")
        if link.startswith("/") or re.match(r"^[A-Za-z]:", link):
            return f"is a symbolic link to an absolute path ({member.linkname})"
        if not _inside(into, str(PurePosixPath(member.name).parent / link)):
            return f"is a symbolic link pointing outside the target folder ({member.linkname})"
    if member.islnk():
        link_problem = _member_problem(member.linkname)
        if link_problem or not _inside(into, member.linkname):
            return f"is a hard link to a file outside the target folder ({member.linkname})"
    return None


def _extract_tar(archive: Path, into: Path, limits: ExtractLimits) -> None:
    budget = _Budget(archive, into, limits)
    with open(archive, "rb") as raw:
        try:
            handle = tarfile.open(fileobj=raw, mode="r:*")
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as error:
            raise ArchiveError(f"{archive} is not a readable tar archive ({error})") from None
        with handle:
            # headers one by one (getmembers would read a million of them before counting)
            members: list[tarfile.TarInfo] = []
            try:
                for count, member in enumerate(handle, start=1):
                    budget.count_members(count)
                    # where this member's data ends in the unpacked stream
                    budget.check_declared(member.name, member.offset_data + max(0, member.size))
                    if not _JUNK.search(member.name):
                        members.append(member)
            except ArchiveError:
                raise
            except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as error:
                raise ArchiveError(f"cannot read {archive}: {type(error).__name__}: {error}") from error
            for member in members:
                problem = _tar_problem(member, into)
                if problem:
                    raise UnsafeArchiveError(archive, member.name, problem)
            _check_space(archive, sum(m.size for m in members if m.isfile()), into)
            try:
                for member in members:
                    if member.isfile():
                        source = handle.extractfile(member)
                        _write_counted(source, into / member.name, budget, member.name,
                                       declared=member.size, compressed=None)
                    else:
                        # directories and links (checked above) through the stdlib's data filter,
                        # which also drops unsafe permission bits; a hard link copied instead of
                        # linked costs its target's size again
                        if member.islnk():
                            budget.add(member.name, 0, member.size, declared=None, compressed=None)
                        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                        handle.extract(member, into, **extra)
            except ArchiveError:
                raise
            except tarfile.FilterError as error:  # the stdlib's own check, as a second line
                member = getattr(error, "tarinfo", None)
                raise UnsafeArchiveError(archive, getattr(member, "name", "?"), str(error)) from error
            except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as error:
                raise ArchiveError(f"cannot unpack {archive}: {type(error).__name__}: {error}") from error


def archive_format(filename: str) -> str:
    """``"x.zip"`` -> ``"zip"``, ``"x.tar.gz"`` / ``"x.tgz"`` -> ``"tar.gz"``, ``"x.tar"`` -> ``"tar"``."""
    lower = filename.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if lower.endswith(".tar"):
        return "tar"
    raise ValueError(f"cannot tell the archive format of {filename!r} (expected .zip, .tar, .tar.gz)")


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike, *, fmt: str | None = None,
                 limits: ExtractLimits | None = None) -> Path:
    """Unpack ``archive`` into the new folder ``target``; no member may escape it, and the
    unpacked size is bounded.

    Every member is checked before anything is written: absolute paths, ``..``
    components, symbolic / hard links whose target lies outside, device files and (in
    zip archives) any symbolic link raise :class:`UnsafeArchiveError` naming the member.
    Tar directories and links then go through the standard library's ``filter="data"``
    (Python >= 3.11.4), which repeats those checks and drops unsafe permission bits.
    ``__MACOSX/`` and ``.DS_Store`` entries are skipped.

    ``limits`` (default :data:`DEFAULT_LIMITS`): the member count and the declared sizes are
    checked before anything is written (for tar while the headers are read, so a compressed
    stream is not inflated past a limit to find the next header); then file data is copied
    chunk by chunk and counted as it is written, because declared sizes can lie, so an archive
    that unpacks past ``max_total_bytes``, expands beyond ``max_ratio`` or writes more than a
    member declares is stopped at that chunk. A member whose name repeats an earlier one is
    refused rather than written over it.

    Unpacking happens in a temporary folder next to ``target`` that is renamed to
    ``target`` at the end, so ``target`` either does not exist or is complete. If the
    archive holds a single top-level folder, that folder becomes ``target``.

    Raises
    ------
    FileExistsError
        ``target`` exists already.
    UnsafeArchiveError, ArchiveLimitError, ArchiveError
        Unsafe member; over a limit or the free disk space; unreadable archive. All are
        :class:`~cxrlib.errors.CxrInputError` whose one-line message names the archive.
    """
    archive, target = Path(archive), Path(target)
    limits = DEFAULT_LIMITS if limits is None else limits
    fmt = fmt or archive_format(archive.name)
    if fmt not in ARCHIVE_FORMATS:
        raise ValueError(f"fmt must be one of {ARCHIVE_FORMATS}, got {fmt!r}")
    if target.exists():
        raise FileExistsError(f"{target} exists already; remove it to unpack {archive.name} again")
    if not archive.is_file():
        raise ArchiveError(f"{archive}: no such archive file")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.unpacking"
    staging.mkdir()
    try:
        (_extract_zip if fmt == "zip" else _extract_tar)(archive, staging, limits)
        entries = list(staging.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() else staging
        os.replace(root, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------- orchestration


@dataclass
class DownloadResult:
    """What :func:`download` did for one source."""

    source: str
    folders: list[Path] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    record: Path | None = None


def get_source(name: str, sources: Mapping[str, Source] | None = None) -> Source:
    """The registered source ``name``; ``ValueError`` listing the known ones otherwise."""
    registry = SOURCES if sources is None else sources
    if name not in registry:
        raise ValueError(f"unknown source {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def download(
    name: str,
    to: str | os.PathLike,
    *,
    sources: Mapping[str, Source] | None = None,
    keep_archive: bool = False,
    progress: bool = True,
    timeout: float = 60.0,
    log: Callable[[str], None] | None = None,
) -> DownloadResult:
    """Fetch, check and unpack the source ``name`` into ``to``.

    For each file of a :class:`DirectSource`: skip it when ``<to>/<unpacks_to>`` exists;
    use ``<to>/<filename>`` when it is already there (placed by hand on an offline
    machine, or kept by an earlier run), else :func:`fetch` it; check its checksum; unpack
    it with :func:`safe_extract` (a plain file is moved into the folder); delete the
    archive unless ``keep_archive``. Writes ``<to>/<name>.download.json`` (URLs, sizes,
    computed SHA-256 / MD5, whether a published checksum was checked, folders) atomically.

    ``sources`` replaces the registry (tests point it at a local server).

    Raises
    ------
    ManualDownloadRequired
        For a :class:`ManualSource`, before any network access; the message is
        :meth:`ManualSource.instructions`.
    DownloadError, ChecksumError, UnsafeArchiveError
        See :func:`fetch` and :func:`safe_extract`.
    ValueError
        Unknown source name.
    """
    from cxrlib.runs import write_json

    source = get_source(name, sources)
    to = Path(to).expanduser()
    if isinstance(source, ManualSource):
        raise ManualDownloadRequired(source.instructions(to))
    note = log or (lambda message: None)
    result = DownloadResult(source=source.name)
    for item in source.files:
        folder = to / item.unpacks_to
        result.folders.append(folder)
        if folder.exists():
            note(f"{folder} exists already; skipping {item.filename} (remove the folder to fetch it again)")
            continue
        archive = to / item.filename
        if archive.exists():
            note(f"using {archive} already on disk")
            fetched = _verify_and_place(archive, archive, url=item.url, sha256=item.sha256,
                                        md5=item.md5, resumed=False, discard=False)
        else:
            fetched = fetch(item.url, archive, sha256=item.sha256, md5=item.md5, progress=progress,
                            timeout=timeout, hint=f"Check {source.homepage} for the current address.",
                            log=note)
        checked = "checked" if fetched.verified else "no published checksum, not checked"
        note(f"{item.filename}: {fetched.size} bytes, SHA-256 {fetched.sha256} ({checked})")
        if item.archive is None:
            folder.mkdir(parents=True, exist_ok=True)
            final = folder / item.filename
            if keep_archive:
                shutil.copy2(archive, final)
            else:
                os.replace(archive, final)
        else:
            safe_extract(archive, folder, fmt=item.archive)
            if not keep_archive:
                archive.unlink()
        result.files.append({
            "url": item.url, "file": item.filename, "bytes": fetched.size,
            "sha256": fetched.sha256, "md5": fetched.md5,
            "sha256_published": item.sha256, "md5_published": item.md5,
            "checksum_checked": fetched.verified, "folder": item.unpacks_to,
            "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        })
    if result.files:
        result.record = write_json(to / f"{source.name}.download.json", {
            "source": source.name, "title": source.title, "homepage": source.homepage,
            "license": source.license, "citation": source.citation, "adapter": source.adapter,
            "files": result.files,
        })
    return result


def describe_sources(sources: Mapping[str, Source] | None = None) -> str:
    """A text listing of the sources: name, kind, adapter and how to get each."""
    registry = SOURCES if sources is None else sources
    lines = []
    for source in sorted(registry.values(), key=lambda s: (isinstance(s, ManualSource), s.name)):
        if isinstance(source, DirectSource):
            files = ", ".join(f"{f.filename} -> {f.unpacks_to}/" for f in source.files)
            how = f"direct download, {source.size}: {files}"
        else:
            how = f"manual: {source.access}; see {source.homepage}"
        adapter = f" [adapter: {source.adapter}]" if source.adapter else ""
        lines.append(f"{source.name:<20} {source.title}{adapter}\n{'':<20} {how}")
    return "\n".join(lines)
