"""The manifest: one tidy table that describes every image.

Every stage reads the manifest and adds rows (synthetic images) or columns (hashes,
predictions); nothing else travels between notebooks. Schema (all values strings,
missing values ``""``):

=============  ==================================================================
``image_id``   unique id of the image
``path``       image file: absolute in memory, POSIX path relative to the manifest's folder
               on disk (see "Paths" below)
``label``      class name, one of :data:`LABELS` (``normal``, ``pneumonia``, ``covid``, ...)
``patient_id`` who the image shows; every split is by patient
``source``     the dataset (or phantom site) the image comes from
``view``       ``PA``, ``AP``, ... (may be empty)
``split``      ``train`` / ``val`` / ``test``, or ``""`` before splitting
``mask_path``  lung mask file, stored like ``path`` (may be empty)
``origin``     ``real``, or ``<generator>:<checkpoint>[:<source_image_id>]`` for
               generated images (see :func:`make_origin`)
=============  ==================================================================

Extra columns are allowed and kept (the phantom adds ``site, age, sex, severity,
study_index, mask_*``). The leakage rules enforced here are the ones earlier work broke:
splits are by patient, exact duplicate images link their patients, and a synthetic image
lives in the split of the real image it was made from.

Paths: in memory every path column (:func:`path_columns`) holds absolute paths;
:func:`read_manifest` resolves the file's relative paths against the file's folder and
:func:`write_manifest` writes them relative to the folder it writes into, so a manifest
and its images can move together. A frame needs no root folder attached to it. A manifest
read from disk may only point inside its own folder, the project's data folder, the run
folder of the stage it belongs to, and the roots its reader allows explicitly
(``allowed_roots``): anything else (``../../../../etc/passwd``, a link out of the folder)
is refused before a file is opened.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd

from cxrlib.data.io import BadFile, ImageReadError, LoadReport, pixel_hash, read_image
from cxrlib.errors import CxrInputError
from cxrlib.runs import atomic_write

COLUMNS: tuple[str, ...] = (
    "image_id",
    "path",
    "label",
    "patient_id",
    "source",
    "view",
    "split",
    "mask_path",
    "origin",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
REAL = "real"
#: Columns that must never be empty.
REQUIRED_VALUES: tuple[str, ...] = ("image_id", "path", "label", "patient_id")
#: The declared label set: the project's class names (:data:`cxrlib.data.sources.CANONICAL_LABELS`)
#: and the other labels its adapters give (``other`` finding, ``unknown`` when a source has
#: none, ``tb`` and ``nodule`` of the segmentation collections). A caller with its own class
#: names (a recipe, an image-folder dataset) passes them as ``labels=`` to :func:`validate`.
LABELS: tuple[str, ...] = (
    "normal", "pneumonia", "covid", "lung_opacity", "other", "unknown", "tb", "nodule",
)
#: A stage folder of a run (``RUN_DIR/01_data``, ``RUN_DIR/02_lung_segmentation``, ...): its
#: manifest may point anywhere in its run folder (earlier stages' images and masks).
_STAGE_FOLDER = re.compile(r"^\d\d_[A-Za-z0-9_]+$")
#: How many ids / rows / files an error message lists before it only counts the rest.
MAX_LISTED = 20


class ManifestError(CxrInputError):
    """A manifest that breaks the schema; the message lists every problem found."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems in the manifest:\n" + "\n".join(
                f"  - {problem}" for problem in self.problems
            )
        super().__init__(message)


class LeakageError(ManifestError):
    """Information shared between training and evaluation splits."""


# ----------------------------------------------------------------------------- internals


def _to_str(value: Any) -> str:
    """A cell as the manifest stores it: str, ``""`` for missing, POSIX for paths."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, PurePath):
        return value.as_posix()
    return str(value)


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` as strings (missing -> ``""``); all ``""`` when the column is absent."""
    if name not in df.columns:
        return pd.Series("", index=df.index, dtype=object)
    column = df[name]
    if column.dtype == object:
        if column.map(type).eq(str).all():
            return column
    elif pd.api.types.is_string_dtype(column.dtype) and not column.isna().any():
        return column  # pandas' string dtype (the default for str data from pandas 3 on)
    return column.map(_to_str).astype(object)


def _listing(items: Iterable[Any], limit: int = MAX_LISTED) -> str:
    """``a, b, c`` with at most ``limit`` items shown and the rest counted."""
    items = [str(item) for item in items]
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... (+{len(items) - limit} more)"
    return shown


def _rows_listing(df: pd.DataFrame, mask: pd.Series) -> str:
    """The rows where ``mask`` holds, by index label and image id."""
    ids = _column(df, "image_id")[mask]
    labels = [
        f"{index} ({image_id!r})" if image_id else f"{index}"
        for index, image_id in zip(ids.index, ids, strict=True)
    ]
    return _listing(labels)


def _is_real(df: pd.DataFrame) -> pd.Series:
    return _column(df, "origin").eq(REAL)


# ----------------------------------------------------------------------------- origin


def parse_origin(origin: str) -> tuple[str, str, str] | None:
    """Split an ``origin`` value: ``None`` for ``"real"``, else ``(generator, checkpoint, source_image_id)``.

    ``source_image_id`` is ``""`` for generators without a source image (diffusion).
    Raises ``ValueError`` for anything else (empty, missing checkpoint, ...).
    """
    if origin == REAL:
        return None
    # the source id goes last and may itself contain ':'; generator and checkpoint may not
    parts = origin.split(":", 2) if isinstance(origin, str) else []
    if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
        raise ValueError(
            f"malformed origin {origin!r}: expected 'real', '<generator>:<checkpoint>' or "
            "'<generator>:<checkpoint>:<source_image_id>'"
        )
    generator, checkpoint = parts[0], parts[1]
    source_image_id = parts[2] if len(parts) == 3 else ""
    return generator, checkpoint, source_image_id


def make_origin(generator: str, checkpoint: str, source_image_id: str = "") -> str:
    """Build an ``origin`` value, e.g. ``make_origin("G_NC", "ckpt_epoch10.pt", "p0003_s1")``
    -> ``"G_NC:ckpt_epoch10.pt:p0003_s1"``; without a source image: ``"G_NC:ckpt_epoch10.pt"``.
    """
    generator, checkpoint, source_image_id = (
        _to_str(generator),
        _to_str(checkpoint),
        _to_str(source_image_id),
    )
    for name, value in (("generator", generator), ("checkpoint", checkpoint)):
        if not value.strip() or ":" in value or "\n" in value:
            raise ValueError(f"{name} must be a non-empty string without ':', got {value!r}")
    if generator == REAL:
        raise ValueError("generator may not be called 'real'")
    if "\n" in source_image_id:
        raise ValueError(f"source_image_id may not contain a newline: {source_image_id!r}")
    return (
        f"{generator}:{checkpoint}:{source_image_id}"
        if source_image_id
        else f"{generator}:{checkpoint}"
    )


def _source_ids(df: pd.DataFrame) -> pd.Series:
    """Per row: the source image id of a synthetic row, ``""`` for real or sourceless rows.

    Malformed origins also give ``""`` (``validate`` reports them).
    """

    def source_of(origin: str) -> str:
        try:
            parsed = parse_origin(origin)
        except ValueError:
            return ""
        return parsed[2] if parsed else ""

    return _column(df, "origin").map(source_of)


# ----------------------------------------------------------------------------- paths


def resolve_path(root: pd.DataFrame | str | os.PathLike | None, value: str) -> Path:
    """An absolute path for a ``path`` / ``mask_path`` value.

    Manifest paths are absolute in memory and come back as they are. A relative value (one
    a user typed) resolves against the folder ``root``; with no folder (``None``, or a
    manifest frame, which carries none) it is an error.
    """
    value = _to_str(value)
    if not value:
        raise ValueError("empty path")
    candidate = Path(value)
    if candidate.is_absolute():
        return candidate
    if root is None or isinstance(root, pd.DataFrame):
        raise ValueError(
            f"cannot resolve relative path {value!r}: manifest paths are absolute in memory "
            "(read_manifest and the adapters make them so); pass the folder it is relative to"
        )
    return Path(root) / candidate


def path_columns(df: pd.DataFrame) -> list[str]:
    """Columns that hold file paths: ``path``, every ``path_<variant>`` (derived images, e.g.
    ``path_lung_crop``), ``mask_path`` and every ``mask_<kind>``."""
    return [
        c for c in df.columns
        if c == "path" or str(c).startswith("path_") or c == "mask_path" or str(c).startswith("mask_")
    ]


def _join(folder: str, value: str) -> str:
    """``value`` made absolute against ``folder`` (lexically: ``..`` folded, links kept)."""
    if not value:
        return value
    if os.path.isabs(value):  # folded too, so that what is checked is what is opened
        return os.path.normpath(value)
    if os.sep == "/" and "//" not in value and "/." not in value and not value.startswith("."):
        return f"{folder}/{value}" if folder != "/" else f"/{value}"  # already normal: skip normpath
    return os.path.normpath(os.path.join(folder, value))


def absolute_paths(df: pd.DataFrame, folder: str | os.PathLike) -> pd.DataFrame:
    """A copy of ``df`` whose relative path values (:func:`path_columns`) are made absolute
    against ``folder``; absolute and empty values are kept. What an adapter or reader calls
    on paths given relative to a dataset folder."""
    base = os.path.abspath(os.fspath(folder))
    out = df.copy()
    for column in path_columns(out):
        out[column] = [_join(base, value) for value in _column(out, column).tolist()]
    return out


def relative_paths(df: pd.DataFrame, folder: str | os.PathLike) -> pd.DataFrame:
    """A copy of ``df`` whose absolute path values are written relative to ``folder``
    (POSIX, ``..`` where needed), as :func:`write_manifest` stores them. Relative values
    are kept; a path on another drive (Windows) stays absolute."""
    base = os.path.abspath(os.fspath(folder))
    out = df.copy()
    folders: dict[str, str | None] = {}  # relpath is slow; rows share few folders

    def relative_folder(name: str) -> str | None:
        if name not in folders:
            try:
                folders[name] = Path(os.path.relpath(name, base)).as_posix()
            except ValueError:  # another drive: no relative path exists
                folders[name] = None
        return folders[name]

    def relative(value: str) -> str:
        if not value or not os.path.isabs(value):
            return value
        folder, name = os.path.split(value)
        if name in ("", ".", ".."):
            folder, name = value, ""
        start = relative_folder(folder)
        if start is None:
            return Path(value).as_posix()
        return start if not name else name if start == "." else f"{start}/{name}"

    for column in path_columns(out):
        out[column] = [relative(value) for value in _column(out, column).tolist()]
    return out


def default_roots(manifest_path: str | os.PathLike) -> list[Path]:
    """The folders a manifest file may point into without the reader allowing more.

    Its own folder; the run folder when the manifest sits in a stage folder
    (``RUN_DIR/NN_name/``: a stage reads and writes images of earlier stages of its run);
    and the project's data folder (:func:`cxrlib.config.data_dir`, the phantom cohorts
    and prepared datasets). Links are resolved.
    """
    from cxrlib import config

    folder = Path(manifest_path).resolve().parent
    roots = [folder]
    if _STAGE_FOLDER.match(folder.name):
        roots.append(folder.parent)
    roots.append(config.data_dir().resolve())
    return roots


def _escaping(df: pd.DataFrame, roots: Iterable[str | os.PathLike]) -> list[tuple[int, str, Path | None]]:
    """``(row position, column, resolved target)`` per path value outside ``roots``."""
    # string prefixes, not Path objects: a manifest has hundreds of thousands of path values
    prefixes = [os.path.join(os.path.realpath(os.fspath(root)), "") for root in roots]
    folder_cache: dict[str, tuple[str, set[str], bool]] = {}

    def links_in(folder: str) -> set[str]:
        """Names of the symbolic links in ``folder`` (one directory listing instead of a stat per file)."""
        try:
            with os.scandir(folder) as entries:
                return {entry.name for entry in entries if entry.is_symlink()}
        except OSError:  # missing or unreadable folder: no links to follow
            return set()

    def inside(target: str) -> bool:
        return any((target + os.sep).startswith(prefix) for prefix in prefixes)

    def folder_facts(folder: str) -> tuple[str, set[str], bool]:
        """The folder with links resolved, the names of links in it, and whether it is inside."""
        if folder not in folder_cache:
            try:
                real_folder = os.path.realpath(folder)
                folder_cache[folder] = (os.path.join(real_folder, ""), links_in(folder), inside(real_folder))
            except (ValueError, OSError):
                folder_cache[folder] = ("", set(), False)
        return folder_cache[folder]

    found = []
    for column in path_columns(df):
        for position, value in enumerate(_column(df, column).tolist()):
            if not value:
                continue
            # a relative value, or one the system cannot place (a NUL byte), counts as outside
            if not os.path.isabs(value) or "\x00" in value:
                found.append((position, column, None))
                continue
            folder, name = os.path.split(value)
            real_folder, links, folder_inside = folder_facts(folder)
            if not real_folder:  # the system cannot place the folder
                found.append((position, column, None))
            elif name in links or name in ("", ".", ".."):
                # a linked file may point elsewhere even inside a contained folder
                target = os.path.realpath(real_folder + name)
                if not inside(target):
                    found.append((position, column, Path(target)))
            elif not folder_inside:
                found.append((position, column, Path(real_folder + name)))
    return found


def outside_roots(df: pd.DataFrame, roots: Iterable[str | os.PathLike],
                  *, shown: pd.DataFrame | None = None) -> list[str]:
    """One entry ``"'<image_id>' <column> '<value>' (-> <target>)"`` per path value
    (:func:`path_columns`) that does not lie inside one of ``roots`` once ``..`` and links
    are resolved; relative values count as outside. ``shown``: the same rows as written on
    disk, whose values the entries name. Empty when every path is contained."""
    ids = _column(df, "image_id").tolist()
    source = df if shown is None else shown
    entries = []
    for position, column, target in _escaping(df, roots):
        value = _column(source, column).iloc[position]
        entry = f"{ids[position]!r} {column} {value!r}"
        if target is not None and str(target) != value:
            entry += f" (-> {target})"
        entries.append(entry)
    return entries


def _containment_problems(df: pd.DataFrame, roots: list[Path],
                          shown: pd.DataFrame | None = None) -> list[str]:
    """One problem line naming the rows whose paths leave ``roots`` (``[]`` when none do)."""
    escaping = outside_roots(df, roots, shown=shown)
    if not escaping:
        return []
    where = ", ".join(str(root) for root in roots)
    return [
        f"{len(escaping)} paths outside the allowed folders ({where}): {_listing(escaping, 5)}; "
        "a reader that trusts another data folder passes allowed_roots=[...]"
    ]


# ----------------------------------------------------------------------------- validation


def validate(
    df: pd.DataFrame,
    *,
    check_files: bool = False,
    allowed_roots: Iterable[str | os.PathLike] | None = None,
    labels: Iterable[str] | None = LABELS,
) -> pd.DataFrame:
    """Check ``df`` against the schema and return it unchanged.

    Checks: missing columns, duplicate ``image_id``, empty ``image_id`` / ``path`` /
    ``label`` / ``patient_id``, ``label`` outside ``labels`` (the declared label set,
    :data:`LABELS`; ``None`` accepts any), ``split`` not in ``SPLITS`` or ``""``, malformed
    ``origin``; with ``allowed_roots`` that every path of :func:`path_columns` lies inside
    one of those folders (links resolved); with ``check_files`` that every such file exists
    (paths must then be absolute, as :func:`read_manifest` makes them).
    Raises one :class:`ManifestError` that lists all problems, naming rows (index label
    and image id), columns and files; long lists show the first 20 and a count.
    """
    problems: list[str] = []
    missing = [name for name in COLUMNS if name not in df.columns]
    if missing:
        problems.append(
            f"missing columns: {', '.join(missing)} (a manifest needs {', '.join(COLUMNS)})"
        )

    if "image_id" in df.columns:
        ids = _column(df, "image_id")
        counts = ids[ids != ""].value_counts()
        duplicated = counts[counts > 1]
        if len(duplicated):
            problems.append(
                f"duplicate image_id ({len(duplicated)} ids): "
                + _listing(f"{image_id!r} x{count}" for image_id, count in duplicated.items())
            )

    for name in REQUIRED_VALUES:
        if name in df.columns:
            empty = _column(df, name).str.strip().eq("")
            if empty.any():
                problems.append(
                    f"empty {name} in {int(empty.sum())} rows: {_rows_listing(df, empty)}"
                )

    if labels is not None and "label" in df.columns:
        known = set(labels)
        label = _column(df, "label")
        unknown = ~label.isin(known) & label.str.strip().ne("")
        if unknown.any():
            values = sorted(label[unknown].unique())
            problems.append(
                f"label not in the declared label set {tuple(sorted(known))} "
                f"({_listing(repr(v) for v in values)}) in {int(unknown.sum())} rows: "
                f"{_rows_listing(df, unknown)}"
            )

    if "split" in df.columns:
        split = _column(df, "split")
        bad_split = ~split.isin((*SPLITS, ""))
        if bad_split.any():
            values = sorted(split[bad_split].unique())
            problems.append(
                f"split not in {SPLITS} or '' ({_listing(repr(v) for v in values)}) in "
                f"{int(bad_split.sum())} rows: {_rows_listing(df, bad_split)}"
            )

    if "origin" in df.columns:

        def malformed(origin: str) -> bool:
            try:
                parse_origin(origin)
            except ValueError:
                return True
            return False

        bad_origin = _column(df, "origin").map(malformed).astype(bool)
        if bad_origin.any():
            values = sorted(_column(df, "origin")[bad_origin].unique())
            problems.append(
                f"malformed origin ({_listing(repr(v) for v in values)}; expected 'real' or "
                f"'<generator>:<checkpoint>[:<source_image_id>]') in {int(bad_origin.sum())} "
                f"rows: {_rows_listing(df, bad_origin)}"
            )

    if allowed_roots is not None:
        problems += _containment_problems(df, [Path(folder) for folder in allowed_roots])
    if check_files:
        problems += _missing_files(df)

    if problems:
        raise ManifestError(problems)
    return df


def _missing_files(df: pd.DataFrame) -> list[str]:
    problems = []
    for name in path_columns(df):
        missing: list[str] = []
        relative: list[str] = []
        for value in _column(df, name):
            if not value:
                continue  # emptiness is reported above (path) or allowed (masks)
            if not os.path.isabs(value):
                relative.append(value)
            elif not os.path.isfile(value):
                missing.append(value)
        if relative:
            problems.append(
                f"{len(relative)} relative paths in column {name!r} cannot be checked (paths are "
                f"absolute in memory; read the manifest with read_manifest): {_listing(relative)}"
            )
        if missing:
            problems.append(f"{len(missing)} files in column {name!r} not found: {_listing(missing)}")
    return problems


# ----------------------------------------------------------------------------- read / write


def read_manifest(
    path: str | os.PathLike,
    *,
    allowed_roots: Iterable[str | os.PathLike] = (),
    labels: Iterable[str] | None = LABELS,
) -> pd.DataFrame:
    """Read and validate a manifest (CSV, or ``.parquet`` when pyarrow is installed).

    Every column comes back as ``str`` with missing values ``""`` (ids like ``"0001"``
    keep their zeros). Every path column (:func:`path_columns`) comes back absolute,
    resolved against the file's folder. A path that leaves :func:`default_roots` (the
    file's folder, its run folder for a stage manifest, the project's data folder) and every
    folder of ``allowed_roots`` (once ``..`` and links are resolved) is refused with a
    :class:`ManifestError` naming the file, the row's image id and the path, before any
    image is opened. ``labels``: the declared label set (see :func:`validate`). Files are
    not checked for existence here; use ``validate(df, check_files=True)``.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            _require_pyarrow(path)
            df = pd.read_parquet(path)
            df = df.apply(lambda column: column.map(_to_str)).astype(object) if len(df.columns) else df
        else:
            # utf-8-sig: a manifest saved from a spreadsheet often starts with a byte-order mark
            df = pd.read_csv(
                path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig"
            )
    except ValueError as error:  # not UTF-8, empty, malformed CSV / Parquet (pandas' errors are ValueErrors)
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ManifestError(f"{path}: not a readable manifest ({type(error).__name__}: {reason})") from None
    absolute = absolute_paths(df, path.resolve().parent)
    roots = [*default_roots(path), *(Path(root).resolve() for root in allowed_roots)]
    try:
        validate(absolute, labels=labels)
        problems = _containment_problems(absolute, roots, shown=df)
    except ManifestError as error:
        problems = error.problems
    if problems:
        raise ManifestError([f"{path}: {problem}" for problem in problems]) from None
    return absolute


def write_manifest(
    df: pd.DataFrame, path: str | os.PathLike, *, labels: Iterable[str] | None = LABELS
) -> Path:
    """Validate ``df`` and write it atomically (temporary file + ``os.replace``); returns the path.

    CSV, or Parquet for a ``.parquet`` name (needs pyarrow). Columns: ``COLUMNS`` first,
    then the extra columns in their current order. Values are written as strings
    (missing -> ``""``, ``Path`` objects as POSIX strings); absolute paths are written
    relative to the file's folder (:func:`relative_paths`), relative ones as they are.
    ``labels``: the declared label set (see :func:`validate`).
    """
    validate(df, labels=labels)
    path = Path(path)
    extras = [name for name in df.columns if name not in COLUMNS]
    table = pd.DataFrame({name: _column(df, name) for name in (*COLUMNS, *extras)})
    table = relative_paths(table, path.resolve().parent)
    if path.suffix.lower() == ".parquet":
        _require_pyarrow(path)
        atomic_write(path, lambda handle: table.to_parquet(handle, index=False))
    else:
        atomic_write(path, lambda handle: table.to_csv(handle, index=False, lineterminator="\n"), mode="w")
    return path


def _require_pyarrow(path: Path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError(
            f"{path}: Parquet manifests need pyarrow (pip install pyarrow), or use a .csv name"
        ) from None


# ----------------------------------------------------------------------------- duplicates


def add_content_hashes(
    df: pd.DataFrame,
    *,
    progress: bool = False,
) -> tuple[pd.DataFrame, LoadReport]:
    """A copy of ``df`` with a ``content_hash`` column: :func:`~cxrlib.data.io.pixel_hash`
    of each decoded image (paths absolute, as in every manifest in memory).

    Unreadable files get ``""`` and are listed in the returned report (by their manifest
    ``path`` value), so one bad download does not stop a whole dataset.
    """
    paths = _column(df, "path")
    iterator: Iterable[str] = paths
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(paths, desc="hashing images", unit="img")
    report = LoadReport()
    cache: dict[Path, str | BadFile] = {}  # rows that share a file are read once
    hashes: list[str] = []
    for value in iterator:
        try:
            file = resolve_path(None, value)
        except ValueError as error:
            report.bad.append(BadFile(path=value, error=str(error)))
            hashes.append("")
            continue
        if file not in cache:
            try:
                cache[file] = pixel_hash(read_image(file))
            except ImageReadError as error:
                cache[file] = BadFile(path=value, error=error.reason)
        outcome = cache[file]
        if isinstance(outcome, BadFile):
            report.bad.append(outcome)
            hashes.append("")
        else:
            report.n_ok += 1
            hashes.append(outcome)
    result = df.copy()
    result["content_hash"] = hashes
    return result, report


def find_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose ``content_hash`` is shared with another row (exact pixel duplicates).

    Columns: ``content_hash, image_id, patient_id, source, group_size, split, path``;
    largest groups first. Empty when there are none. Needs :func:`add_content_hashes`.
    """
    if "content_hash" not in df.columns:
        raise ValueError("no content_hash column: run add_content_hashes(df) first")
    columns = ["content_hash", "image_id", "patient_id", "source", "group_size", "split", "path"]
    table = pd.DataFrame({name: _column(df, name) for name in columns if name != "group_size"})
    table = table[table["content_hash"] != ""]
    table = table.assign(
        group_size=table.groupby("content_hash")["image_id"].transform("size").astype(int)
    )
    table = table[table["group_size"] > 1]
    table = table.sort_values(
        ["group_size", "content_hash", "image_id"], ascending=[False, True, True]
    )
    return table[columns].reset_index(drop=True)


# ----------------------------------------------------------------------------- splitting


#: Columns whose shared (non-empty) values tie images together: identical pixels, near copies.
GROUP_LINK_COLUMNS: tuple[str, ...] = ("content_hash", "near_dup_group")


class _UnionFind:
    def __init__(self, items: Iterable[str]) -> None:
        self.parent = {item: item for item in items}

    def find(self, item: str) -> str:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, first: str, second: str) -> None:
        a, b = self.find(first), self.find(second)
        if a != b:
            # the smaller id becomes the root, so groups do not depend on input order
            a, b = sorted((a, b))
            self.parent[b] = a


def patient_groups(df: pd.DataFrame, *, group_duplicates: bool = True) -> pd.Series:
    """Per row, the group its patient belongs to (a ``patient_id``, the smallest of the group).

    With ``group_duplicates``, patients that share an identical image (``content_hash``)
    or a near-duplicate group (``near_dup_group``, :mod:`cxrlib.data.dedup`) are joined
    (transitively), since the "two patients" are then likely one person filed twice, or
    one image copied into two datasets. Rows that share a ``patient_group`` value (links
    recorded by :func:`cxrlib.data.dedup.deduplicate`, also for copies it dropped) are
    joined too.
    """
    patients = _column(df, "patient_id")
    groups = _UnionFind(patients.unique())
    link_columns = [c for c in GROUP_LINK_COLUMNS if c in df.columns] if group_duplicates else []
    if "patient_group" in df.columns:
        link_columns.append("patient_group")
    for name in link_columns:
        links = _column(df, name)
        linked = links != ""
        for members in patients[linked].groupby(links[linked]).unique():
            for other in members[1:]:
                groups.union(members[0], other)
    return patients.map(groups.find)


def _peel(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of about ``fraction`` of the rows, whole groups only, labels stratified."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    largest_class = int(np.unique(labels, return_counts=True)[1].max()) if len(labels) else 0
    # sklearn needs at least n_splits groups, and some class with at least n_splits rows
    n_splits = min(max(2, round(1.0 / fraction)), n_groups, largest_class) if fraction > 0 else 0
    if n_splits < 2:
        return np.zeros(len(groups), dtype=bool)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "least populated class has fewer members than n_splits": reported after the split,
        # in terms of the splits the reader asked for
        warnings.simplefilter("ignore", UserWarning)
        folds = [held_out for _, held_out in splitter.split(np.zeros(len(labels)), labels, groups)]
    # folds differ in size; take the one closest to the asked-for share
    target = fraction * len(labels)
    best = min(range(len(folds)), key=lambda index: (abs(len(folds[index]) - target), index))
    mask = np.zeros(len(groups), dtype=bool)
    mask[folds[best]] = True
    return mask


def split_by_patient(
    df: pd.DataFrame,
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    stratify: str | None = "label",
    group_duplicates: bool = True,
) -> pd.DataFrame:
    """A copy of ``df`` with ``split`` assigned so that no patient spans two splits.

    Real rows (``origin == "real"``) are split by patient group (see
    :func:`patient_groups`) with scikit-learn's ``StratifiedGroupKFold``: the test part is
    peeled off first, then the validation part from the rest, each time keeping the class
    proportions of ``stratify`` (``None``: no stratification). ``fractions`` (train, val,
    test) are met approximately, since whole patients move together. The result depends
    only on the rows and ``seed``, not on their order. Existing real-row splits are
    overwritten.

    Synthetic rows take the split of their source image (following chains of generated
    sources); synthetic rows without a source, or whose source is not in the manifest,
    keep a split they already have, else get ``"train"``.
    """
    fractions = tuple(float(share) for share in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0:
        raise ValueError(f"fractions must be (train, val, test) with train > 0, got {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions} (sum {sum(fractions):.4f})")
    if stratify is not None and stratify not in df.columns:
        raise ValueError(f"stratify column {stratify!r} not in the manifest")
    validate(df)

    # positions, not index labels, identify rows below (a concatenated frame may repeat labels)
    work = df.reset_index(drop=True)
    split = _column(work, "split").copy()
    real = _is_real(work)
    if real.any():
        real_rows = work[real]
        # a fixed order (by patient, then image) makes the split independent of row order
        order = np.lexsort(
            (_column(real_rows, "image_id").to_numpy(), _column(real_rows, "patient_id").to_numpy())
        )
        real_rows = real_rows.iloc[order]
        group_names = patient_groups(real_rows, group_duplicates=group_duplicates).to_numpy()
        _, groups = np.unique(group_names, return_inverse=True)
        labels = (
            _column(real_rows, stratify).to_numpy()
            if stratify is not None
            else np.zeros(len(real_rows), dtype=int)
        )
        test_share = fractions[2]
        in_test = _peel(labels, groups, test_share, seed)
        rest = ~in_test
        in_val = np.zeros(len(groups), dtype=bool)
        val_share = fractions[1] / (1.0 - test_share) if test_share < 1 else 0.0
        if rest.any():
            in_val[rest] = _peel(labels[rest], groups[rest], val_share, seed + 1)
        assigned = np.where(in_test, "test", np.where(in_val, "val", "train"))
        split.loc[real_rows.index] = assigned
        _warn_missing_classes(labels, assigned, fractions, stratify)

    split = _inherit_synthetic_splits(work, split)
    result = df.copy()
    result["split"] = split.to_numpy()
    return result


def _warn_missing_classes(
    labels: np.ndarray, assigned: np.ndarray, fractions: tuple[float, ...], stratify: str | None
) -> None:
    if stratify is None:
        return
    rows_per_class = dict(zip(*np.unique(labels, return_counts=True), strict=True))
    gaps = []
    for name, share in zip(SPLITS, fractions, strict=True):
        if share <= 0:
            continue
        absent = sorted(set(rows_per_class) - set(labels[assigned == name]))
        if absent:
            listed = _listing((f"{label!r} ({rows_per_class[label]} rows)" for label in absent), 10)
            gaps.append(f"{name}: {listed}")
    if gaps:
        warnings.warn(
            f"too few patients to put every {stratify!r} class in every split; "
            "classes with no rows in " + "; ".join(gaps),
            UserWarning,
            stacklevel=3,
        )


def _inherit_synthetic_splits(df: pd.DataFrame, split: pd.Series) -> pd.Series:
    """Give each synthetic row the split of its source image, following chains."""
    split = split.copy()
    ids = _column(df, "image_id")
    sources = _source_ids(df)
    real = _is_real(df)
    row_of = dict(zip(ids, df.index, strict=True))
    synthetic = [index for index in df.index if not real[index]]

    def final_split(index: Any, seen: set) -> str | None:
        """Split of the real image at the end of the source chain, or None if there is none."""
        source = sources[index]
        if not source or source not in row_of or index in seen:
            return None
        seen.add(index)
        source_index = row_of[source]
        if real[source_index]:
            return split[source_index]
        return final_split(source_index, seen)

    for index in synthetic:
        inherited = final_split(index, set())
        if inherited:
            split[index] = inherited
        elif split[index] not in SPLITS:
            split[index] = "train"
    return split


# ----------------------------------------------------------------------------- leakage


@dataclass
class LeakageReport:
    """What :func:`check_leakage` found; every list empty means no leak."""

    patients_in_several_splits: list[str] = field(default_factory=list)
    duplicate_hashes_across_splits: list[str] = field(default_factory=list)
    #: synthetic image ids whose split differs from their source image's
    synthetic_split_mismatch: list[str] = field(default_factory=list)
    #: synthetic image ids without a source image that sit in val / test
    synthetic_in_eval: list[str] = field(default_factory=list)
    #: ``near_dup_group`` values (near-identical images, real or synthetic) in several splits
    near_duplicates_across_splits: list[str] = field(default_factory=list)
    #: ``patient_group`` values (patients linked by duplicates) in several splits
    patient_groups_across_splits: list[str] = field(default_factory=list)
    #: short per-item explanations (which splits), used in the text form
    details: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not (
            self.patients_in_several_splits
            or self.duplicate_hashes_across_splits
            or self.synthetic_split_mismatch
            or self.synthetic_in_eval
            or self.near_duplicates_across_splits
            or self.patient_groups_across_splits
        )

    def summary(self) -> dict[str, int]:
        """Counts per kind of leak (plain ints, JSON-ready)."""
        return {
            "patients_in_several_splits": len(self.patients_in_several_splits),
            "duplicate_hashes_across_splits": len(self.duplicate_hashes_across_splits),
            "synthetic_split_mismatch": len(self.synthetic_split_mismatch),
            "synthetic_in_eval": len(self.synthetic_in_eval),
            "near_duplicates_across_splits": len(self.near_duplicates_across_splits),
            "patient_groups_across_splits": len(self.patient_groups_across_splits),
        }

    def __str__(self) -> str:
        if self.ok:
            return "no leakage found: patients, duplicate images and synthetic sources each stay in one split"
        titles = {
            "patients_in_several_splits": "patients with images in several splits",
            "duplicate_hashes_across_splits": "identical images (content_hash) in several splits",
            "synthetic_split_mismatch": "synthetic images in another split than their source image",
            "synthetic_in_eval": "synthetic images without a source image in val/test",
            "near_duplicates_across_splits": "near-identical images (near_dup_group) in several splits",
            "patient_groups_across_splits": "linked patients (patient_group) in several splits",
        }
        lines = ["leakage between splits:"]
        for key, title in titles.items():
            items = getattr(self, key)
            if items:
                lines.append(f"  {title} ({len(items)}): {_listing(self.details.get(key, items))}")
        return "\n".join(lines)


def check_leakage(df: pd.DataFrame, *, raise_on_leak: bool = True) -> LeakageReport:
    """Look for information shared across splits; rows with split ``""`` are ignored.

    Finds real patients with images in several splits, identical images (same
    ``content_hash``, when that column exists) in several splits, near-identical images
    (same ``near_dup_group``, real or synthetic: a synthetic image that looks like a test
    image was likely made from it) in several splits, linked patients (same
    ``patient_group``) in several splits, synthetic images whose split differs from their
    source image's, and source-less synthetic images in val / test. Raises
    :class:`LeakageError` with the list when ``raise_on_leak`` and any is found.
    """
    report = LeakageReport()
    df = df.reset_index(drop=True)  # rows by position: index labels may repeat
    split = _column(df, "split")
    assigned = split != ""
    real = _is_real(df)
    ids = _column(df, "image_id")

    patients = _column(df, "patient_id")
    splits_per_patient = split[real & assigned].groupby(patients[real & assigned]).unique()
    for patient, values in splits_per_patient.items():
        if len(values) > 1:
            report.patients_in_several_splits.append(patient)
            report.details.setdefault("patients_in_several_splits", []).append(
                f"{patient!r} ({'/'.join(sorted(values))})"
            )

    if "content_hash" in df.columns:
        hashes = _column(df, "content_hash")
        hashed = assigned & (hashes != "")
        for content_hash, group in df[hashed].groupby(hashes[hashed]):
            values = sorted(split[group.index].unique())
            if len(values) > 1:
                report.duplicate_hashes_across_splits.append(content_hash)
                members = ", ".join(f"{ids[index]}:{split[index]}" for index in group.index[:4]) + (
                    " ..." if len(group) > 4 else ""
                )
                report.details.setdefault("duplicate_hashes_across_splits", []).append(
                    f"{content_hash[:12]} [{members}]"
                )

    for name, attribute in (("near_dup_group", "near_duplicates_across_splits"),
                            ("patient_group", "patient_groups_across_splits")):
        if name not in df.columns:
            continue
        values = _column(df, name)
        linked = assigned & (values != "")
        for value, group in df[linked].groupby(values[linked]):
            splits_here = sorted(split[group.index].unique())
            if len(splits_here) > 1:
                getattr(report, attribute).append(value)
                members = ", ".join(f"{ids[index]}:{split[index]}" for index in group.index[:4]) + (
                    " ..." if len(group) > 4 else ""
                )
                report.details.setdefault(attribute, []).append(f"{value} [{members}]")

    sources = _source_ids(df)
    split_of = dict(zip(ids, split, strict=True))
    for index in df.index[~real & assigned]:
        source = sources[index]
        if not source:
            if split[index] in ("val", "test"):
                report.synthetic_in_eval.append(ids[index])
                report.details.setdefault("synthetic_in_eval", []).append(
                    f"{ids[index]!r} ({split[index]})"
                )
            continue
        source_split = split_of.get(source, "")
        if source_split and source_split != split[index]:
            report.synthetic_split_mismatch.append(ids[index])
            report.details.setdefault("synthetic_split_mismatch", []).append(
                f"{ids[index]!r} ({split[index]}; source {source!r} in {source_split})"
            )

    if raise_on_leak and not report.ok:
        raise LeakageError(str(report))
    return report


# ----------------------------------------------------------------------------- summary


def summarize(df: pd.DataFrame) -> dict[str, Any]:
    """Headline counts for ``metrics.json`` (plain ``int`` / ``str``, JSON-serialisable).

    Keys: ``n_images``, ``n_patients`` (real patients), ``n_real``, ``n_synthetic``,
    ``images_per_class``, ``images_per_split``, ``images_per_split_and_class``
    (``{split: {label: n}}``), ``patients_per_split`` (real patients). Rows not yet split
    count under ``"unassigned"``.
    """
    split = _column(df, "split").replace("", "unassigned")
    labels = _column(df, "label")
    real = _is_real(df)
    patients = _column(df, "patient_id")

    def counts(series: pd.Series) -> dict[str, int]:
        return {str(key): int(value) for key, value in sorted(series.value_counts().items())}

    per_split_and_class: dict[str, dict[str, int]] = {}
    for (split_name, label), count in sorted(pd.crosstab(split, labels).stack().items()):
        if count:
            per_split_and_class.setdefault(str(split_name), {})[str(label)] = int(count)
    return {
        "n_images": int(len(df)),
        "n_patients": int(patients[real].nunique()),
        "n_real": int(real.sum()),
        "n_synthetic": int((~real).sum()),
        "images_per_class": counts(labels),
        "images_per_split": counts(split),
        "images_per_split_and_class": per_split_and_class,
        "patients_per_split": {
            str(key): int(value)
            for key, value in sorted(patients[real].groupby(split[real]).nunique().items())
        },
    }
