"""Copy detection that survives re-publication: the same film, cropped, padded, rotated,
re-windowed, resized, re-encoded or annotated, found across and within collections.

Public COVID-19 collections copy films from each other, and every copy has been handled a
little differently, so byte, pixel and perceptual hashes miss most of them. The detector
works in three steps, chosen by measurement on ``benchmarks/bench_copies.py``
(``docs/copies.md`` gives the figures and the alternatives that lost):

1. **describe** each image once (:func:`describe`): uniform borders and padding trimmed,
   the longest side resized to ``CopySettings.feature_size`` pixels, the histogram
   equalised (window/level, gamma and equalisation are monotone grey-level maps), then
   up to ``n_features`` SIFT keypoints (OpenCV) with RootSIFT descriptors stored as bytes,
   and a small ``size``-pixel copy of the canonical image for verification, its clipped
   pixels (a window that saturates) marked;
2. **candidates** (:func:`candidate_pairs`): every keypoint descriptor goes into one faiss
   index (exact for small sets, an inverted file above; sub-quadratic); each descriptor
   looks up its nearest neighbours, a match passing Lowe's ratio test is a vote for the
   image it belongs to, and the ``k`` images with the most votes (at least ``min_votes``)
   become candidates;
3. **verification** (:func:`verify_pair`): the votes' matches give a similarity map
   (RANSAC, ``estimateAffinePartial2D``), which ECC alignment (``findTransformECC``,
   affine, masked to the covered part) may refine on the small canonical images; the
   finer of the two images is warped (cubic) onto the coarser one, and the pair is
   compared on its overlap by the correlation of a fine band-pass (difference of
   Gaussians, :data:`BAND`), leaving out saturated and clipped pixels (windows, burned-in
   text), as the median over ``tiles x tiles`` tiles. The same film gives a high score; a
   follow-up film of the same patient matches in anatomy but not in fine structure.
   :func:`is_copy` adds limits on rotation, scale and overlap.

:func:`find_copies` runs the three steps over one or more lists of images and returns one
row per examined pair with its evidence; :func:`folder_paths` lists a folder's images.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlib.data.io import BadFile, ImageReadError, LoadReport, read_image

#: Image file suffixes :func:`folder_paths` lists.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".tif",
                                   ".tiff", ".gif", ".dcm", ".dicom")
#: Columns of :func:`find_copies`' table (``first`` / ``second``: positions in the input).
PAIR_COLUMNS: tuple[str, ...] = (
    "first", "second", "path_first", "path_second", "score", "copy", "votes", "inliers", "tight_share",
    "correlation", "coarse_correlation", "overlap", "rotation_deg", "scale", "aligned", "refined",
)


@dataclass(frozen=True)
class CopySettings:
    """Knobs of the detector; the defaults are the ones measured in ``docs/copies.md``."""

    feature_size: int = 192         # longest side (pixels) of the image SIFT looks at
    size: int = 128                 # longest side (pixels) of the image verification aligns
    n_features: int = 200           # SIFT keypoints per image
    contrast_threshold: float = 0.01  # SIFT's contrast threshold (OpenCV's default 0.04 finds too few)
    ratio: float = 0.85             # Lowe's ratio test for a descriptor match
    k: int = 5                      # candidate partners per image
    min_votes: int = 3              # fewer matched keypoints: not a candidate
    min_inliers: int = 6            # fewer RANSAC inliers: not aligned further, not a copy
    tiles: int = 4                  # the score is the median correlation over tiles x tiles
    min_correlation: float = 0.4    # band-pass correlation from which a pair is a copy ...
    min_tight_share: float = 0.25   # ... when this share of its keypoint matches fits the map within TIGHT_PIXELS
    max_rotation_deg: float = 20.0  # larger rotations are not re-publication
    max_scale_ratio: float = 2.5    # larger relative scale is not re-publication
    min_overlap: float = 0.3        # share of the smaller image that must overlap the other
    blank_std: float = 2.0          # border trimming: a row/column this uniform is padding

    def __post_init__(self) -> None:
        if self.size < 32 or self.feature_size < 32 or self.k < 1 or self.n_features < 8:
            raise ValueError(f"CopySettings: size, feature_size >= 32, k >= 1, n_features >= 8 "
                             f"needed, got {self}")


# ----------------------------------------------------------------------------- one image


def trim_borders(image: np.ndarray, blank_std: float = 2.0, max_share: float = 0.45) -> np.ndarray:
    """``image`` ``(H, W)`` without the uniform rows/columns at its edges (padding, borders).

    A row or column is uniform when its standard deviation is below ``blank_std`` grey
    levels; at most ``max_share`` of each dimension is cut from each side.
    """
    pixels = np.asarray(image, dtype=np.float32)
    height, width = pixels.shape

    def edges(std: np.ndarray, length: int) -> tuple[int, int]:
        limit = int(length * max_share)
        busy = np.flatnonzero(std >= blank_std)
        if not len(busy):
            return 0, length
        return min(int(busy[0]), limit), max(int(busy[-1]) + 1, length - limit)

    top, bottom = edges(pixels.std(axis=1), height)
    left, right = edges(pixels.std(axis=0), width)
    return np.asarray(image)[top:bottom, left:right]


def _trimmed(image: np.ndarray, blank_std: float) -> np.ndarray:
    pixels = np.asarray(image)
    if pixels.ndim != 2:
        raise ValueError(f"copy detection needs an (H, W) grey image, got shape {pixels.shape}")
    return np.ascontiguousarray(trim_borders(pixels, blank_std), dtype=np.uint8)


def _longest_side(image: np.ndarray, size: int) -> np.ndarray:
    import cv2

    height, width = image.shape
    scale = size / max(height, width)
    return cv2.resize(image, (max(8, round(width * scale)), max(8, round(height * scale))),
                      interpolation=cv2.INTER_AREA)


#: Grey levels (of 255) within which a pixel counts as clipped at the image's darkest or
#: brightest value: a window that clips, then resizing and JPEG, leave flat regions a few
#: levels above black or below white whose only texture is compression noise.
CLIP_TOLERANCE: int = 8


def _mark_clipped(plain: np.ndarray, small: np.ndarray) -> np.ndarray:
    """``small`` (equalised) with the pixels that were clipped set to 0 and every other pixel
    at least 1, so that verification leaves them out (:func:`_compare` treats 0 and 255 as
    saturated). Clipped: within :data:`CLIP_TOLERANCE` of the darkest or brightest level of
    ``plain``, the trimmed image on ``small``'s grid before equalisation."""
    low, high = int(plain.min()), int(plain.max())
    clipped = (plain <= low + CLIP_TOLERANCE) | (plain >= high - CLIP_TOLERANCE)
    return np.where(clipped, 0, np.maximum(small, 1)).astype(np.uint8)


@dataclass
class ImageFeatures:
    """One image as the detector keeps it (about ``size**2 + 136 * n_features`` bytes).

    ``small``: ``(h, w)`` ``uint8`` canonical image, longest side ``size``, clipped pixels
    set to 0 (:func:`_mark_clipped`); ``points``: ``(K, 2)`` ``float32`` keypoint positions
    in ``small``'s pixels; ``descriptors``: ``(K, 128)`` ``uint8`` RootSIFT descriptors
    (:func:`root_sift`; ``K`` may be 0 for a blank image).
    """

    small: np.ndarray
    points: np.ndarray
    descriptors: np.ndarray


#: Length of a keypoint descriptor (SIFT).
DESCRIPTOR_DIM: int = 128


def _detector(settings: CopySettings):
    import cv2

    # a low contrast threshold: the canonical images are small and smooth
    return cv2.SIFT_create(nfeatures=settings.n_features, contrastThreshold=settings.contrast_threshold)


def root_sift(descriptors: np.ndarray | None) -> np.ndarray:
    """``(K, 128)`` SIFT descriptors as ``uint8`` RootSIFT (Arandjelovic & Zisserman 2012:
    L1-normalised, square-rooted, so that Euclidean distance compares them as the Hellinger
    kernel does), scaled to 0-255: 128 bytes per keypoint."""
    if descriptors is None or not len(descriptors):
        return np.zeros((0, DESCRIPTOR_DIM), dtype=np.uint8)
    values = np.asarray(descriptors, dtype=np.float32)
    values = np.sqrt(values / np.maximum(values.sum(axis=1, keepdims=True), 1e-6))
    return np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)


def describe(image: np.ndarray, settings: CopySettings = CopySettings(), detector=None) -> ImageFeatures:
    """:class:`ImageFeatures` of an ``(H, W)`` ``uint8`` image."""
    import cv2

    trimmed = _trimmed(image, settings.blank_std)
    canonical = cv2.equalizeHist(_longest_side(trimmed, settings.feature_size))
    keypoints, descriptors = (detector or _detector(settings)).detectAndCompute(canonical, None)
    descriptors = root_sift(descriptors)
    scale = settings.size / settings.feature_size
    shape = (max(8, round(canonical.shape[1] * scale)), max(8, round(canonical.shape[0] * scale)))
    small = cv2.resize(canonical, shape, interpolation=cv2.INTER_AREA)
    small = _mark_clipped(cv2.resize(trimmed, shape, interpolation=cv2.INTER_AREA), small)
    points = np.array([kp.pt for kp in keypoints], dtype=np.float32).reshape(-1, 2) * scale
    return ImageFeatures(small=small, points=points, descriptors=descriptors)


# ----------------------------------------------------------------------------- verification


@dataclass
class PairEvidence:
    """What verification measured on one pair: ``inliers`` of the RANSAC map among the
    keypoint matches, ``correlation`` (band-pass, -1..1, the decision), ``coarse_correlation``
    (the equalised images themselves), ``overlap`` (share of the smaller image), the map's
    ``rotation_deg`` and ``scale``; ``aligned`` is False when the keypoints gave no map
    with ``min_inliers`` inliers (such a pair is never a copy); ``refined`` says whether ECC
    improved on the keypoint map; ``tight_share`` is the share of all keypoint matches that
    the keypoint map explains within :data:`TIGHT_PIXELS` (a copy is one rigid picture, so
    most of its matches fit to a fraction of a pixel; a follow-up film of the same patient,
    breathing and posed a little differently, fits only loosely)."""

    inliers: int
    correlation: float
    coarse_correlation: float
    overlap: float
    rotation_deg: float
    scale: float
    aligned: bool
    refined: bool = False
    tight_share: float = 0.0


#: Reprojection error (pixels of the ``size`` image) within which a keypoint match fits the
#: map tightly (:attr:`PairEvidence.tight_share`).
TIGHT_PIXELS: float = 0.7

#: Scales (pixels of the ``size`` image) of the band-pass comparison: the finest band that
#: resizing and JPEG leave, where follow-up films of one patient stop matching (docs/copies.md).
BAND: tuple[float, float] = (0.7, 1.8)


#: A tile takes part in the median when at least this share of its pixels is usable (a
#: window that clips leaves large saturated areas out).
MIN_TILE_SHARE: float = 0.1


def _band_pass(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(image, (0, 0), BAND[0]) - cv2.GaussianBlur(image, (0, 0), BAND[1])


def _masked_corr(first: np.ndarray, second: np.ndarray, mask: np.ndarray) -> float:
    if mask.sum() < 50:
        return 0.0
    a = first[mask].astype(np.float64)
    b = second[mask].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def match_keypoints(first: ImageFeatures, second: ImageFeatures, ratio: float = 0.85,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Matched keypoint positions ``(M, 2)`` in ``first`` and in ``second`` (ratio test)."""
    import cv2

    if len(first.descriptors) < 2 or len(second.descriptors) < 2:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    matches = cv2.BFMatcher(cv2.NORM_L2).knnMatch(first.descriptors.astype(np.float32),
                                                  second.descriptors.astype(np.float32), k=2)
    good = [pair[0] for pair in matches if len(pair) == 2 and pair[0].distance < ratio * pair[1].distance]
    # one match per keypoint of ``second``: many-to-one matches let RANSAC fit a map that
    # sends everything to one point
    best: dict[int, object] = {}
    for match in good:
        if match.trainIdx not in best or match.distance < best[match.trainIdx].distance:
            best[match.trainIdx] = match
    good = list(best.values())
    return (first.points[[m.queryIdx for m in good]].reshape(-1, 2),
            second.points[[m.trainIdx for m in good]].reshape(-1, 2))


def _compare(template: np.ndarray, moving: np.ndarray, warp: np.ndarray, tiles: int,
             ) -> tuple[float, float, np.ndarray]:
    """Band-pass correlation (median over ``tiles x tiles`` tiles, so that burned-in text or
    an arrow spoils a few tiles, not the score), plain correlation, and the usable mask, of
    ``moving`` warped by ``warp`` (template -> moving pixels) onto ``template``."""
    import cv2

    height, width = template.shape
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(moving, warp, (width, height), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                            borderValue=0.0)  # cubic: linear smooths away the band compared
    valid = cv2.warpAffine(np.ones_like(moving), warp, (width, height), flags=flags,
                           borderValue=0.0) > 0.99
    # saturated pixels (a clipped window, burned-in text, rotation corners) carry no structure
    saturated = ((template <= 0.5) | (template >= 254.5) | (warped < 0.5) | (warped > 254.5))
    usable = valid & ~cv2.dilate(saturated.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    usable = cv2.erode(usable.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    fill = float(warped[valid].mean()) if valid.any() else 0.0
    band_template = _band_pass(template)
    band_moving = _band_pass(np.where(valid, warped, fill).astype(np.float32))
    scores = []
    for rows in np.array_split(np.arange(height), tiles):
        for columns in np.array_split(np.arange(width), tiles):
            block = np.ix_(rows, columns)
            if usable[block].sum() >= MIN_TILE_SHARE * len(rows) * len(columns):
                scores.append(_masked_corr(band_template[block], band_moving[block], usable[block]))
    if len(scores) >= max(2, tiles * tiles // 5):
        band = float(np.median(scores))
    elif usable.mean() >= MIN_TILE_SHARE:  # too few tiles (a window clipped most of the film): one region
        band = _masked_corr(band_template, band_moving, usable)
    else:
        band = 0.0
    return band, _masked_corr(template, warped, usable), valid


def _plausible(warp: np.ndarray | None, settings: CopySettings) -> bool:
    if warp is None:
        return False
    linear = warp[:, :2].astype(np.float64)
    scale = math.sqrt(abs(float(np.linalg.det(linear))))
    rotation = math.degrees(math.atan2(linear[1, 0] - linear[0, 1], linear[0, 0] + linear[1, 1]))
    return 1 / settings.max_scale_ratio <= scale <= settings.max_scale_ratio and \
        abs(rotation) <= settings.max_rotation_deg


def _similarity(points_first: np.ndarray, points_second: np.ndarray, settings: CopySettings,
                ) -> tuple[np.ndarray | None, int]:
    """RANSAC similarity map first -> second and its inlier count. Chest films repeat
    themselves (ribs), so a first fit can be a wrong, implausible map: then the matches it
    explained are set aside and the rest fitted again, at most twice."""
    import cv2

    keep = np.ones(len(points_first), dtype=bool)
    for _ in range(3):
        if keep.sum() < 3:
            break
        warp, mask = cv2.estimateAffinePartial2D(points_first[keep], points_second[keep], method=cv2.RANSAC,
                                                 ransacReprojThreshold=2.0, maxIters=4000, confidence=0.995)
        if warp is None or mask is None:
            break
        if _plausible(warp, settings):
            return warp, int(mask.sum())
        explained = np.flatnonzero(keep)[mask.ravel().astype(bool)]
        keep[explained] = False
    return None, 0


def verify_pair(first: ImageFeatures, second: ImageFeatures,
                settings: CopySettings = CopySettings()) -> PairEvidence:
    """Align ``second`` to ``first`` and compare them (see the module docstring).

    The keypoint matches give a similarity map (RANSAC); ECC refines it, with the template
    masked to the part the other image covers (else a crop drags the alignment towards
    the empty border); the better-scoring of the two maps is kept.
    """
    import cv2

    template, moving = first.small.astype(np.float32), second.small.astype(np.float32)
    height, width = template.shape
    points_first, points_second = match_keypoints(first, second, settings.ratio)
    warp, inliers = None, 0
    if len(points_first) >= 3:
        # the map takes first's pixels to second's (what ECC and WARP_INVERSE_MAP expect)
        warp, inliers = _similarity(points_first, points_second, settings)
    aligned = warp is not None and inliers >= settings.min_inliers
    tight_share = 0.0
    if warp is not None and len(points_first):
        errors = np.linalg.norm(points_first @ warp[:, :2].T + warp[:, 2] - points_second, axis=1)
        tight_share = float(np.mean(errors < TIGHT_PIXELS))
    if warp is None:  # no usable matches: assume both show the whole film
        warp = np.array([[moving.shape[1] / width, 0, 0], [0, moving.shape[0] / height, 0]])
    warp = warp.astype(np.float32)
    scale = math.sqrt(abs(float(np.linalg.det(warp[:, :2].astype(np.float64)))))
    if scale < 1 / 1.05:
        # ``first`` shows the film more finely than ``second``: compare in the coarser image's
        # pixels (else the band-pass of the finer image holds detail the other never had)
        warp = cv2.invertAffineTransform(warp).astype(np.float32)
        template, moving = moving, template
        height, width = template.shape
        scale = 1 / scale
    if scale > 1.05:  # second is sampled more finely: smooth it first so that warping does not alias
        moving = cv2.GaussianBlur(moving, (0, 0), 0.5 * math.sqrt(scale**2 - 1))
    correlation, coarse, valid = _compare(template, moving, warp, settings.tiles)
    refined = False
    if aligned:  # ECC is most of the cost: only for pairs with a keypoint map
        mask = cv2.erode(valid.astype(np.uint8), np.ones((9, 9), np.uint8))
        try:
            _, ecc_warp = cv2.findTransformECC(
                template, moving, warp.copy(), cv2.MOTION_AFFINE,
                (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4), mask, 3)
            ecc_correlation, ecc_coarse, ecc_valid = _compare(template, moving, ecc_warp, settings.tiles)
            if ecc_correlation > correlation:
                warp, correlation, coarse, valid, refined = ecc_warp, ecc_correlation, ecc_coarse, ecc_valid, True
        except cv2.error:
            pass  # ECC did not converge: the keypoint map stands
    linear = warp[:, :2].astype(np.float64)
    scale = math.sqrt(abs(float(np.linalg.det(linear))))
    rotation = math.degrees(math.atan2(linear[1, 0] - linear[0, 1], linear[0, 0] + linear[1, 1]))
    moving_in_first = moving.size / scale**2 if scale > 0 else 0.0
    overlap = float(valid.sum()) / max(min(template.size, moving_in_first), 1.0)
    return PairEvidence(inliers=inliers, correlation=correlation, coarse_correlation=coarse,
                        overlap=min(overlap, 1.0), rotation_deg=rotation, scale=scale,
                        aligned=aligned, refined=refined, tight_share=tight_share)


def is_copy(evidence: PairEvidence, settings: CopySettings = CopySettings()) -> bool:
    """The decision: correlated fine structure under a tight, plausible re-publication map."""
    scale = max(evidence.scale, 1e-6)
    return bool(evidence.aligned and evidence.correlation >= settings.min_correlation
                and evidence.tight_share >= settings.min_tight_share
                and abs(evidence.rotation_deg) <= settings.max_rotation_deg
                and 1 / settings.max_scale_ratio <= scale <= settings.max_scale_ratio
                and evidence.overlap >= settings.min_overlap)


# ----------------------------------------------------------------------------- many images


#: Descriptors per inverted list, about: the index adds lists, not length, as a collection
#: grows, so that a query costs the same at 2,500 images as at 100,000 (``docs/copies.md``).
LIST_SIZE: int = 512
#: Inverted lists searched per query.
NPROBE: int = 8


def _coarse_centroids(sample: np.ndarray, n_lists: int, seed: int) -> np.ndarray:
    """``(n_lists, D)`` ``float32`` k-means centroids of ``sample`` in two levels (as
    ``faiss.contrib.clustering.two_level_clustering``): about ``sqrt(n_lists)`` clusters,
    then each split into a number of centroids proportional to its size. Cost grows like
    ``len(sample) * sqrt(n_lists)``, where one level of ``n_lists`` centroids would grow
    like ``len(sample) * n_lists``. Every cluster gets at least one centroid and never more
    than it has points (where the contrib function could give a small cluster none)."""
    import faiss

    dim = sample.shape[1]
    n_first = max(1, min(int(math.sqrt(n_lists)), len(sample)))
    first = faiss.Kmeans(dim, n_first, niter=10, seed=seed, max_points_per_centroid=2000)
    first.train(sample)
    _, assign = first.index.search(sample, 1)
    assign = assign.ravel()
    sizes = np.bincount(assign, minlength=n_first)
    shares = np.minimum(sizes, np.maximum(1, np.rint(sizes * n_lists / len(sample)).astype(int)))
    centroids = []
    for cluster in np.flatnonzero(sizes):
        members = sample[assign == cluster]
        if shares[cluster] == 1:
            centroids.append(members.mean(axis=0, keepdims=True))
            continue
        second = faiss.Kmeans(dim, int(shares[cluster]), niter=6, seed=seed + 1 + int(cluster),
                              min_points_per_centroid=1)
        second.train(members)
        centroids.append(second.centroids)
    return np.ascontiguousarray(np.concatenate(centroids), dtype=np.float32)


class _DescriptorIndex:
    """A faiss index over ``(M, 128)`` ``uint8`` RootSIFT descriptors (one array, or blocks
    of them indexed in order): exact search below ``exact_below`` of them; above, an inverted
    file of about ``M / list_size`` lists (k-means in two levels on a sample), a graph
    (HNSW) over the list centroids to pick the ``nprobe`` lists a query scans, and the
    vectors stored as bytes (``QT_8bit_direct``: exact, 128 bytes each). A query then costs
    about ``nprobe * list_size`` vector comparisons plus a graph walk whatever ``M`` is, so
    the whole search grows like ``M``, not ``M**2``. :meth:`search` takes ``uint8``
    queries and returns Euclidean (not squared) distances."""

    def __init__(self, descriptors: np.ndarray | Sequence[np.ndarray], seed: int = 0,
                 exact_below: int = 100_000, list_size: int = LIST_SIZE, nprobe: int = NPROBE) -> None:
        import faiss

        blocks = [descriptors] if isinstance(descriptors, np.ndarray) else [b for b in descriptors if len(b)]
        total = sum(len(block) for block in blocks)
        dim = blocks[0].shape[1] if blocks else DESCRIPTOR_DIM
        self.n_lists = 0
        if total < exact_below:  # BLAS search over float copies (under 51 MB)
            self.index = faiss.IndexFlatL2(dim)
        else:
            self.n_lists = max(64, total // list_size)
            rows = np.sort(np.random.default_rng(seed).choice(total, min(total, 48 * self.n_lists), replace=False))
            sample = _rows(blocks, rows).astype(np.float32)
            self._quantizer = faiss.IndexHNSWFlat(dim, 32)  # kept alive with the index
            self._quantizer.hnsw.efConstruction = 40
            self._quantizer.add(_coarse_centroids(sample, self.n_lists, seed))
            self._quantizer.hnsw.efSearch = max(4 * nprobe, 32)
            self.n_lists = self._quantizer.ntotal
            # the vectors themselves, not their residuals: bytes cannot hold a negative residual
            self.index = faiss.IndexIVFScalarQuantizer(self._quantizer, dim, self.n_lists,
                                                       faiss.ScalarQuantizer.QT_8bit_direct, faiss.METRIC_L2, False)
            self.index.is_trained = True  # 8-bit direct codes need no training; the lists are set
            self.index.nprobe = nprobe
        for block in blocks:
            for start in range(0, len(block), 200_000):  # float copies one part at a time
                self.index.add(np.ascontiguousarray(block[start:start + 200_000], dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        distances, found = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return np.sqrt(np.maximum(distances, 0.0)), found


def _rows(blocks: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted positions in the blocks laid end to end) of ``blocks``."""
    ends = np.cumsum([len(block) for block in blocks])
    which = np.searchsorted(ends, rows, side="right")
    starts = ends - np.array([len(block) for block in blocks])
    return np.concatenate([blocks[b][rows[which == b] - starts[b]] for b in np.unique(which)])


def candidate_pairs(features: Sequence[ImageFeatures], settings: CopySettings = CopySettings(),
                    groups: Sequence[int] | None = None, chunk: int = 20_000) -> pd.DataFrame:
    """Pairs worth verifying: ``first < second`` positions in ``features``, with ``votes``.

    All keypoint descriptors go into one faiss index (:class:`_DescriptorIndex`); each
    descriptor looks up its nearest neighbours, and the nearest one from another image
    votes for that image when it passes Lowe's ratio test against the nearest one from a
    third image (so several copies of one film do not cancel each other out). Each image
    keeps its ``settings.k`` best-voted partners with at least ``min_votes`` votes. With
    ``groups`` (one id per image), only pairs across groups are kept (and only they vote).
    Memory: the descriptors (128 bytes each, twice: the features and the index, which also
    keeps an 8-byte id per descriptor) and the search results of one ``chunk`` of queries.
    """
    n_images = len(features)
    empty = pd.DataFrame({"first": [], "second": [], "votes": []}, dtype=int)
    group_of = np.zeros(n_images, dtype=np.int64) if groups is None else np.asarray(groups)
    if len(group_of) != n_images:
        raise ValueError(f"candidate_pairs: {len(group_of)} group ids for {n_images} images")
    counts = [len(f.descriptors) for f in features]
    if n_images < 2 or sum(counts) < 2:
        return empty
    owner = np.repeat(np.arange(n_images), counts)
    index = _DescriptorIndex([f.descriptors for f in features])
    cross_only = groups is not None and len(set(group_of.tolist())) > 1
    neighbours = 8
    voters, voted = [], []
    ends = np.cumsum(counts)
    starts = ends - counts
    first_image = 0
    while first_image < n_images:  # whole images, about ``chunk`` descriptors at a time
        last_image = max(first_image + 1, int(np.searchsorted(ends, starts[first_image] + chunk, side="right")))
        start, stop = int(starts[first_image]), int(ends[last_image - 1])
        queries = [f.descriptors for f in features[first_image:last_image] if len(f.descriptors)]
        first_image = last_image
        if not queries:
            continue
        distances, found = index.search(np.concatenate(queries), neighbours)
        query_owner = owner[start:stop]
        other = np.where(found >= 0, owner[np.maximum(found, 0)], -1)
        usable = (found >= 0) & (other != query_owner[:, None])
        if cross_only:
            usable &= group_of[np.maximum(other, 0)] != group_of[query_owner][:, None]
        rows = np.arange(len(found))
        first = np.argmax(usable, axis=1)
        has_first = usable[rows, first]
        best = other[rows, first]
        # the nearest usable neighbour that belongs to yet another image
        runner_up = usable & (other != best[:, None])
        second = np.argmax(runner_up, axis=1)
        has_second = runner_up[rows, second]
        runner = other[rows, second]
        # and the nearest one from a third image: when two images (a film and its copy, or
        # two copies) match equally well, both are distinctive against the rest
        third_up = runner_up & (other != runner[:, None])
        third = np.argmax(third_up, axis=1)
        has_third = third_up[rows, third]
        d_first, d_second, d_third = (distances[rows, column] for column in (first, second, third))
        passes = has_first & (~has_second | (d_first < settings.ratio * d_second)
                              | ~has_third | (d_first < settings.ratio * d_third))
        passes_second = has_second & (~has_third | (d_second < settings.ratio * d_third))
        voters += [query_owner[passes], query_owner[passes_second]]
        voted += [best[passes], runner[passes_second]]
    if not voters:
        return empty
    votes = pd.DataFrame({"query": np.concatenate(voters), "partner": np.concatenate(voted)})
    votes = votes.groupby(["query", "partner"]).size().rename("votes").reset_index()
    votes = votes[votes["votes"] >= settings.min_votes]
    votes = votes.sort_values(["query", "votes", "partner"], ascending=[True, False, True])
    votes = votes.groupby("query").head(settings.k)
    if not len(votes):
        return empty
    first_id = np.minimum(votes["query"], votes["partner"])
    second_id = np.maximum(votes["query"], votes["partner"])
    pairs = pd.DataFrame({"first": first_id, "second": second_id, "votes": votes["votes"]})
    pairs = pairs.groupby(["first", "second"], as_index=False)["votes"].max()
    return pairs.sort_values(["first", "second"]).reset_index(drop=True).astype(int)


def folder_paths(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted; suffixes in :data:`IMAGE_SUFFIXES`)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    return sorted(path for path in root.rglob("*")
                  if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def default_workers() -> int:
    """Threads :func:`describe_many` and :func:`describe_paths` use by default: the cores this
    process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _map_described(function: Callable, items: Iterable, settings: CopySettings, workers: int | None) -> Iterator:
    """``function(item, detector)`` for each item, in order, on ``workers`` threads, each with
    its own SIFT detector (OpenCV releases the interpreter lock while it works, so threads
    run in parallel: describing 400 images took 1.3-1.9x less wall time on 2 cores)."""
    workers = default_workers() if workers is None else max(1, int(workers))
    if workers == 1:
        detector = _detector(settings)
        for item in items:
            yield function(item, detector)
        return
    local = threading.local()

    def run(item):
        if not hasattr(local, "detector"):
            local.detector = _detector(settings)
        return function(item, local.detector)

    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(run, items)


def describe_many(images: Iterable[np.ndarray], settings: CopySettings = CopySettings(),
                  workers: int | None = None) -> list[ImageFeatures]:
    """:func:`describe` each ``(H, W)`` ``uint8`` image, ``workers`` threads at a time (default:
    :func:`default_workers`); the same features as one at a time."""
    return list(_map_described(lambda image, detector: describe(image, settings, detector), images, settings,
                               workers))


def describe_paths(paths: Sequence[str | os.PathLike], settings: CopySettings = CopySettings(),
                   progress: bool = False, workers: int | None = None,
                   ) -> tuple[list[ImageFeatures | None], LoadReport]:
    """:func:`describe` every image file, ``workers`` threads at a time (``None`` and a
    report line where one is unreadable)."""
    report = LoadReport()

    def load(path, detector) -> tuple[ImageFeatures | None, BadFile | None]:
        try:
            return describe(read_image(path), settings, detector), None
        except (ImageReadError, ValueError) as error:
            return None, BadFile(path=str(path), error=getattr(error, "reason", str(error)))

    iterator: Iterable = _map_described(load, paths, settings, workers)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(paths), desc="describing images", unit="img")
    described: list[ImageFeatures | None] = []
    for features, bad in iterator:
        described.append(features)
        if bad is None:
            report.n_ok += 1
        else:
            report.bad.append(bad)
    return described, report


@dataclass
class CopyResult:
    """:func:`find_copies`' answer: ``pairs`` (columns :data:`PAIR_COLUMNS`, one row per
    examined pair), the unreadable files in ``report``, and ``seconds`` per step
    (``describe``, ``candidates``, ``verify``; wall time)."""

    pairs: pd.DataFrame
    report: LoadReport = field(default_factory=LoadReport)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def copies(self) -> pd.DataFrame:
        """The pairs called copies."""
        return self.pairs[self.pairs["copy"]].reset_index(drop=True)


def find_copies(
    images: Sequence[str | os.PathLike] | Sequence[ImageFeatures | None],
    *,
    groups: Sequence[int] | None = None,
    settings: CopySettings = CopySettings(),
    progress: bool = False,
    on_pair: Callable[[int, int, PairEvidence], None] | None = None,
    extra_pairs: Iterable[tuple[int, int]] = (),
    workers: int | None = None,
) -> CopyResult:
    """Find copies among ``images`` (paths, or :class:`ImageFeatures` from :func:`describe`).

    With ``groups`` (one collection id per image) only pairs across collections are
    examined. ``extra_pairs`` (positions) are examined too, whatever the index says. Paths are
    described ``workers`` threads at a time (:func:`describe_paths`). Every
    candidate pair is verified once; the table lists them all with the evidence, the
    ``score`` (band-pass correlation) and the ``copy`` decision.
    """
    started = time.perf_counter()
    report = LoadReport()
    if len(images) and not isinstance(images[0], (ImageFeatures, type(None))):
        described, report = describe_paths(images, settings, progress, workers)  # type: ignore[arg-type]
        names = [str(path) for path in images]
    else:
        described = list(images)  # type: ignore[arg-type]
        names = ["" for _ in images]
    readable = [i for i, item in enumerate(described) if item is not None]
    group_ids = None if groups is None else [groups[i] for i in readable]
    seconds = {"describe": time.perf_counter() - started}
    started = time.perf_counter()
    candidates = candidate_pairs([described[i] for i in readable], settings, group_ids)
    position = {image: number for number, image in enumerate(readable)}
    extra = [(min(position[a], position[b]), max(position[a], position[b]), 0)
             for a, b in extra_pairs if a in position and b in position and a != b]
    if extra:
        candidates = (pd.concat([candidates, pd.DataFrame(extra, columns=["first", "second", "votes"])])
                      .groupby(["first", "second"], as_index=False)["votes"].max().astype(int))
    seconds["candidates"] = time.perf_counter() - started
    started = time.perf_counter()
    rows = []
    iterator: Iterable = candidates.itertuples(index=False)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(candidates), desc="verifying pairs", unit="pair")
    for first, second, votes in iterator:
        a, b = readable[first], readable[second]
        evidence = verify_pair(described[a], described[b], settings)  # type: ignore[arg-type]
        if on_pair is not None:
            on_pair(a, b, evidence)
        rows.append({"first": a, "second": b, "path_first": names[a], "path_second": names[b],
                     "score": round(evidence.correlation, 4), "copy": is_copy(evidence, settings),
                     "votes": votes, "inliers": evidence.inliers,
                     "tight_share": round(evidence.tight_share, 3),
                     "correlation": round(evidence.correlation, 4),
                     "coarse_correlation": round(evidence.coarse_correlation, 4),
                     "overlap": round(evidence.overlap, 3), "rotation_deg": round(evidence.rotation_deg, 2),
                     "scale": round(evidence.scale, 3), "aligned": evidence.aligned,
                     "refined": evidence.refined})
    seconds["verify"] = time.perf_counter() - started
    pairs = pd.DataFrame(rows, columns=list(PAIR_COLUMNS))
    pairs["copy"] = pairs["copy"].astype(bool)
    return CopyResult(pairs=pairs, report=report, seconds={k: round(v, 3) for k, v in seconds.items()})


def input_images(argument: str | os.PathLike) -> tuple[list[str], list[Path]]:
    """The images of one ``data copies`` argument: a folder (every image file under it) or a
    manifest (``.csv`` / ``.parquet`` with a ``path`` column). Returns the paths as the user
    gave them (folder joined with each file; the manifest's ``path`` values) and resolved."""
    source = Path(argument)
    if source.is_dir():
        files = folder_paths(source)
        return [str(Path(argument) / path.relative_to(source)) for path in files], files
    if source.is_file() and source.suffix.lower() in (".csv", ".parquet"):
        # only the path column is needed, so any table with one will do (a manifest on disk
        # holds paths relative to its own folder)
        table = (pd.read_parquet(source) if source.suffix.lower() == ".parquet"
                 else pd.read_csv(source, dtype=str, keep_default_na=False, encoding="utf-8-sig"))
        if "path" not in table.columns:
            raise ValueError(f"{source}: a manifest needs a 'path' column")
        given = [str(value) for value in table["path"] if str(value)]
        return given, [source.parent / value for value in given]
    raise ValueError(f"{source}: neither an image folder nor a manifest (.csv / .parquet)")


def copies_across(arguments: Sequence[str | os.PathLike], settings: CopySettings = CopySettings(),
                  progress: bool = False, workers: int | None = None) -> CopyResult:
    """:func:`find_copies` over image folders / manifests: across them when there are two or
    more, within the one otherwise. Paths in the table are as given; ``input_first`` /
    ``input_second`` name the argument each image came from."""
    if not arguments:
        raise ValueError("copies_across: give at least one image folder or manifest")
    given, resolved, groups = [], [], []
    for number, argument in enumerate(arguments):
        shown, files = input_images(argument)
        if not files:
            raise ValueError(f"{argument}: no images found")
        given += shown
        resolved += files
        groups += [number] * len(files)
    result = find_copies(resolved, groups=groups if len(arguments) > 1 else None, settings=settings,
                         progress=progress, workers=workers)
    pairs = result.pairs
    pairs["path_first"] = [given[i] for i in pairs["first"]]
    pairs["path_second"] = [given[i] for i in pairs["second"]]
    pairs.insert(4, "input_first", [str(arguments[groups[i]]) for i in pairs["first"]])
    pairs.insert(5, "input_second", [str(arguments[groups[i]]) for i in pairs["second"]])
    for bad in result.report.bad:  # name the files as given, not as resolved
        bad.path = given[resolved.index(Path(bad.path))] if Path(bad.path) in resolved else bad.path
    return result


def write_pairs(result: CopyResult, out: str | os.PathLike) -> Path:
    """Write ``result.pairs`` as CSV (atomically) and return the path."""
    from cxrlib.runs import atomic_write

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda stream: result.pairs.to_csv(stream, index=False), mode="w")
    return path


# ----------------------------------------------------------------------------- re-publication

#: Single transforms :func:`republish` knows (each as re-publication does it).
TRANSFORMS: tuple[str, ...] = ("crop", "pad", "rotate", "window", "gamma", "equalize", "resize",
                               "jpeg", "text")


def republish(image: np.ndarray, kinds: str | Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """``image`` ``(H, W)`` ``uint8`` as another collection might re-publish it.

    ``kinds`` (applied in order) are names from :data:`TRANSFORMS`: ``crop`` (2-20% off each
    side), ``pad`` (a uniform border of 3-15% per side), ``rotate`` (2-10 degrees either
    way, corners filled black), ``window`` (new window/level, clipping both ends),
    ``gamma`` (0.5-0.8 or 1.25-2), ``equalize`` (histogram equalisation), ``resize``
    (longest side 160-256 px), ``jpeg`` (quality 20-60), ``text`` (burned-in labels and an
    arrow). Returns a new ``uint8`` image.
    """
    import cv2

    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    for kind in [kinds] if isinstance(kinds, str) else kinds:
        height, width = out.shape
        if kind == "crop":
            top, bottom, left, right = rng.uniform(0.02, 0.2, size=4)
            out = out[round(top * height):height - round(bottom * height),
                      round(left * width):width - round(right * width)].copy()
        elif kind == "pad":
            sides = [round(share * length) for share, length in
                     zip(rng.uniform(0.03, 0.15, size=4), (height, height, width, width), strict=True)]
            value = int(rng.choice([0, 255, int(rng.integers(20, 235))]))
            out = cv2.copyMakeBorder(out, *sides, cv2.BORDER_CONSTANT, value=value)
        elif kind == "rotate":
            angle = float(rng.uniform(2, 10) * rng.choice([-1, 1]))
            matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
            out = cv2.warpAffine(out, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)
        elif kind == "window":
            low, high = rng.uniform(0, 60), rng.uniform(170, 255)
            out = np.clip((out.astype(np.float32) - low) / (high - low) * 255, 0, 255).astype(np.uint8)
        elif kind == "gamma":
            gamma = float(rng.choice([rng.uniform(0.5, 0.8), rng.uniform(1.25, 2.0)]))
            out = (255 * (out / 255.0) ** gamma).round().astype(np.uint8)
        elif kind == "equalize":
            out = cv2.equalizeHist(out)
        elif kind == "resize":
            scale = rng.uniform(160, 256) / max(height, width)
            out = cv2.resize(out, (max(8, round(width * scale)), max(8, round(height * scale))),
                             interpolation=cv2.INTER_AREA)
        elif kind == "jpeg":
            ok, encoded = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(20, 61))])
            out = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
        elif kind == "text":
            scale = max(height, width) / 320
            for _ in range(int(rng.integers(1, 4))):
                x, y = int(rng.integers(0, width * 3 // 4)), int(rng.integers(height // 10, height))
                label = str(rng.choice(["L", "R", "AP", "PA", "PORTABLE", "SUPINE", "Day 3"]))
                cv2.putText(out, label, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale,
                            255, max(1, round(2 * scale)), cv2.LINE_AA)
            start = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            end = (int(np.clip(start[0] + rng.integers(-60, 60) * scale, 0, width - 1)),
                   int(np.clip(start[1] + rng.integers(-60, 60) * scale, 0, height - 1)))
            cv2.arrowedLine(out, start, end, 255, max(1, round(2 * scale)), cv2.LINE_AA, tipLength=0.3)
        else:
            raise ValueError(f"republish: unknown transform {kind!r}; known: {', '.join(TRANSFORMS)}")
    return out
