"""Duplicates across sources: identical pixels, near copies, and the patients they link.

Public chest X-ray collections copy from each other (the same case report appears in two
COVID-19 collections, a Kaggle set re-packs NIH images at another size, a synthetic set is
made from images that also sit in a real set). Two checks find such images:

- **exact duplicates**: the SHA-256 of the decoded pixels
  (:func:`cxrlib.data.io.pixel_hash`) is equal, so the same image saved twice or
  re-encoded losslessly;
- **near duplicates** (copies): the copy detector of :mod:`cxrlib.data.copies` (keypoint
  candidates from an index, then alignment and correlation of fine structure), which
  survives what re-publication does: crops up to ~20% per side, borders, rotation,
  window/level, gamma, equalisation, resizing, JPEG and burned-in text. Pairs whose
  perceptual hashes (DCT "pHash" of ``imagehash``, ``hash_size**2`` bits: 256 by default)
  differ in at most ``max_distance`` bits are verified too. pHash alone missed most
  re-cropped and re-windowed copies (``docs/copies.md``); ``method="phash"`` keeps the old
  rule (a pair within ``max_distance`` bits is a near copy) for comparison.

:func:`deduplicate` keeps one copy of each exact-duplicate group (all copies are dropped
when they carry conflicting labels), keeps near duplicates but ties them together, and
links the patients of all of them (column ``patient_group``) so that the patient-level
split (:func:`cxrlib.data.manifest.split_by_patient`) puts them in one split. Synthetic
images whose source is unknown but that look like a real image (near duplicate) get that
image as their source, so they follow it into its split. Every decision is a row of the
report table (:attr:`DedupReport.table`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cxrlib.data import copies
from cxrlib.data import manifest as mf
from cxrlib.data.io import BadFile, ImageReadError, LoadReport, pixel_hash, read_image

#: Columns of :attr:`DedupReport.table`; for a near copy, ``partner`` and the evidence
#: columns after it describe the pair with its closest partner (:mod:`cxrlib.data.copies`).
REPORT_COLUMNS: tuple[str, ...] = (
    "kind", "group", "image_id", "source", "patient_id", "label", "action", "reason", "distance",
    "partner", "score", "inliers", "overlap", "rotation_deg", "scale",
)
#: Evidence columns copied from the detector's pair table into the report.
_EVIDENCE: tuple[str, ...] = ("score", "inliers", "overlap", "rotation_deg", "scale")
#: Copy-detector features of the images :func:`hash_images` decoded, by pixel hash, so that
#: :func:`deduplicate` does not decode them again; bounded (oldest forgotten first).
_FEATURES: OrderedDict[str, copies.ImageFeatures] = OrderedDict()
_FEATURE_CACHE_SIZE = 20_000
#: Bits set in each byte value, for Hamming distances between packed hashes.
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


def perceptual_hash(image: np.ndarray, hash_size: int = 16) -> str:
    """The pHash of an ``(H, W)`` ``uint8`` image as hex (``hash_size**2`` bits: 64 hex
    digits for the default 16), via ``imagehash.phash``."""
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.fromarray(np.asarray(image, dtype=np.uint8)), hash_size=hash_size))


def hash_images(
    df: pd.DataFrame,
    *,
    hash_size: int = 16,
    progress: bool = False,
) -> tuple[pd.DataFrame, LoadReport]:
    """A copy of ``df`` with ``content_hash`` (exact pixels) and ``phash`` (perceptual)
    columns, each image decoded once.

    Paths are absolute, as in every manifest in memory. Unreadable files get
    ``""`` in both columns and are listed in the report (by manifest ``path``), so one
    bad file does not stop the run.
    """
    paths = mf._column(df, "path")
    iterator: Iterable[str] = paths
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(paths, desc="hashing images", unit="img")
    report = LoadReport()
    exact: list[str] = []
    perceptual: list[str] = []
    for value in iterator:
        try:
            image = read_image(mf.resolve_path(None, value))
        except (ImageReadError, ValueError) as error:
            report.bad.append(BadFile(path=value, error=getattr(error, "reason", str(error))))
            exact.append("")
            perceptual.append("")
            continue
        report.n_ok += 1
        exact.append(pixel_hash(image))
        perceptual.append(perceptual_hash(image, hash_size))
        _remember(exact[-1], image)
    result = df.copy()
    result["content_hash"] = exact
    result["phash"] = perceptual
    return result, report


def _remember(content_hash: str, image: np.ndarray) -> None:
    if content_hash not in _FEATURES:
        _FEATURES[content_hash] = copies.describe(image)
        while len(_FEATURES) > _FEATURE_CACHE_SIZE:
            _FEATURES.popitem(last=False)


def _features(work: pd.DataFrame, rows: list[int]) -> list[copies.ImageFeatures | None]:
    """Copy-detector features of ``rows`` of ``work``: from :func:`hash_images`' cache, else
    decoded again (``None`` where the file cannot be read any more)."""
    found: list[copies.ImageFeatures | None] = []
    for index in rows:
        cached = _FEATURES.get(str(work.at[index, "content_hash"]))
        if cached is None:
            try:
                cached = copies.describe(read_image(mf.resolve_path(work, str(work.at[index, "path"]))))
            except (ImageReadError, ValueError):
                cached = None
        found.append(cached)
    return found


def _packed(hashes: list[str]) -> np.ndarray:
    """Hex hashes of equal length -> ``(N, n_bytes)`` ``uint8``."""
    lengths = {len(value) for value in hashes}
    if len(lengths) > 1:
        raise ValueError(f"perceptual hashes of different lengths {sorted(lengths)}: use one hash_size")
    return np.array([list(bytes.fromhex(value.zfill(len(value) + len(value) % 2))) for value in hashes],
                    dtype=np.uint8).reshape(len(hashes), -1)


def near_duplicate_pairs(hashes: list[str], max_distance: int, *, chunk: int = 256) -> pd.DataFrame:
    """Index pairs ``(first, second)`` with ``first < second`` whose hex hashes differ in at
    most ``max_distance`` bits, with their ``distance``; all pairs are compared, in chunks
    of ``chunk`` rows (memory ~ ``chunk * N * n_bytes``)."""
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    empty = pd.DataFrame({"first": [], "second": [], "distance": []}, dtype=int)
    if len(hashes) < 2:
        return empty
    packed = _packed(hashes)
    found = []
    for start in range(0, len(hashes), chunk):
        block = packed[start:start + chunk]
        distances = _POPCOUNT[block[:, None, :] ^ packed[None, :, :]].sum(axis=-1, dtype=np.int32)
        rows, columns = np.nonzero(distances <= max_distance)
        rows = rows + start
        keep = columns > rows
        found.append(np.stack([rows[keep], columns[keep], distances[rows[keep] - start, columns[keep]]], axis=1))
    pairs = np.concatenate(found) if found else np.zeros((0, 3), dtype=int)
    return pd.DataFrame(pairs, columns=["first", "second", "distance"]).astype(int) if len(pairs) else empty


@dataclass
class DedupReport:
    """What :func:`deduplicate` found and did; :attr:`table` has one row per image involved."""

    table: pd.DataFrame
    n_input: int
    max_distance: int
    n_exact_groups: int = 0
    n_near_groups: int = 0
    dropped: list[str] = field(default_factory=list)
    #: every pair the copy detector examined (image ids, paths, evidence, ``copy``)
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)

    def metrics(self) -> dict:
        """Plain-JSON counts for ``metrics.json``."""
        kinds = self.table["kind"] if len(self.table) else pd.Series(dtype=object)
        return {
            "n_input": int(self.n_input),
            "max_hamming_distance": int(self.max_distance),
            "exact_duplicate_groups": int(self.n_exact_groups),
            "exact_duplicate_images": int((kinds == "exact").sum()),
            "near_duplicate_groups": int(self.n_near_groups),
            "near_duplicate_images": int((kinds == "near").sum()),
            "copy_pairs_examined": int(len(self.pairs)),
            "n_dropped": len(self.dropped),
            "dropped_by_reason": {
                str(reason): int(count)
                for reason, count in self.table.loc[self.table["action"] == "dropped", "reason"]
                .str.split(":").str[0].value_counts().items()
            } if len(self.table) else {},
        }


def deduplicate(
    df: pd.DataFrame,
    *,
    max_distance: int = 24,
    drop_exact: bool = True,
    method: str = "copies",
    settings: copies.CopySettings | None = None,
) -> tuple[pd.DataFrame, DedupReport]:
    """Drop exact copies, tie near copies together, link the patients of both.

    ``df`` needs ``content_hash`` and ``phash`` (:func:`hash_images`); rows with an empty
    hash (unreadable) are kept as they are. Exact-duplicate groups (same
    ``content_hash``): with ``drop_exact``, one row is kept (real before synthetic, then
    by ``source`` and ``image_id``) and the others dropped; when the copies carry different
    labels, all are dropped (the label cannot be trusted). Near-duplicate groups
    (connected components of the pairs the copy detector calls copies, with ``settings``;
    pairs within ``max_distance`` pHash bits are always examined; ``method="phash"``: of the
    pHash pairs themselves) are kept and get a ``near_dup_group`` id. The patients of every group, dropped copies included, are joined
    in a ``patient_group`` column (union-find over ``patient_id``), which
    :func:`cxrlib.data.manifest.split_by_patient` honours. A synthetic row without a
    source image that near-duplicates a real row gets the closest real row as its source
    in ``origin``.

    Returns the kept rows and a :class:`DedupReport`.
    """
    if method not in ("copies", "phash"):
        raise ValueError(f"deduplicate: method must be 'copies' or 'phash', got {method!r}")
    for column in ("content_hash", "phash"):
        if column not in df.columns:
            raise ValueError(f"no {column!r} column: run cxrlib.data.dedup.hash_images(df) first")
    work = df.reset_index(drop=True).copy()
    ids = mf._column(work, "image_id")
    patients = mf._column(work, "patient_id")
    labels = mf._column(work, "label")
    real = mf._column(work, "origin").eq(mf.REAL)
    links = mf._UnionFind(patients.unique())
    records: list[dict] = []
    drop: set[int] = set()

    def record(kind: str, group: str, index: int, action: str, reason: str, distance: int | str = "",
               evidence: dict | None = None) -> None:
        records.append({"kind": kind, "group": group, "image_id": ids[index],
                        "source": str(work.at[index, "source"]), "patient_id": patients[index],
                        "label": labels[index], "action": action, "reason": reason, "distance": distance,
                        **(evidence or {})})

    # exact copies
    hashes = mf._column(work, "content_hash")
    hashed = hashes != ""
    n_exact = 0
    for content_hash, members in work[hashed].groupby(hashes[hashed]).groups.items():
        if len(members) < 2:
            continue
        n_exact += 1
        group = f"exact-{content_hash[:12]}"
        order = sorted(members, key=lambda i: (not real[i], str(work.at[i, "source"]), ids[i]))
        for other in order[1:]:
            links.union(patients[order[0]], patients[other])
        group_labels = sorted(set(labels[order]))
        if len(group_labels) > 1:
            for index in order:
                if drop_exact:
                    drop.add(index)
                record("exact", group, index, "dropped" if drop_exact else "grouped",
                       f"label conflict: identical image labelled {' / '.join(group_labels)}", 0)
            continue
        record("exact", group, order[0], "kept", f"exact duplicate group of {len(order)}", 0)
        for index in order[1:]:
            if drop_exact:
                drop.add(index)
            record("exact", group, index, "dropped" if drop_exact else "grouped",
                   f"exact duplicate: same pixels as {ids[order[0]]}", 0)

    # near copies among the rows still kept (an exact copy adds nothing new)
    candidates = [i for i in work.index if hashed[i] and i not in drop and mf._column(work, "phash")[i]]
    pairs = near_duplicate_pairs([work.at[i, "phash"] for i in candidates], max_distance)
    examined = pd.DataFrame()
    evidence: dict[tuple[int, int], dict] = {}
    if method == "copies":
        pairs, examined, evidence = _copy_pairs(work, candidates, pairs, settings)
    components = mf._UnionFind(str(i) for i in candidates)
    closest: dict[int, tuple[int, int]] = {}
    # the closest partner: the smallest pHash distance, then (copies) the highest score
    rank = {(a, b): (d, -evidence.get((a, b), {}).get("score", 0.0))
            for a, b, d in pairs.itertuples(index=False)}
    for first, second, distance in pairs.itertuples(index=False):
        a, b = candidates[first], candidates[second]
        components.union(str(a), str(b))
        for one, other in ((a, b), (b, a)):
            if one not in closest or rank[(first, second)] < closest[one][2]:
                closest[one] = (other, int(distance), rank[(first, second)])
    near_group = pd.Series("", index=work.index, dtype=object)
    members_of: dict[str, list[int]] = {}
    for index in closest:
        members_of.setdefault(components.find(str(index)), []).append(index)
    sources = mf._source_ids(work)
    position = {row: number for number, row in enumerate(candidates)}
    for number, members in enumerate(sorted(members_of.values(), key=min), start=1):
        group = f"near-{number:05d}"
        for index in sorted(members):
            near_group[index] = group
            links.union(patients[min(members)], patients[index])
            partner, distance, _ = closest[index]
            reason = f"near duplicate of {ids[partner]}"
            key = tuple(sorted((position[index], position[partner])))
            pair_evidence = {"partner": ids[partner], **evidence.get(key, {})}
            if not real[index] and not sources[index] and real[partner]:
                generator, checkpoint, _ = mf.parse_origin(work.at[index, "origin"])
                work.at[index, "origin"] = mf.make_origin(generator, checkpoint, ids[partner])
                reason += " (taken as its source image: the synthetic image follows it into its split)"
            record("near", group, index, "grouped", reason, distance, pair_evidence)
    n_near = len(members_of)

    work["near_dup_group"] = near_group
    group_of = patients.map(links.find)
    sizes = patients[real].groupby(group_of[real]).nunique()
    work["patient_group"] = [
        group if real[i] and sizes.get(group, 0) > 1 else "" for i, group in enumerate(group_of)
    ]
    kept = work.drop(index=sorted(drop)).reset_index(drop=True)
    table = pd.DataFrame(records, columns=list(REPORT_COLUMNS))
    report = DedupReport(table=table, n_input=len(df), max_distance=max_distance,
                         n_exact_groups=n_exact, n_near_groups=n_near,
                         dropped=[ids[i] for i in sorted(drop)], pairs=examined)
    return kept, report


def _copy_pairs(work: pd.DataFrame, candidates: list[int], phash_pairs: pd.DataFrame,
                settings: copies.CopySettings | None,
                ) -> tuple[pd.DataFrame, pd.DataFrame, dict[tuple[int, int], dict]]:
    """The copy detector on ``candidates`` (row numbers of ``work``), pHash pairs examined too.

    Returns the copies as ``first, second, distance`` positions in ``candidates`` (pHash
    bits as distance), every examined pair with image ids and evidence, and the evidence
    of each copy by position pair.
    """
    settings = settings or copies.CopySettings()
    features = _features(work, candidates)
    result = copies.find_copies(features, settings=settings,
                                extra_pairs=phash_pairs[["first", "second"]].itertuples(index=False))
    examined = result.pairs.copy()
    ids = mf._column(work, "image_id")
    examined["image_id_first"] = [ids[candidates[i]] for i in examined["first"]]
    examined["image_id_second"] = [ids[candidates[i]] for i in examined["second"]]
    examined["path_first"] = [str(work.at[candidates[i], "path"]) for i in examined["first"]]
    examined["path_second"] = [str(work.at[candidates[i], "path"]) for i in examined["second"]]
    packed = _packed([str(work.at[i, "phash"]) for i in candidates])
    examined["phash_distance"] = _POPCOUNT[packed[examined["first"].to_numpy()]
                                           ^ packed[examined["second"].to_numpy()]].sum(axis=1, dtype=int)
    found = examined[examined["copy"]]
    evidence = {(int(row.first), int(row.second)): {name: getattr(row, name) for name in _EVIDENCE}
                for row in found.itertuples(index=False)}
    pairs = pd.DataFrame({"first": found["first"], "second": found["second"],
                          "distance": found["phash_distance"]}).astype(int).reset_index(drop=True)
    return pairs, examined.drop(columns=["first", "second"]), evidence
