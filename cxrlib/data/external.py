"""External cohorts: other collections (or held-out sites) assembled for testing only.

An external cohort answers "does the classifier work on images from elsewhere?" only if
none of its images is a copy of a development image and none of its patients is a
development patient. :func:`assemble_external` makes sure of that:

1. decode every image and check it as the development cohort is checked (unreadable files
   and degenerate images, :func:`cxrlib.data.io.image_problem`, are left out and listed);
   identical images within the cohort are kept once;
2. drop every image that is a copy of a development image: exact copies by pixel hash,
   re-published ones (cropped, re-windowed, re-encoded) by the copy detector
   :func:`cxrlib.data.copies.find_copies` (or, with ``near="phash"``, perceptual hashes
   within ``max_distance`` bits, :mod:`cxrlib.data.dedup`); the two patients are linked,
   so every other image of that external patient is dropped as well (the patient is a
   development patient);
3. optionally decode and resize the kept images like the development cohort
   (:func:`cxrlib.data.cohort.materialize`), put every row in the ``test`` split with a
   ``cohort`` column, and write ``manifest.csv``, ``copies.csv`` and ``excluded.csv`` in
   ``<stage folder>/external/<name>/`` (:func:`external_dir`), beside the development
   manifest. :func:`read_external` reads them all back.

Bad external input stops with one line naming the cohort (:class:`ExternalCohortError`):
a missing folder, an unknown recipe or class, a cohort with no usable image.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlib.data import manifest as mf
from cxrlib.data.io import ImageReadError, image_problem, read_image, write_table_csv
from cxrlib.errors import CxrInputError

#: Columns of :attr:`ExternalReport.copies`.
COPY_COLUMNS: tuple[str, ...] = ("image_id", "patient_id", "kind", "development_image_id",
                                 "development_patient_id", "score")
#: Columns of :attr:`ExternalReport.excluded`.
EXCLUDED_COLUMNS: tuple[str, ...] = ("image_id", "path", "reason", "detail")
#: Why an external image is left out (the ``reason`` column of :attr:`ExternalReport.excluded`).
REASONS: tuple[str, ...] = ("unreadable", "degenerate", "duplicate within cohort", "exact copy of development",
                            "near copy of development", "patient of a development copy")


class ExternalCohortError(CxrInputError):
    """An external cohort that cannot be used; the message names the cohort."""


def external_dir(stage_dir: str | os.PathLike, name: str) -> Path:
    """``<stage_dir>/external/<name>/``: where the external cohort ``name`` is written."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "external"
    return Path(stage_dir) / "external" / safe


@dataclass
class ExternalReport:
    """What :func:`assemble_external` kept, dropped and linked."""

    name: str
    n_input: int
    #: every image left out, one row each (:data:`EXCLUDED_COLUMNS`, reasons :data:`REASONS`)
    excluded: pd.DataFrame
    #: every external image found to copy a development image (:data:`COPY_COLUMNS`)
    copies: pd.DataFrame
    summary: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        """Plain-JSON counts for ``metrics.json``."""
        reasons = self.excluded["reason"].value_counts() if len(self.excluded) else pd.Series(dtype=int)
        return {
            "name": self.name,
            "n_input": int(self.n_input),
            "n_excluded_by_reason": {r: int(reasons.get(r, 0)) for r in REASONS},
            "n_copies_of_development": int(len(self.copies)),
            "n_linked_patients": int(self.copies[["patient_id", "development_patient_id"]]
                                     .drop_duplicates().shape[0]) if len(self.copies) else 0,
            **self.summary,
        }


def load_external(spec: str | os.PathLike, data_root: str | os.PathLike, *, seed: int | None = None,
                  classes: Sequence[str] | None = ("normal", "pneumonia", "covid")):
    """Build the manifest of an external cohort from a recipe (shipped name or ``.yaml`` path).

    Returns ``(name, manifest, recipe build report)``; the name is the recipe's.
    ``classes``: the labels the classifiers know; a recipe class outside them is refused
    (``None``: any). Every failure (unknown recipe, missing folder, an adapter that cannot
    read its folder, a recipe naming an unknown adapter or class) becomes one
    :class:`ExternalCohortError` line naming the cohort.
    """
    from cxrlib.data import recipes

    label = f"external cohort {os.fspath(spec)!r}"
    try:
        recipe = recipes.load_recipe(spec)
        unknown = sorted(set(recipe.classes) - set(classes)) if classes is not None else []
        if unknown:
            raise ExternalCohortError(f"{label}: unknown class(es) {unknown}; the classifiers know {list(classes)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # skipped rows are in the report
            manifest, report = recipes.build_manifest(recipe, data_root, seed=seed)
    except ExternalCohortError:
        raise
    except (CxrInputError, FileNotFoundError, ValueError, OSError) as error:
        text = " ".join(str(error).split())
        raise ExternalCohortError(f"{label}: {text}") from None
    if not len(manifest):
        raise ExternalCohortError(f"{label}: the recipe takes no image under {data_root}")
    return recipe.name, manifest, report


def _raw_paths(rows: pd.DataFrame) -> pd.Series:
    """The original file of each row: ``raw_path`` where filled (a resized cohort), else ``path``."""
    paths = mf._column(rows, "path")
    if "raw_path" in rows.columns:
        raw = mf._column(rows, "raw_path")
        paths = raw.where(raw != "", paths)
    return paths


def _development_hashes(development: pd.DataFrame) -> pd.Series:
    if "content_hash" in development.columns and mf._column(development, "content_hash").ne("").any():
        return mf._column(development, "content_hash")
    hashed, _ = mf.add_content_hashes(development)
    return mf._column(hashed, "content_hash")


def _near_copies(external: pd.DataFrame, development: pd.DataFrame, near: str, max_distance: int,
                 settings, progress: bool) -> list[tuple[int, int, float]]:
    """``(external position, development position, score)`` of every near copy across the two."""
    ext_paths, dev_paths = list(_raw_paths(external)), list(_raw_paths(development))
    if not ext_paths or not dev_paths:
        return []
    if near == "copies":
        from cxrlib.data.copies import CopySettings, find_copies

        result = find_copies([*dev_paths, *ext_paths], groups=[0] * len(dev_paths) + [1] * len(ext_paths),
                             settings=settings or CopySettings(), progress=progress)
        found = []
        for first, second, score in result.copies[["first", "second", "score"]].itertuples(index=False):
            dev, ext = (first, second) if first < len(dev_paths) else (second, first)
            if dev < len(dev_paths) <= ext:
                found.append((ext - len(dev_paths), dev, float(score)))
        return found
    from cxrlib.data.dedup import near_duplicate_pairs, perceptual_hash

    def hashes(paths: Sequence[str]) -> list[str]:
        out = []
        for path in paths:
            try:
                out.append(perceptual_hash(read_image(path)))
            except (ImageReadError, ValueError):
                out.append("")
        return out

    dev_hashes, ext_hashes = hashes(dev_paths), hashes(ext_paths)
    every = [h for h in dev_hashes if h] + [h for h in ext_hashes if h]
    dev_index = [i for i, h in enumerate(dev_hashes) if h]
    ext_index = [i for i, h in enumerate(ext_hashes) if h]
    pairs = near_duplicate_pairs(every, max_distance)
    found = []
    for first, second, distance in pairs.itertuples(index=False):
        if first < len(dev_index) <= second:
            found.append((ext_index[second - len(dev_index)], dev_index[first], float(distance)))
    return found


def assemble_external(
    external: pd.DataFrame,
    development: pd.DataFrame,
    *,
    name: str,
    out_dir: str | os.PathLike | None = None,
    size: int | None = None,
    near: str | None = "copies",
    max_distance: int = 24,
    copy_settings=None,
    progress: bool = False,
) -> tuple[pd.DataFrame, ExternalReport]:
    """Check an external cohort, drop its copies of development images, put it in the test role.

    ``external``: the cohort's manifest (absolute paths, e.g. :func:`load_external` or
    :func:`cxrlib.data.cohort.hold_out_sites`); ``development``: the assembled development
    manifest (its ``raw_path`` originals, else ``path``, are what copies are looked for in;
    its ``content_hash`` is used when present). ``near``: ``"copies"`` (the copy detector,
    finds re-cropped and re-windowed copies), ``"phash"`` (perceptual hash within
    ``max_distance`` bits of 256) or ``None`` (exact copies only). ``out_dir``: the stage
    folder; when given, the cohort is written to :func:`external_dir` (with ``size``: every
    image decoded and resized to ``size`` x ``size`` PNG there first, as the development
    images were). Returns the external manifest (every row ``split == "test"``, ``cohort ==
    name``) and an :class:`ExternalReport`. Raises :class:`ExternalCohortError` naming the
    cohort when nothing usable is left.
    """
    label = f"external cohort {name!r}"
    if not len(external):
        raise ExternalCohortError(f"{label}: no image to assemble")
    if near not in ("copies", "phash", None):
        raise ValueError(f"{label}: near must be 'copies', 'phash' or None, got {near!r}")
    rows = external.drop_duplicates("image_id").reset_index(drop=True)
    excluded: list[dict] = []

    def exclude(mask: pd.Series | np.ndarray, reason: str, details: Sequence[str] | str = "") -> None:
        picked = rows[np.asarray(mask, dtype=bool)]
        detail_list = [details] * len(picked) if isinstance(details, str) else list(details)
        for (image_id, path), detail in zip(zip(picked["image_id"], picked["path"], strict=True), detail_list,
                                            strict=True):
            excluded.append({"image_id": image_id, "path": path, "reason": reason, "detail": detail})

    # 1. decoding and the development cohort's quality checks
    hashed, load_report = mf.add_content_hashes(rows, progress=progress)
    rows["content_hash"] = mf._column(hashed, "content_hash").to_numpy()
    bad = {item.path: item.error for item in load_report.bad}
    unreadable = rows["content_hash"] == ""
    exclude(unreadable, "unreadable", [bad.get(p, "") for p in rows.loc[unreadable, "path"]])
    rows = rows[~unreadable].reset_index(drop=True)
    problems = []
    for path in rows["path"]:
        try:
            problems.append(image_problem(read_image(path)) or "")
        except ImageReadError as error:
            problems.append(error.reason)
    problems = pd.Series(problems, index=rows.index)
    exclude(problems != "", "degenerate", problems[problems != ""].tolist())
    rows = rows[problems == ""].reset_index(drop=True)
    repeated = rows["content_hash"].duplicated()
    first_id = rows.drop_duplicates("content_hash").set_index("content_hash")["image_id"]
    exclude(repeated, "duplicate within cohort",
            [f"same pixels as {first_id[h]}" for h in rows.loc[repeated, "content_hash"]])
    rows = rows[~repeated].reset_index(drop=True)

    # 2. copies of development images, and their patients
    dev = development.drop_duplicates("image_id").reset_index(drop=True)
    dev_hash = _development_hashes(dev)
    dev_by_hash = dict(zip(dev_hash, range(len(dev)), strict=True))
    copies: list[dict] = []
    exact = rows["content_hash"].map(lambda h: dev_by_hash.get(h, -1))
    for position in np.flatnonzero(exact.to_numpy() >= 0):
        d = int(exact.iloc[position])
        copies.append({"position": position, "kind": "exact", "dev": d, "score": 1.0})
    if near is not None:
        candidates = rows[exact < 0]
        for ext_position, d, score in _near_copies(candidates, dev, near, max_distance, copy_settings, progress):
            copies.append({"position": int(candidates.index[ext_position]), "kind": "near", "dev": d,
                           "score": score})
    copy_table = pd.DataFrame([{
        "image_id": rows.at[c["position"], "image_id"], "patient_id": rows.at[c["position"], "patient_id"],
        "kind": c["kind"], "development_image_id": dev.at[c["dev"], "image_id"],
        "development_patient_id": dev.at[c["dev"], "patient_id"], "score": c["score"],
    } for c in copies], columns=list(COPY_COLUMNS)).drop_duplicates(["image_id", "development_image_id"])
    best = copy_table.sort_values("score", ascending=False).drop_duplicates("image_id").set_index("image_id")
    for kind, reason in (("exact", "exact copy of development"), ("near", "near copy of development")):
        ids = set(best.index[best["kind"] == kind])
        mask = rows["image_id"].isin(ids)
        exclude(mask, reason, [f"copy of {best.at[i, 'development_image_id']} "
                               f"(patient {best.at[i, 'development_patient_id']})" for i in rows.loc[mask, "image_id"]])
    linked = set(copy_table["patient_id"])
    is_copy = rows["image_id"].isin(set(best.index))
    same_patient = rows["patient_id"].isin(linked) & ~is_copy
    exclude(same_patient, "patient of a development copy",
            [f"patient {p} has an image copied in the development cohort" for p in rows.loc[same_patient, "patient_id"]])
    kept = rows[~is_copy & ~same_patient].reset_index(drop=True)
    if not len(kept):
        raise ExternalCohortError(f"{label}: no image left after the quality checks and copy removal "
                                  f"({len(external)} offered)")

    # 3. the test role, and the files beside the development manifest
    for column in mf.COLUMNS:  # a hand-made manifest may lack optional schema columns
        if column not in kept.columns:
            kept[column] = ""
    kept["split"] = "test"
    kept["cohort"] = name
    excluded_table = pd.DataFrame(excluded, columns=list(EXCLUDED_COLUMNS))
    if out_dir is not None:
        folder = external_dir(out_dir, name)
        if size is not None:
            from cxrlib.data.cohort import materialize

            kept, resize_report = materialize(kept, folder, size, progress=progress)
            for item in [*resize_report.bad, *resize_report.dropped]:
                excluded_table.loc[len(excluded_table)] = ["", item.path, "unreadable", item.error]
            if not len(kept):
                raise ExternalCohortError(f"{label}: no image could be resized")
        mf.write_manifest(kept, folder / "manifest.csv", labels=None)
        write_table_csv(copy_table, folder / "copies.csv")
        write_table_csv(excluded_table, folder / "excluded.csv")
    summary = {"n_kept": int(len(kept)), "n_patients": int(kept["patient_id"].nunique()),
               "images_per_label": {str(k): int(v) for k, v in kept["label"].value_counts().items()},
               "near_method": near or "none"}
    return kept, ExternalReport(name=name, n_input=len(external), excluded=excluded_table, copies=copy_table,
                                summary=summary)


def read_external(stage_dir: str | os.PathLike, *,
                  allowed_roots: Sequence[str | os.PathLike] = ()) -> dict[str, pd.DataFrame]:
    """Every external cohort written under ``<stage_dir>/external/`` (name -> manifest), by name.

    ``allowed_roots``: folders besides the defaults the manifests may point into (a cohort
    written without resizing points at its original files, e.g. the phantom cache).
    """
    folder = Path(stage_dir) / "external"
    if not folder.is_dir():
        return {}
    cohorts = {}
    for manifest_path in sorted(folder.glob("*/manifest.csv")):
        frame = mf.read_manifest(manifest_path, labels=None, allowed_roots=allowed_roots)
        name = mf._column(frame, "cohort").iloc[0] if "cohort" in frame.columns and len(frame) else \
            manifest_path.parent.name
        cohorts[name] = frame
    return cohorts


def external_specs(value: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    """Notebook 01's ``EXTERNAL`` parameter as a list of recipe names or paths.

    ``""`` / ``None`` / ``[]``: none; one name (``"cxnet_covid"``, as ``--param
    EXTERNAL=cxnet_covid`` gives it) or a list of them. Repeated entries are kept once.
    """
    if value is None or (isinstance(value, str | os.PathLike) and not os.fspath(value)):
        return []
    items = [value] if isinstance(value, str | os.PathLike) else list(value)
    specs = [os.fspath(item).strip() for item in items]
    if any(not spec for spec in specs):
        raise ExternalCohortError(f"EXTERNAL: an empty cohort name in {items!r}")
    return list(dict.fromkeys(specs))


def load_externals(specs: str | os.PathLike | Sequence[str | os.PathLike] | None, data_root: str | os.PathLike, *,
                   seed: int | None = None,
                   classes: Sequence[str] | None = ("normal", "pneumonia", "covid")) -> dict[str, tuple]:
    """:func:`load_external` for every entry of ``specs`` (:func:`external_specs`), before any
    image is decoded: ``{name: (manifest, recipe build report)}``.

    The first bad cohort stops with its :class:`ExternalCohortError` line (notebook 01 calls
    this first, and ``python -m cxrlib pipeline`` before any notebook runs, so a wrong
    cohort never costs a training run). Two specs giving one recipe name are refused.
    """
    specs = external_specs(specs)
    if specs and not os.fspath(data_root):
        raise ExternalCohortError(f"external cohort {specs[0]!r}: no data folder given (DATA_ROOT or EXTERNAL_ROOT)")
    if specs and not Path(data_root).is_dir():
        raise ExternalCohortError(f"external cohort {specs[0]!r}: data folder {os.fspath(data_root)} does not exist")
    loaded: dict[str, tuple] = {}
    for spec in specs:
        name, manifest, report = load_external(spec, data_root, seed=seed, classes=classes)
        if name in loaded:
            raise ExternalCohortError(f"external cohort {spec!r}: a second cohort named {name!r}")
        loaded[name] = (manifest, report)
    return loaded
