"""Assemble a cohort: make or load the images, check them, split by patient, check leakage.

This is the logic behind notebook 01. It reads a manifest, never edits raw files, and returns
a new manifest (with ``content_hash`` and ``split``) plus a report whose numbers go into
notebook 01's ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlib import config
from cxrlib.data import manifest as mf
from cxrlib.data.io import (
    REPORT_COLUMNS,
    BadFile,
    ImageReadError,
    LoadReport,
    image_problem,
    read_image,
    read_mask,
    write_png,
    write_table_csv,
)


def phantom_cohort_dir(
    n_patients: int,
    size: int,
    seed: int,
    site_label_correlation: float = 0.0,
    base: Path | None = None,
) -> Path:
    """Cache folder of a phantom cohort; its name encodes every setting that changes the images,
    including the generator version."""
    from cxrlib.data.phantom import GENERATOR_VERSION

    base = Path(base) if base is not None else config.data_dir()
    corr = f"-c{site_label_correlation:g}" if site_label_correlation else ""
    return base / f"phantom-v{GENERATOR_VERSION}-{n_patients}p-{size}px-s{seed}{corr}"


def load_or_make_phantom(
    n_patients: int,
    size: int = 256,
    seed: int = 0,
    *,
    site_label_correlation: float = 0.0,
    base: Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Return the phantom cohort's manifest, generating it once into the data cache.

    The cohort is regenerated only when its ``manifest.csv`` is missing (a cohort is written
    image by image and the manifest last, so a half-written cohort has no manifest).
    """
    from cxrlib.data.phantom import CohortConfig, write_cohort

    out = phantom_cohort_dir(n_patients, size, seed, site_label_correlation, base)
    manifest_path = out / "manifest.csv"
    if not manifest_path.exists():
        write_cohort(
            out,
            CohortConfig(
                n_patients=n_patients,
                seed=seed,
                size=size,
                site_label_correlation=site_label_correlation,
            ),
            progress=progress,
        )
    return mf.read_manifest(manifest_path)


@dataclass
class AssemblyReport:
    """What the quality checks found and what the split looks like.

    ``unreadable``: every file that could not be read at any step (columns ``path``,
    ``error``, ``step``: ``"decoding"`` / ``"resizing"`` before :func:`assemble` when their
    reports are passed to it, ``"hashing"`` in it). ``dropped``: files that were read but
    kept out of the cohort (columns ``path``, ``image_id``, ``step``, ``reason``): images
    too small or near-constant (:func:`cxrlib.data.io.image_problem`).
    """

    n_input: int
    unreadable: pd.DataFrame
    duplicates: pd.DataFrame
    leakage: mf.LeakageReport
    summary: dict = field(default_factory=dict)
    dropped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(DROPPED_COLUMNS)))

    def excluded(self) -> pd.DataFrame:
        """Every unreadable or dropped file, one row each: ``path, step, status, reason``
        (``status`` = ``"unreadable"`` or ``"dropped"``), in step order."""
        unreadable = self.unreadable.rename(columns={"error": "reason"}).assign(status="unreadable")
        dropped = self.dropped.assign(status="dropped")
        frames = [frame[list(REPORT_COLUMNS)] for frame in (unreadable, dropped) if len(frame)]
        if not frames:
            return pd.DataFrame(columns=list(REPORT_COLUMNS))
        return pd.concat(frames, ignore_index=True)

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`excluded` as CSV, atomically; returns the path."""
        return write_table_csv(self.excluded(), path)

    def metrics(self) -> dict:
        """Plain-JSON numbers for ``metrics.json``; ``n_unreadable`` counts every step."""
        groups = self.duplicates["content_hash"].nunique() if len(self.duplicates) else 0
        by_step = self.unreadable.groupby("step").size() if len(self.unreadable) else {}
        dropped_by_step = self.dropped.groupby("step").size() if len(self.dropped) else {}
        return {
            **self.summary,
            "n_input": int(self.n_input),
            "n_unreadable": int(len(self.unreadable)),
            "n_unreadable_by_step": {str(k): int(v) for k, v in dict(by_step).items()},
            "unreadable_files": self.unreadable["path"].tolist() if len(self.unreadable) else [],
            "n_dropped": int(len(self.dropped)),
            "n_dropped_by_step": {str(k): int(v) for k, v in dict(dropped_by_step).items()},
            "dropped_files": self.dropped["path"].tolist() if len(self.dropped) else [],
            "n_duplicate_images": int(len(self.duplicates)),
            "n_duplicate_groups": int(groups),
            "leakage": self.leakage.summary(),
            "leakage_ok": bool(self.leakage.ok),
        }


#: Columns of :attr:`AssemblyReport.dropped`.
DROPPED_COLUMNS: tuple[str, ...] = ("path", "image_id", "step", "reason")
#: Columns of :attr:`AssemblyReport.unreadable`.
UNREADABLE_COLUMNS: tuple[str, ...] = ("path", "error", "step")


def _earlier_tables(earlier: Mapping[str, LoadReport] | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Unreadable and dropped files of the steps before :func:`assemble`, as its two tables."""
    unreadable, dropped = [], []
    for step, load_report in (earlier or {}).items():
        unreadable += [(item.path, item.error, step) for item in load_report.bad]
        dropped += [(item.path, "", step, item.error) for item in load_report.dropped]
    return (pd.DataFrame(unreadable, columns=list(UNREADABLE_COLUMNS)),
            pd.DataFrame(dropped, columns=list(DROPPED_COLUMNS)))


def _degenerate_rows(df: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``df`` (readable images) whose image :func:`image_problem` refuses:
    :data:`DROPPED_COLUMNS` with step ``"checking"``; each file is read once. Paths resolve
    as in ``base`` (the manifest given to :func:`assemble`)."""
    problems: dict[Path, str | None] = {}
    rows = []
    for value, image_id in zip(mf._column(df, "path"), mf._column(df, "image_id"), strict=True):
        file = mf.resolve_path(base, value)
        if file not in problems:
            try:
                problems[file] = image_problem(read_image(file))
            except ImageReadError as error:  # changed since it was hashed: refuse it all the same
                problems[file] = error.reason
        if problems[file]:
            rows.append((value, image_id, "checking", problems[file]))
    return pd.DataFrame(rows, columns=list(DROPPED_COLUMNS))


def assemble(
    df: pd.DataFrame,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    progress: bool = False,
    earlier: Mapping[str, LoadReport] | None = None,
) -> tuple[pd.DataFrame, AssemblyReport]:
    """Hash every image, drop unreadable and degenerate ones, split by patient, check leakage.

    Identical images (same decoded pixels) are kept but their patients are grouped, so all
    copies land in one split. Images :func:`cxrlib.data.io.image_problem` refuses (a side
    below 32 pixels, near-constant) are left out and listed in ``report.dropped`` with the
    reason. ``earlier``: the reports of the steps that read the files before (step name ->
    :class:`~cxrlib.data.io.LoadReport`, e.g. ``{"decoding": hash_report, "resizing":
    resize_report}``); their unreadable and dropped files join the report, so its
    ``metrics()`` and ``write_csv`` cover every file lost on the way. Returns the split
    manifest and the report; raises :class:`cxrlib.data.manifest.LeakageError` if the split
    leaks (it should never).
    """
    n_input = len(df)
    hashed, load_report = mf.add_content_hashes(df, progress=progress)
    earlier_unreadable, earlier_dropped = _earlier_tables(earlier)
    unreadable = load_report.to_frame().assign(step="hashing")
    unreadable = pd.concat([earlier_unreadable, unreadable], ignore_index=True) \
        if len(earlier_unreadable) else unreadable
    readable = hashed[hashed["content_hash"] != ""].copy()
    degenerate = _degenerate_rows(readable, df)
    dropped = pd.concat([earlier_dropped, degenerate], ignore_index=True) \
        if len(earlier_dropped) else degenerate
    readable = readable[~readable["path"].isin(set(degenerate["path"]))].copy()
    duplicates = mf.find_duplicates(readable)
    split = mf.split_by_patient(readable, fractions=fractions, seed=seed)
    leakage = mf.check_leakage(split, raise_on_leak=True)
    report = AssemblyReport(
        n_input=n_input,
        unreadable=unreadable,
        duplicates=duplicates,
        leakage=leakage,
        summary=mf.summarize(split),
        dropped=dropped,
    )
    return split, report


# ----------------------------------------------------------------------------- real data


def _file_stem(image_id: str, taken: set[str]) -> str:
    """A file-name-safe, unique stem for ``image_id`` (``nih:0001_000`` -> ``nih_0001_000``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._") or "image"
    if stem.lower() in taken:  # two ids that differ only in unsafe characters or case
        stem = f"{stem}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"
    taken.add(stem.lower())
    return stem


def _resize(image: np.ndarray, size: int, *, mask: bool = False) -> np.ndarray:
    from PIL import Image

    resample = Image.Resampling.NEAREST if mask else Image.Resampling.LANCZOS
    pil = Image.fromarray(image.astype(np.uint8) * 255 if mask else image)
    out = np.asarray(pil.resize((size, size), resample=resample))
    return out > 127 if mask else out


def materialize(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    size: int,
    *,
    progress: bool = False,
    raw_root: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, LoadReport]:
    """Decode every image of ``df`` to 8-bit grayscale, resize it to ``size`` x ``size`` and
    write it as PNG under ``out_dir/images/<source>/``; masks (``mask_path``, ``mask_*``)
    go to ``out_dir/masks/<column>/`` (nearest neighbour, 0/255).

    Real collections mix PNG / JPEG, grayscale / RGB and every size; after this step every
    image of a cohort has one format and one grid, and later notebooks read them exactly
    as they read the phantom. The aspect ratio is not kept (the images are squashed to a
    square, as in the works this project reproduces). Returns the manifest of the written
    files (absolute paths under ``out_dir``; the original path in ``raw_path``, relative to
    ``raw_root`` when given, e.g. the recipe's data folder, else absolute) and a report of
    the files that could not be read (``report.bad``) or were refused as degenerate by
    :func:`cxrlib.data.io.image_problem` (``report.dropped``, with the reason); their rows are
    left out. The raw files are only read.
    """
    out_dir = Path(out_dir).resolve()
    mask_columns = [c for c in mf.path_columns(df) if c == "mask_path" or c.startswith("mask_")]
    rows = df.reset_index(drop=True)
    iterator = rows.index
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(rows.index, desc="resizing images", unit="img")
    report = LoadReport(step="resizing")
    taken: set[str] = set()
    kept: list[int] = []
    paths: list[str] = []
    masks: dict[str, list[str]] = {column: [] for column in mask_columns}
    for index in iterator:
        row = rows.loc[index]
        try:
            image = read_image(mf.resolve_path(df, row["path"]))
            written_masks = {}
            for column in mask_columns:
                value = mf._to_str(row[column])
                if value:
                    written_masks[column] = _resize(read_mask(mf.resolve_path(df, value)), size, mask=True)
        except (ImageReadError, ValueError) as error:
            report.bad.append(BadFile(path=str(row["path"]), error=getattr(error, "reason", str(error))))
            continue
        problem = image_problem(image)  # at the file's own size: a 1 x 1 file resized is a blank square
        if problem:
            report.dropped.append(BadFile(path=str(row["path"]), error=problem))
            continue
        source = re.sub(r"[^A-Za-z0-9._-]+", "_", str(row.get("source", "")) or "unknown")
        stem = _file_stem(str(row["image_id"]), taken)
        relative = f"images/{source}/{stem}.png"
        write_png(out_dir / relative, _resize(image, size))
        for column in mask_columns:
            if column in written_masks:
                mask_relative = f"masks/{column}/{stem}.png"
                write_png(out_dir / mask_relative, written_masks[column])
                masks[column].append(mask_relative)
            else:
                masks[column].append("")
        report.n_ok += 1
        kept.append(index)
        paths.append(relative)
    result = rows.loc[kept].copy().reset_index(drop=True)
    raw = mf._column(result, "path")
    result["raw_path"] = mf.relative_paths(pd.DataFrame({"path": raw}), raw_root)["path"] \
        if raw_root is not None else raw
    result["path"] = paths
    for column, values in masks.items():
        result[column] = values
    return mf.absolute_paths(result, out_dir), report


def counts_by_class_source_split(df: pd.DataFrame) -> pd.DataFrame:
    """Images per (label, source) and split, with totals: the table that shows whether a
    class comes from one source only (then a classifier can learn the source)."""
    table = pd.crosstab([df["label"], df["source"]], df["split"], margins=True, margins_name="total")
    return table[[c for c in (*mf.SPLITS, "total") if c in table.columns]]


# ----------------------------------------------------------------------------- held-out sites


def hold_out_sites(
    manifest: pd.DataFrame,
    sites: Sequence[str],
    *,
    column: str = "site",
    name: str = "held-out site",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``manifest`` into the rows of the other sites and an external cohort of ``sites``.

    Every row whose ``column`` value is in ``sites`` goes to the external cohort, whole
    (its patients never meet the development cohort), with ``split`` ``"test"``; the other
    rows come back unchanged, to be assembled (split by patient) as usual. Raises
    ``ValueError`` naming the cohort when ``column`` is missing, a site is unknown, or either
    part would be empty.
    """
    if column not in manifest.columns:
        raise ValueError(f"{name}: the manifest has no {column!r} column to hold sites out by")
    values = mf._column(manifest, column)
    known = sorted(set(values) - {""})
    unknown = [site for site in sites if site not in known]
    if not sites or unknown:
        raise ValueError(f"{name}: unknown site(s) {unknown or list(sites)}; the cohort's sites: {known}")
    held = values.isin(list(sites))
    if held.all():
        raise ValueError(f"{name}: holding out {list(sites)} leaves no development image")
    external = manifest[held].copy()
    external["split"] = "test"
    return manifest[~held].copy(), external


def load_or_make_held_out_phantom(
    n_patients: int,
    size: int = 256,
    seed: int = 0,
    *,
    held_out: Sequence[str] = ("valley_imaging",),
    site_label_correlation: float = 0.0,
    n_external_patients: int | None = None,
    base: Path | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A phantom development cohort without the ``held_out`` acquisition sites, and an
    external cohort made only at those sites, both cached in the data folder.

    The development cohort has ``n_patients`` patients at the other sites, with
    ``site_label_correlation`` among them (1: each class from its own site, so a classifier
    can learn the site); the external cohort has ``n_external_patients`` (default a quarter of
    ``n_patients``, at least 8) whose labels are independent of the site (no correlation:
    the site cannot tell the class there). External ids are prefixed ``heldout:`` and every
    external row has split ``test``. Returns ``(development manifest, external manifest)``,
    both before :func:`assemble` (split only the development one).
    """
    from cxrlib.data.phantom import DEFAULT_SITES, CohortConfig, write_cohort

    names = [site.name for site in DEFAULT_SITES]
    unknown = [site for site in held_out if site not in names]
    if not held_out or unknown:
        raise ValueError(f"held-out site cohort: unknown site(s) {unknown or list(held_out)}; phantom sites: {names}")
    kept = tuple(site for site in DEFAULT_SITES if site.name not in held_out)
    if not kept:
        raise ValueError(f"held-out site cohort: holding out {list(held_out)} leaves no development site")
    chosen = tuple(site for site in DEFAULT_SITES if site.name in held_out)
    n_external = max(8, n_patients // 4) if n_external_patients is None else int(n_external_patients)
    folder = phantom_cohort_dir(n_patients, size, seed, site_label_correlation, base)
    tag = "+".join(site.name for site in chosen)
    parts = []
    for out, cohort_config in (
        (folder.with_name(f"{folder.name}-without-{tag}"),
         CohortConfig(n_patients=n_patients, seed=seed, size=size, sites=kept,
                      site_label_correlation=site_label_correlation)),
        (folder.with_name(f"phantom-heldout-{tag}-{n_external}p-{size}px-s{seed}-v{folder.name.split('-')[1]}"),
         CohortConfig(n_patients=n_external, seed=seed + 7919, size=size, sites=chosen)),
    ):
        if not (out / "manifest.csv").exists():
            write_cohort(out, cohort_config, progress=progress)
        parts.append(mf.read_manifest(out / "manifest.csv"))
    development, external = parts
    for column in ("image_id", "patient_id"):
        external[column] = "heldout:" + mf._column(external, column)
    external["split"] = "test"
    return development, external
