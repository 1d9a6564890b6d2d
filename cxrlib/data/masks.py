"""Lung label maps: building them from masks, cleaning predictions, cropping and patches.

Label convention (uint8, ``(H, W)``): 0 background, 1 the patient's LEFT lung (on the
IMAGE RIGHT, radiological convention), 2 the patient's right lung (image left), 3 heart
(only when the heart is segmented too). :data:`LUNG_LEFT`, :data:`LUNG_RIGHT` and
:data:`HEART` name these values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from cxrlib.data.transforms import Size, resize_image

BACKGROUND, LUNG_LEFT, LUNG_RIGHT, HEART = 0, 1, 2, 3
LUNG_LABELS: tuple[int, int] = (LUNG_LEFT, LUNG_RIGHT)

# 8-connectivity: diagonal neighbours belong to the same lung.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {mask.shape}")
    return mask if mask.dtype == np.bool_ else mask > 0


def _check_same_shape(image: np.ndarray, mask: np.ndarray) -> None:
    if image.shape != mask.shape:
        raise ValueError(
            f"image {image.shape} and lung mask {mask.shape} differ in shape; "
            "bring them to one grid first (cxrlib.data.transforms.resize_mask)"
        )


def labels_from_masks(
    left: np.ndarray, right: np.ndarray, heart: np.ndarray | None = None
) -> np.ndarray:
    """Combine per-structure masks into one uint8 label map ``(H, W)`` with values 0..3.

    Masks are ``(H, W)`` bool or 0/255 (anything > 0 is foreground), all of one shape;
    ``left`` is the patient's left lung (image right). Where the heart overlaps a lung
    (common at the hand-drawn borders of SCR masks) the lung label wins.
    """
    left_mask, right_mask = _as_bool(left, "left"), _as_bool(right, "right")
    shapes = {left_mask.shape, right_mask.shape}
    if heart is not None:
        heart_mask = _as_bool(heart, "heart")
        shapes.add(heart_mask.shape)
    if len(shapes) > 1:
        raise ValueError(f"masks differ in shape: {sorted(shapes)}")
    labels = np.zeros(left_mask.shape, dtype=np.uint8)
    if heart is not None:
        labels[heart_mask] = HEART
    labels[right_mask] = LUNG_RIGHT
    labels[left_mask] = LUNG_LEFT
    return labels


def lung_mask_from_labels(
    labels: np.ndarray, lung_labels: tuple[int, ...] = LUNG_LABELS
) -> np.ndarray:
    """Both lungs of a label map as one ``(H, W)`` bool mask (the heart is not lung)."""
    return np.isin(labels, lung_labels)


def split_union_lung_mask(union: np.ndarray, straddle_fraction: float = 0.25) -> np.ndarray:
    """Split a single "both lungs" mask into left / right labels by connected components.

    ``union``: ``(H, W)`` bool or 0/255. Each 8-connected component whose centroid lies on
    the image-right half becomes label 1 (patient's left lung), the others label 2.
    A component with at least ``straddle_fraction`` of its pixels on each side of the
    vertical midline (two lungs drawn touching) is cut at the midline instead of being
    given to one lung. Returns a uint8 label map with values in {0, 1, 2}.
    """
    mask = _as_bool(union, "union")
    components, count = ndimage.label(mask, structure=_CONNECTIVITY)
    labels = np.zeros(mask.shape, dtype=np.uint8)
    if count == 0:
        return labels
    width = mask.shape[1]
    rows, cols = np.nonzero(mask)
    ids = components[rows, cols]
    on_right = cols >= width / 2
    sizes = np.bincount(ids, minlength=count + 1)
    mean_col = np.bincount(ids, weights=cols, minlength=count + 1) / np.maximum(sizes, 1)
    right_fraction = np.bincount(ids, weights=on_right, minlength=count + 1) / np.maximum(sizes, 1)

    component_is_right = mean_col >= (width - 1) / 2
    straddles = np.minimum(right_fraction, 1 - right_fraction) >= straddle_fraction
    pixel_is_right = np.where(straddles[ids], on_right, component_is_right[ids])
    labels[rows, cols] = np.where(pixel_is_right, LUNG_LEFT, LUNG_RIGHT)
    return labels


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask, structure=_CONNECTIVITY)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def postprocess_labels(
    label_map: np.ndarray, lung_labels: tuple[int, ...] = LUNG_LABELS
) -> np.ndarray:
    """Clean a predicted label map: one connected lung per label, without holes.

    For each value in ``lung_labels`` only its largest 8-connected component is kept
    (the other pixels become background), then holes enclosed by the lung are filled
    (``scipy.ndimage.binary_fill_holes``) where they are background. Other labels (heart)
    are left unchanged. ``label_map``: ``(H, W)`` integer; returns a cleaned copy.
    """
    labels = np.asarray(label_map)
    if labels.ndim != 2:
        raise ValueError(f"label_map must be 2-D (H, W), got shape {labels.shape}")
    cleaned = labels.copy()
    # Islands are removed for every lung before any hole is filled, so a removed island
    # of one lung inside the other lung ends up filled by the enclosing lung.
    for value in lung_labels:
        lung = labels == value
        cleaned[lung & ~_largest_component(lung)] = BACKGROUND
    for value in lung_labels:
        filled = ndimage.binary_fill_holes(cleaned == value)
        cleaned[filled & (cleaned == BACKGROUND)] = value
    return cleaned


def lung_bbox(lung_mask: np.ndarray, margin: float = 0.05) -> tuple[int, int, int, int]:
    """Bounding box ``(y0, y1, x0, x1)`` of the lungs, end-exclusive (``image[y0:y1, x0:x1]``).

    ``lung_mask``: ``(H, W)`` bool or 0/255 (for a label map pass
    :func:`lung_mask_from_labels`). The box is widened by ``margin`` times the image height
    (rows) and width (columns) on each side and clipped to the image. An empty mask gives
    the whole image, so a failed segmentation falls back to no cropping.
    """
    mask = _as_bool(lung_mask, "lung_mask")
    height, width = mask.shape
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return 0, height, 0, width
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    pad_y, pad_x = round(margin * height), round(margin * width)
    return (
        int(max(0, y0 - pad_y)),
        int(min(height, y1 + 1 + pad_y)),
        int(max(0, x0 - pad_x)),
        int(min(width, x1 + 1 + pad_x)),
    )


def crop_to_lungs(
    image: np.ndarray, lung_mask: np.ndarray, size: Size | None = None, margin: float = 0.05
) -> np.ndarray:
    """Crop ``image`` ``(H, W)`` to :func:`lung_bbox` and resize the crop to ``size``.

    ``size=None`` returns the crop at its own size. Dtype is kept (bilinear resizing).
    """
    mask = _as_bool(lung_mask, "lung_mask")
    _check_same_shape(image, mask)
    y0, y1, x0, x1 = lung_bbox(mask, margin)
    crop = image[y0:y1, x0:x1]
    return crop.copy() if size is None else resize_image(crop, size)


def mask_lungs(
    image: np.ndarray,
    lung_mask: np.ndarray,
    mode: Literal["inside", "outside"] = "inside",
    fill: float = 0,
) -> np.ndarray:
    """Blank out everything but the lungs (``"inside"``) or the lungs themselves (``"outside"``).

    The two variants are shortcut controls: a classifier that still separates the classes
    with the lungs removed is reading something other than lung tissue (text, devices,
    source-specific borders). ``image`` ``(H, W)`` any dtype; returns a copy with the
    blanked pixels set to ``fill``.
    """
    mask = _as_bool(lung_mask, "lung_mask")
    _check_same_shape(image, mask)
    if mode not in ("inside", "outside"):
        raise ValueError(f"mode must be 'inside' or 'outside', got {mode!r}")
    masked = image.copy()
    masked[~mask if mode == "inside" else mask] = fill
    return masked


@dataclass
class LungPatchSampler:
    """Random square patches centred on lung pixels (Oh, Park & Ye 2020).

    Oh et al. train and test on 224x224 patches of 1024x1024 images, centred on random
    pixels of the segmented lungs, and take a majority vote over 100 patches at test time.
    With ``scale_with_image`` the patch keeps the same share of the field of view at any
    resolution: its side is ``round(patch_size * H / reference_size)``, e.g. 56 px on a
    256x256 image and 224 px at 1024. With ``scale_with_image=False`` it is always
    ``patch_size``. Patches that reach past the image border are zero-padded.
    """

    patch_size: int = 224
    scale_with_image: bool = True
    reference_size: int = 1024

    def patch_size_for(self, shape: tuple[int, ...]) -> int:
        """Patch side in pixels for an image of shape ``(H, W)``."""
        if not self.scale_with_image:
            return int(self.patch_size)
        return max(1, round(self.patch_size * shape[0] / self.reference_size))

    def sample(
        self, image: np.ndarray, lung_mask: np.ndarray, k: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``k`` patches with centres uniform over the lung pixels (with replacement).

        ``image`` ``(H, W)`` any dtype; ``lung_mask`` ``(H, W)`` bool or 0/255.
        Returns ``patches`` ``(k, p, p)`` of the image dtype and ``centres`` ``(k, 2)``
        int64 ``(row, col)``; the centre sits at index ``(p // 2, p // 2)`` of its patch.
        """
        mask = _as_bool(lung_mask, "lung_mask")
        _check_same_shape(image, mask)
        lung_pixels = np.argwhere(mask)
        if len(lung_pixels) == 0:
            raise ValueError("lung_mask is empty: no lung pixel to centre a patch on")
        centres = lung_pixels[rng.integers(0, len(lung_pixels), size=k)].astype(np.int64)
        side = self.patch_size_for(image.shape)
        before, after = side // 2, side - 1 - side // 2
        padded = np.pad(image, ((before, after), (before, after)), mode="constant")
        # Window (r, c) of the padded image is the patch centred on pixel (r, c).
        windows = np.lib.stride_tricks.sliding_window_view(padded, (side, side))
        patches = windows[centres[:, 0], centres[:, 1]].copy()
        return patches, centres

    @staticmethod
    def paste_back(
        maps: np.ndarray, centres: np.ndarray, shape: tuple[int, int], fill: float = 0.0
    ) -> np.ndarray:
        """Average per-patch maps back onto the image grid (probabilistic Grad-CAM).

        ``maps`` ``(K, p, p)`` (e.g. a Grad-CAM map per patch), ``centres`` ``(K, 2)`` from
        :meth:`sample`, ``shape`` = ``(H, W)`` of the image. Each pixel gets the mean of the
        map values of all patches covering it; pixels no patch covers get ``fill``.
        Returns ``(H, W)`` float64.
        """
        maps = np.asarray(maps, dtype=np.float64)
        centres = np.asarray(centres, dtype=np.int64)
        if maps.ndim != 3 or maps.shape[1] != maps.shape[2] or len(maps) != len(centres):
            raise ValueError(f"maps must be (K, p, p) with K = len(centres), got {maps.shape}")
        height, width = shape
        if centres.size and not (
            (centres >= 0).all()
            and (centres[:, 0] < height).all()
            and (centres[:, 1] < width).all()
        ):
            raise ValueError(f"centres must lie inside an image of shape {tuple(shape)}")
        side = maps.shape[1]
        before, after = side // 2, side - 1 - side // 2
        total = np.zeros((height + before + after, width + before + after))
        count = np.zeros_like(total)
        for patch_map, (row, col) in zip(maps, centres, strict=True):
            total[row : row + side, col : col + side] += patch_map
            count[row : row + side, col : col + side] += 1
        inside = (slice(before, before + height), slice(before, before + width))
        total, count = total[inside], count[inside]
        return np.where(count > 0, total / np.maximum(count, 1), fill)


# ----------------------------------------------------------------------------- lung conventions

#: How an annotation source draws the lungs. ``anatomical``: the whole lung, including the
#: part behind the heart and under dense opacities; ``visible``: the aerated lung field, which
#: stops at the heart border (and at the diaphragm domes).
LungConvention = Literal["anatomical", "visible"]
LUNG_CONVENTIONS: tuple[str, str] = ("anatomical", "visible")
#: Convention of each source's reference lung masks (manifest ``source`` -> convention); a
#: ``lung_convention`` column of a manifest row wins over this table.
SOURCE_LUNG_CONVENTIONS: dict[str, str] = {
    "covid-segmentations": "anatomical",
    "covid19-radiography": "visible",
    "jsrt": "visible",
    "montgomery": "visible",
    "shenzhen": "visible",
}


def lung_convention_of(row: dict) -> str:
    """The lung convention of a manifest row's reference masks, or ``""`` when unknown.

    ``row["lung_convention"]`` when set, else :data:`SOURCE_LUNG_CONVENTIONS` of ``row["source"]``.
    """
    stated = str(row.get("lung_convention", "") or "").strip()
    if stated and stated.lower() != "nan":
        if stated not in LUNG_CONVENTIONS:
            raise ValueError(f"image {row.get('image_id', '?')}: lung_convention {stated!r} is not one of "
                             f"{LUNG_CONVENTIONS}")
        return stated
    return SOURCE_LUNG_CONVENTIONS.get(str(row.get("source", "")), "")


def convert_lung_convention(
    labels: np.ndarray,
    source: str,
    target: str,
    cardiomediastinum: np.ndarray | None = None,
) -> np.ndarray:
    """A lung label map ``(H, W)`` (values of :mod:`cxrlib.data.masks`) in another convention.

    ``anatomical`` -> ``visible`` removes the lung pixels inside ``cardiomediastinum``
    (``(H, W)`` bool or 0/255, required): visible = anatomical minus cardiomediastinum.
    The same convention gives a copy. ``visible`` -> ``anatomical`` raises ``ValueError``:
    the lung behind the heart is not in a visible mask, and no mask can give it back.
    """
    for name in (source, target):
        if name not in LUNG_CONVENTIONS:
            raise ValueError(f"unknown lung convention {name!r}; known: {LUNG_CONVENTIONS}")
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) label map, got shape {labels.shape}")
    if source == target:
        return labels.copy()
    if source == "visible":
        raise ValueError("visible lung masks cannot be converted to anatomical ones: the lung "
                         "behind the heart was never drawn")
    if cardiomediastinum is None:
        raise ValueError("anatomical -> visible needs the cardiomediastinum mask")
    heart = _as_bool(cardiomediastinum, "cardiomediastinum")
    if heart.shape != labels.shape:
        raise ValueError(f"cardiomediastinum {heart.shape} and labels {labels.shape} differ in shape")
    visible = labels.copy()
    visible[heart & np.isin(labels, LUNG_LABELS)] = BACKGROUND
    return visible


# ----------------------------------------------------------------------------- quality control


#: Manifest columns of a segmented cohort's quality control (notebook 02): ``"True"`` /
#: ``"False"`` per image, and the reason of a failure. Images that failed are kept out of the
#: lung input modes (lungs only, lungs removed, lung crops, lung-centred patches), counted.
LUNG_QC_COLUMN = "lung_qc_pass"
LUNG_QC_REASON_COLUMN = "lung_qc_reason"


def failed_lung_qc(manifest) -> np.ndarray:
    """Boolean array: the rows whose predicted lung mask failed quality control (``False``
    in :data:`LUNG_QC_COLUMN`; rows without a verdict, e.g. synthetic images, pass)."""
    if LUNG_QC_COLUMN not in getattr(manifest, "columns", ()):
        return np.zeros(len(manifest), dtype=bool)
    return manifest[LUNG_QC_COLUMN].astype(str).str.strip().str.lower().isin(("false", "0")).to_numpy()


@dataclass(frozen=True)
class LungQCLimits:
    """Plausibility limits of :func:`lung_mask_qc` (fractions of the image or body box).

    Defaults were set from the reference masks of covid19-radiography (visible lungs) and
    covid-segmentations (anatomical lungs, dense COVID-19 opacities), widened so that every
    reference mask passes: lungs cover 8-65% of the body box; each lung is 25-400% the size
    of the other; each lung holds at least ``min_component_share`` of its label in one
    piece; both lungs overlap over at least ``min_row_overlap`` of the shorter lung's
    height; the lungs' centre lies in the middle of the body box (``centre_cols`` across,
    ``centre_rows`` down), and no lung runs along the body box's side (``max_side_contact``
    of its height touching the outermost ``side_margin`` of the box) unless it reaches the
    film's own edge over at least ``min_frame_contact`` of its height: a lung cut by a tight
    crop (figures cut out of papers) lies along the body box's side as well, while an arm
    taken for a lung lies inside the frame.
    """

    min_area_fraction: float = 0.08
    max_area_fraction: float = 0.65
    min_lr_ratio: float = 0.25
    max_lr_ratio: float = 4.0
    min_component_share: float = 0.85
    min_row_overlap: float = 0.5
    centre_cols: tuple[float, float] = (0.3, 0.7)
    centre_rows: tuple[float, float] = (0.2, 0.75)
    side_margin: float = 0.02
    max_side_contact: float = 0.3
    min_frame_contact: float = 0.05


def body_box(image: np.ndarray | None, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Bounding box ``(y0, y1, x0, x1)`` (end-exclusive) of the patient's body in a CXR.

    ``image`` ``(H, W)`` uint8 or float; ``None`` gives the whole ``shape``. Columns and
    rows whose mean brightness stays below a tenth of the way from the darkest to the
    median image row / column are empty film (collimation borders, air beside a thin
    patient); the box spans the others. A failed estimate falls back to the whole image.
    """
    height, width = (int(s) for s in shape)
    if image is None:
        return 0, height, 0, width
    values = np.asarray(image, dtype=np.float64)
    if values.shape != (height, width):
        raise ValueError(f"image {values.shape} and mask {shape} differ in shape")
    spans = []
    for profile in (values.mean(axis=1), values.mean(axis=0)):
        floor, middle = float(profile.min()), float(np.median(profile))
        inside = np.flatnonzero(profile > floor + 0.1 * (middle - floor))
        spans.append((int(inside[0]), int(inside[-1]) + 1) if inside.size else (0, len(profile)))
    (y0, y1), (x0, x1) = spans
    if (y1 - y0) < 0.3 * height or (x1 - x0) < 0.3 * width:
        return 0, height, 0, width
    return y0, y1, x0, x1


@dataclass(frozen=True)
class LungQC:
    """Outcome of :func:`lung_mask_qc`: ``passed``, the ``reason`` of the first failed check
    (``""`` when passed) and the measures the checks used (for tables)."""

    passed: bool
    reason: str
    measures: dict


def lung_mask_qc(
    labels: np.ndarray, image: np.ndarray | None = None, limits: LungQCLimits = LungQCLimits()
) -> LungQC:
    """Is a predicted lung label map plausible? No reference needed.

    ``labels``: ``(H, W)`` integer label map (1 patient's left lung on the image right, 2
    right lung); ``image``: the ``(H, W)`` image it was predicted on, to find the body
    (:func:`body_box`; ``None``: the whole image). Checks, in this order (the first that
    fails is the reason): both lungs present; each lung mostly one component; left lung on
    the image right of the right lung; lung area as a share of the body box; left/right
    size ratio; both lungs at the same height; the lungs' centre within the body box;
    no lung running along the side of the body box (an arm taken for a lung), unless it
    reaches the film's edge there (a lung cut by a tight crop).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) label map, got shape {labels.shape}")
    y0, y1, x0, x1 = body_box(image, labels.shape)
    body = labels[y0:y1, x0:x1]
    box_h, box_w = body.shape
    lungs = {"left": labels == LUNG_LEFT, "right": labels == LUNG_RIGHT}
    areas = {side: int(mask.sum()) for side, mask in lungs.items()}
    measures: dict[str, float] = {
        "area_fraction": float(np.isin(body, LUNG_LABELS).sum()) / max(box_h * box_w, 1),
        "lr_ratio": areas["left"] / areas["right"] if areas["right"] else float("inf"),
    }

    def fail(reason: str) -> LungQC:
        return LungQC(False, reason, measures)

    missing = [side for side, area in areas.items() if area == 0]
    if missing:
        return fail(f"no {' and no '.join(missing)} lung")
    rows_of, cols_of = {}, {}
    for side, mask in lungs.items():
        components, count = ndimage.label(mask, structure=_CONNECTIVITY)
        share = np.bincount(components.ravel())[1:].max() / areas[side]
        measures[f"{side}_component_share"] = float(share)
        if share < limits.min_component_share:
            return fail(f"{side} lung in {count} pieces (largest {share:.0%})")
        rows, cols = np.nonzero(mask)
        rows_of[side], cols_of[side] = rows, cols
    if cols_of["left"].mean() <= cols_of["right"].mean():
        return fail("left lung not on the image right of the right lung")
    if not limits.min_area_fraction <= measures["area_fraction"] <= limits.max_area_fraction:
        return fail(f"lungs cover {measures['area_fraction']:.0%} of the body (expected "
                    f"{limits.min_area_fraction:.0%}-{limits.max_area_fraction:.0%})")
    if not limits.min_lr_ratio <= measures["lr_ratio"] <= limits.max_lr_ratio:
        return fail(f"left/right lung size ratio {measures['lr_ratio']:.2f} (expected "
                    f"{limits.min_lr_ratio:g}-{limits.max_lr_ratio:g})")
    spans = {side: (int(r.min()), int(r.max()) + 1) for side, r in rows_of.items()}
    overlap = min(spans["left"][1], spans["right"][1]) - max(spans["left"][0], spans["right"][0])
    shorter = min(end - start for start, end in spans.values())
    measures["row_overlap"] = max(overlap, 0) / max(shorter, 1)
    if measures["row_overlap"] < limits.min_row_overlap:
        return fail(f"lungs at different heights (overlap {measures['row_overlap']:.0%} of the shorter)")
    all_rows = np.concatenate(list(rows_of.values()))
    all_cols = np.concatenate(list(cols_of.values()))
    measures["centre_row"] = float((all_rows.mean() - y0) / max(box_h, 1))
    measures["centre_col"] = float((all_cols.mean() - x0) / max(box_w, 1))
    if not (limits.centre_cols[0] <= measures["centre_col"] <= limits.centre_cols[1]
            and limits.centre_rows[0] <= measures["centre_row"] <= limits.centre_rows[1]):
        return fail(f"lungs off centre in the body (centre at {measures['centre_col']:.0%} across, "
                    f"{measures['centre_row']:.0%} down)")
    margin = max(1, round(limits.side_margin * box_w))
    for side, cols in cols_of.items():
        rows = rows_of[side]
        height = max(spans[side][1] - spans[side][0], 1)
        at_side = (cols < x0 + margin) | (cols >= x1 - margin)
        contact = np.unique(rows[at_side]).size / height
        frame_margin = max(1, round(limits.side_margin * labels.shape[1]))
        at_frame = (cols < frame_margin) | (cols >= labels.shape[1] - frame_margin)
        frame = np.unique(rows[at_frame]).size / height
        measures[f"{side}_side_contact"] = float(contact)
        measures[f"{side}_frame_contact"] = float(frame)
        if contact > limits.max_side_contact and frame < limits.min_frame_contact:
            return fail(f"{side} lung runs along the side of the body ({contact:.0%} of its height)")
    return LungQC(True, "", measures)
