"""Procedural chest X-ray phantoms with exact masks and metadata.

A :class:`PhantomGenerator` draws PA / AP chest radiographs (grayscale, any square size,
256 x 256 by default) from a small anatomical model: body outline and soft tissue with
shoulders and arms, two lung fields with diaphragm domes and costophrenic angles, heart and
mediastinum, spine, trachea, clavicles, posterior and anterior ribs, hilar vessel trees,
gastric bubble, breast shadows, quantum noise and a per-site intensity curve. Lesions follow
three classes (:data:`LABELS`):

- ``normal``: no lesion (empty lesion mask);
- ``pneumonia``: dense focal lobar / segmental consolidation, mostly in one lung, one or two
  contiguous regions, sometimes with darker air-bronchogram streaks;
- ``covid``: hazy ground-glass opacities, bilateral, peripheral, lower-zone predominant and
  multifocal.

Every sample carries exact masks (:data:`MASK_KINDS`) and its image both with and without the
burned-in text / side marker, so later stages can train a text segmenter and inpainter.

Conventions: images are viewed in radiological convention, so the patient's LEFT lung
(``lung_left``) and the heart lie on the IMAGE RIGHT. Lung masks are the visible lung fields
(heart and mediastinum excluded), as in the JSRT / SCR reference masks. The lesion mask is
the part of the lung fields where the lesion adds noticeable density.

Cohorts (:class:`CohortConfig`, :func:`generate_cohort`, :func:`write_cohort`) have patients
with 1-4 studies each (same anatomy and label, pose / inspiration / severity change), age and
sex covariates, PA or AP views and acquisition sites whose association with the label is set
by ``site_label_correlation`` (0: independent, 1: each class from its own site), to teach
shortcut learning. Age, sex and view are drawn independently of the label.

Determinism: ``render(label, seed)`` depends only on its arguments and the generator's
``(size, seed)``; in a cohort, every patient and every study get their own
``np.random.SeedSequence`` child, so study k of patient p does not depend on how many images
came before it or on the draws of other patients.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

#: Bumped whenever the rendering changes, so cached cohorts made by older code are not reused.
GENERATOR_VERSION: int = 2

LABELS: tuple[str, ...] = ("normal", "pneumonia", "covid")
MASK_KINDS: tuple[str, ...] = ("lung_left", "lung_right", "heart", "lesion", "text")
VIEWS: tuple[str, ...] = ("PA", "AP")
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id", "path", "label", "patient_id", "source", "view", "split", "mask_path", "origin",
    "site", "age", "sex", "severity", "study_index",
    "mask_lung_left", "mask_lung_right", "mask_heart", "mask_lesion", "mask_text",
)
#: Value of burned-in text pixels; every site's ``white_level`` stays below it, so text
#: pixels always differ from the clean image.
TEXT_VALUE = 255
#: Lesion density (fraction of lung air replaced, 0..1) above which a pixel is lesion.
LESION_THRESHOLD = 0.1


@dataclass(frozen=True)
class SiteProfile:
    """One acquisition site: detector curve, noise, blur and burned-in annotations.

    The intensity curve maps the phantom's attenuation ``a`` (about 0..1) to uint8:
    ``black_level + (white_level - black_level) * curve(y)`` with
    ``y = clip(contrast * (a - 0.03) / 0.8 + brightness, 0, 1)``,
    where ``curve`` approximates ``y ** gamma`` (gamma < 1 brightens the midtones).
    ``noise`` is the quantum-noise standard deviation (attenuation units), ``blur`` the extra
    Gaussian blur in pixels (0 = sharp). ``marker`` is the side-marker letter (``"L"`` or
    ``"R"``) drawn in ``marker_corner``; ``text`` (site name) plus a fake accession, date and
    view line go in ``text_corner``. Corners: ``"tl"``, ``"tr"``, ``"bl"``, ``"br"``.
    """

    name: str
    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    noise: float = 0.015
    blur: float = 0.0
    marker: str = "L"
    text: str = ""
    marker_corner: str = "tr"
    text_corner: str = "tl"
    black_level: int = 6
    white_level: int = 245
    accession_prefix: str = "ACC"

    def __post_init__(self) -> None:
        if self.marker not in ("L", "R"):
            raise ValueError(f"marker must be 'L' or 'R', got {self.marker!r}")
        for corner in (self.marker_corner, self.text_corner):
            if corner not in ("tl", "tr", "bl", "br"):
                raise ValueError(f"corner must be one of tl/tr/bl/br, got {corner!r}")
        if not 0 <= self.black_level < self.white_level < TEXT_VALUE:
            raise ValueError("need 0 <= black_level < white_level < 255")


DEFAULT_SITES: tuple[SiteProfile, ...] = (
    SiteProfile("north_general", gamma=1.0, contrast=1.0, brightness=0.0, noise=0.012, blur=0.0,
                marker="L", text="NORTH GENERAL", marker_corner="tr", text_corner="tl",
                accession_prefix="NG"),
    SiteProfile("riverside_clinic", gamma=0.8, contrast=0.92, brightness=0.05, noise=0.028,
                blur=0.9, marker="R", text="RIVERSIDE CLINIC", marker_corner="tl",
                text_corner="br", black_level=18, white_level=236, accession_prefix="RC"),
    SiteProfile("st_agnes", gamma=1.3, contrast=1.12, brightness=-0.03, noise=0.018, blur=0.4,
                marker="L", text="ST AGNES HOSP", marker_corner="tr", text_corner="bl",
                black_level=2, white_level=250, accession_prefix="SA"),
    SiteProfile("valley_imaging", gamma=1.05, contrast=0.85, brightness=0.05, noise=0.01,
                blur=1.2, marker="R", text="VALLEY IMAGING", marker_corner="tl",
                text_corner="tr", black_level=30, white_level=228, accession_prefix="VI"),
)


@dataclass(frozen=True)
class LungShape:
    """One lung field in the patient frame (normalised units; x = lateral distance from the
    midline, y down, the image spans -1..1).

    ``x_in`` / ``x_out``: medial border / lateral border at the costophrenic angle;
    ``y_apex``: top; ``y_base``: costophrenic angle at mid inspiration; ``dome_height``: how
    far the diaphragm dome rises above the angle; ``dome_peak`` / ``apex_peak``: where dome
    and apex peak, as a fraction of the width from the medial border; ``apex_round``: how
    quickly the apex falls away laterally; ``knob``: aortic-knob bulge (left lung only).
    """

    x_in: float
    x_out: float
    y_apex: float
    y_base: float
    dome_height: float
    dome_peak: float
    apex_peak: float
    apex_round: float
    knob: float = 0.0


@dataclass(frozen=True)
class Anatomy:
    """A patient's anatomy, drawn once per patient and reused for every follow-up study.

    Lengths are in normalised image units (the image spans -1..1 in x and y, y down, x
    towards the image right = the patient's left). Densities are relative (about 1 = typical).
    """

    sex: str
    age: int
    body_width: float
    soft_tissue: float
    lung_right: LungShape
    lung_left: LungShape
    air: float
    heart_x: float
    heart_y: float
    heart_a: float
    heart_b: float
    heart_angle: float
    hilum_y: float
    rib_y0: float
    rib_alpha: float
    rib_beta: float
    rib_arch: float
    rib_vertex: float
    rib_width: float
    spine_width: float
    vertebra_period: float
    vertebra_phase: float
    clavicle_y: float
    clavicle_rise: float
    bone_density: float
    inspiration: float
    breast: float
    gastric_bubble: float
    vessel_trees: tuple[int, int]
    vessel_strength: float


#: Smallest image side the generator draws (its anatomy needs a few pixels per rib).
MIN_SIZE = 32
#: Largest image side a cohort may ask for (texture banks grow with the square of twice the
#: side: about 1 GB at this size); the largest chest detectors are about 4300 pixels wide.
MAX_SIZE = 4096


@dataclass(frozen=True)
class CohortConfig:
    """Settings of a phantom cohort; every field changes the images or the manifest."""

    n_patients: int = 60
    seed: int = 0
    size: int = 256
    class_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # normal, pneumonia, covid
    images_per_patient: tuple[int, int] = (1, 4)  # inclusive range
    severity_range: tuple[float, float] = (0.3, 1.0)
    sites: tuple[SiteProfile, ...] = DEFAULT_SITES
    site_label_correlation: float = 0.0
    ap_fraction: float = 0.3
    text: bool = True  # burn text / markers into ``image``

    def __post_init__(self) -> None:
        if self.n_patients < 0:
            raise ValueError(f"n_patients must be >= 0, got {self.n_patients}")
        if not MIN_SIZE <= self.size <= MAX_SIZE:  # here, so a bad size writes nothing
            raise ValueError(f"size must lie in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {self.size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        lo, hi = self.images_per_patient
        if not 1 <= lo <= hi:
            raise ValueError(f"images_per_patient must satisfy 1 <= lo <= hi, got {lo, hi}")
        if len(self.class_weights) != len(LABELS) or min(self.class_weights) < 0 \
                or sum(self.class_weights) <= 0:
            raise ValueError("class_weights needs 3 non-negative weights with a positive sum")
        if not 0.0 <= self.site_label_correlation <= 1.0:
            raise ValueError(f"site_label_correlation must lie in [0, 1], got {self.site_label_correlation}")
        if not 0.0 <= self.ap_fraction <= 1.0:
            raise ValueError("ap_fraction must lie in [0, 1]")
        if not self.sites:
            raise ValueError("need at least one site")
        s_lo, s_hi = self.severity_range
        if not 0.0 <= s_lo <= s_hi <= 1.0:
            raise ValueError("severity_range must satisfy 0 <= lo <= hi <= 1")


@dataclass
class PhantomSample:
    """One rendered study.

    ``image`` / ``image_clean``: (H, W) uint8, with / without burned-in text and marker;
    ``masks``: kind -> (H, W) bool for every kind in :data:`MASK_KINDS`; ``meta``: image_id,
    patient_id, label, severity, site, view, age, sex, study_index, seed, lesion_side (and
    n_studies in a cohort).
    """

    image: np.ndarray
    image_clean: np.ndarray
    masks: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# helpers. Python-float scalars keep float32 arrays float32 (NEP 50), so every parameter
# that meets an array is a plain float. In-place operations matter: a fresh 256 x 256
# float32 array costs about as much as two arithmetic passes over one.


try:  # the ufunc behind np.clip, without its Python wrapper (~3 us per call saved)
    from numpy._core.umath import clip as _clip
except ImportError:  # pragma: no cover - numpy < 2
    try:
        from numpy.core.umath import clip as _clip
    except ImportError:
        _clip = np.clip


def _ramp(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear ramp, 0 at ``lo`` and 1 at ``hi`` (``lo > hi`` ramps down); a new array."""
    out = values - lo
    out *= 1.0 / (hi - lo)
    _clip(out, 0.0, 1.0, out=out)
    return out


def _ramp_(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """:func:`_ramp` in place (overwrites and returns ``values``)."""
    values -= lo
    values *= 1.0 / (hi - lo)
    _clip(values, 0.0, 1.0, out=values)
    return values


def _blur3(image: np.ndarray, passes: int) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur in place, ``passes`` times (each ~ sigma 0.7 px).

    Edges are held (reflected centre tap). ``image``: (H, W) float32, H, W >= 3.
    """
    tmp = np.empty_like(image)
    for _ in range(passes):
        np.add(image[:, :-2], image[:, 2:], out=tmp[:, 1:-1])
        tmp[:, 1:-1] += image[:, 1:-1]
        tmp[:, 1:-1] += image[:, 1:-1]
        tmp[:, 0] = 3.0 * image[:, 0] + image[:, 1]
        tmp[:, -1] = 3.0 * image[:, -1] + image[:, -2]
        np.add(tmp[:-2], tmp[2:], out=image[1:-1])
        image[1:-1] += tmp[1:-1]
        image[1:-1] += tmp[1:-1]
        image[0] = 3.0 * tmp[0] + tmp[1]
        image[-1] = 3.0 * tmp[-1] + tmp[-2]
        image *= 1.0 / 16.0
    return image


def _seed_int(seed_seq: np.random.SeedSequence) -> int:
    """A 63-bit integer seed from a SeedSequence (what :meth:`PhantomGenerator.render` takes)."""
    return int(seed_seq.generate_state(1, np.uint64)[0] >> np.uint64(1))


def _child_rng(seed: int, *key: int) -> np.random.Generator:
    """Independent stream ``key`` of ``seed``: draws in one stream never shift another."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(key)))


# stream numbers inside render() and inside a cohort patient
_ANATOMY, _POSE, _LESION, _TEXTURE, _TEXT, _ROTATION = 0, 1, 2, 3, 4, 5

#: Standard deviation and limit of the in-plane patient rotation (positioning), degrees.
ROTATION_SD_DEG, ROTATION_MAX_DEG = 2.5, 7.0
_P_LABEL, _P_DEMOGRAPHICS, _P_ANATOMY, _P_SITE, _P_STUDIES, _P_STUDY0 = 0, 1, 2, 3, 4, 100

_Box = tuple[slice, slice]


@dataclass(frozen=True)
class _Pose:
    """Per-image placement of the patient in the image: shift, magnification, inspiration."""

    tx: float
    ty: float
    mag_x: float
    mag_y: float
    inspiration: float  # effective, 0 shallow .. 1 deep


@dataclass(frozen=True)
class _LungGeometry:
    """A lung outline at one inspiration (patient frame, lateral-positive x)."""

    x_in: float
    x_out: float
    y_apex: float
    y_base: float
    y_dome: float
    dome_h: float
    x_dome: float
    x_apex: float
    width: float

    def dome(self, xl: np.ndarray) -> np.ndarray:
        """Diaphragm height under lateral positions ``xl``: a steep lateral limb into the
        costophrenic angle and a gentle medial limb."""
        t = xl - self.x_dome
        k_lat = self.dome_h / max(1e-3, self.x_out - self.x_dome) ** 2
        k_med = 0.12 * self.dome_h / max(1e-3, self.x_dome - self.x_in) ** 2
        return self.y_dome + np.where(t > 0, k_lat, k_med) * t * t

    def point(self, u_lateral: float, t_down: float) -> tuple[float, float]:
        """(lateral x, y) at fraction ``u_lateral`` of the width and ``t_down`` of the height."""
        return (self.x_in + u_lateral * self.width,
                self.y_apex + t_down * (self.y_base - self.y_apex))


def _rotate_anatomy(att: np.ndarray, lung_masks: dict[str, np.ndarray], heart: np.ndarray,
                    lesion: np.ndarray, degrees: float):
    """Rotate the attenuation map (bilinear) and the anatomical masks (nearest) about the centre.

    The masks are packed into one uint8 bit field and warped once with the same map, so a
    lesion stays inside the lungs and the lungs stay disjoint from each other and the heart.
    """
    if abs(degrees) < 1e-3:
        return att, lung_masks, heart, lesion
    import cv2

    n = att.shape[0]
    matrix = cv2.getRotationMatrix2D(((n - 1) / 2.0, (n - 1) / 2.0), degrees, 1.0)
    att = cv2.warpAffine(att, matrix, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    bits = (lung_masks["lung_left"].astype(np.uint8) | (lung_masks["lung_right"].astype(np.uint8) << 1)
            | (heart.astype(np.uint8) << 2) | (lesion.astype(np.uint8) << 3))
    bits = cv2.warpAffine(bits, matrix, (n, n), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)
    rotated = {"lung_left": (bits & 1) > 0, "lung_right": (bits & 2) > 0}
    return att, rotated, (bits & 4) > 0, (bits & 8) > 0


class PhantomGenerator:
    """Renders chest X-ray phantoms of one size; grids and texture banks are built once.

    ``size``: output height = width in pixels (>= 32). ``seed`` fixes the texture banks
    (vessel trees, parenchymal mottle, noise), so ``render(label, seed)`` is a pure function
    of the generator's ``(size, seed)`` and the call's arguments. A generator keeps no state
    between renders other than caches, but it is not meant to be shared between threads.

    Geometry is separable: the pose is a shift plus magnification, so every patient-frame
    coordinate is a row vector or a column vector and most fields are outer sums of 1-D
    profiles, evaluated only inside the bounding box of the organ. The in-plane patient
    rotation (a few degrees) is applied afterwards to the attenuation map and the masks
    together (one affine warp), before detector noise and annotations.
    """

    n_vessel_trees: int = 8
    # canonical hilum of the LEFT lung in the vessel bank (patient frame)
    _VESSEL_HILUM = (0.24, -0.08)

    def __init__(self, size: int = 256, seed: int = 0) -> None:
        if int(size) < MIN_SIZE:
            raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {size}")
        self.size = int(size)
        self.seed = int(seed)
        n = self.size
        # pixel centres in normalised units (-1..1)
        self._coords = ((np.arange(n) + 0.5) * (2.0 / n) - 1.0).astype(np.float32)
        self._margin = max(8, n // 8)  # crop slack of the vessel bank, pixels
        bank_rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(7777,)))
        self._noise_bank = self._make_noise_bank(bank_rng, 0.45)
        self._mottle_bank = self._make_noise_bank(bank_rng, max(0.8, n / 220))
        self._coarse_bank = self._make_noise_bank(bank_rng, max(2.0, n / 36))
        self._vessel_bank = self._make_vessel_bank(bank_rng)
        self._airway_bank = self._make_airway_bank(bank_rng)
        self._fonts: dict[int, Any] = {}
        self._lines: dict[tuple[int, str], np.ndarray] = {}
        self._anatomy_cache: tuple[tuple[int, int], Anatomy] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # fonts do not pickle; they and the text caches are rebuilt on demand (DataLoader
        # workers and process pools receive generators by pickling)
        state = self.__dict__.copy()
        state["_fonts"], state["_lines"] = {}, {}
        return state

    # ------------------------------------------------------------------ texture banks

    def _make_noise_bank(self, rng: np.random.Generator, sigma_px: float) -> np.ndarray:
        """(2S, 2S) float32 noise with unit std, Gaussian-filtered with ``sigma_px``."""
        from scipy.ndimage import gaussian_filter

        side = 2 * self.size
        noise = rng.standard_normal((side, side), dtype=np.float32)
        noise = gaussian_filter(noise, sigma_px, mode="wrap")
        noise /= float(noise.std()) + 1e-8
        return noise.astype(np.float32)

    def _crop(self, bank: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random (S, S) view of a (2S, 2S) bank, randomly flipped (no copy)."""
        n = self.size
        r0, c0 = (int(v) for v in rng.integers(0, bank.shape[0] - n + 1, size=2))
        view = bank[r0:r0 + n, c0:c0 + n]
        flips = int(rng.integers(0, 4))
        if flips & 1:
            view = view[::-1]
        if flips & 2:
            view = view[:, ::-1]
        return view

    def _make_vessel_bank(self, rng: np.random.Generator) -> np.ndarray:
        """(K, S + 2m, S + 2m) float32 hilar vessel trees of the LEFT lung (image right), 0..1.

        Drawn once as anti-aliased branching lines radiating from a canonical hilum, thick
        and dense centrally, thin and faint towards the periphery; the right lung uses
        mirrored trees.
        """
        from scipy.ndimage import gaussian_filter

        n, m = self.size, self._margin
        side = n + 2 * m
        supersample = 2 if n <= 512 else 1
        canvas_px = side * supersample
        scale = n / 2 * supersample  # normalised units -> canvas pixels
        hx, hy = self._VESSEL_HILUM

        def to_px(x: float, y: float) -> tuple[float, float]:
            return ((x + 1.0) * scale + m * supersample, (y + 1.0) * scale + m * supersample)

        cols = (np.arange(side, dtype=np.float64) - m + 0.5) * (2.0 / n) - 1.0
        radial = np.hypot(cols[None, :] - hx, cols[:, None] - hy)
        falloff = (1.0 / (1.0 + (radial / 0.4) ** 2)).astype(np.float32)
        bank = np.empty((self.n_vessel_trees, side, side), np.float32)
        for k in range(self.n_vessel_trees):
            img = Image.new("L", (canvas_px, canvas_px), 0)
            draw = ImageDraw.Draw(img)
            # trunks: more and larger vessels run to the lower zones (gravity-dependent flow)
            n_trunks = int(rng.integers(8, 12))
            stack = []
            for angle in np.sort(rng.uniform(-120, 110, n_trunks)):
                width = 0.02 * rng.uniform(0.75, 1.15) * (1.15 if angle > 20 else 0.9)
                stack.append((hx + rng.normal(0, 0.015), hy + rng.normal(0, 0.03),
                              math.radians(angle), width, 0))
            while stack:
                x, y, ang, width, depth = stack.pop()
                length = rng.uniform(0.06, 0.12) * (1.0 + 0.5 * width / 0.02)
                x1 = x + length * math.cos(ang)
                y1 = y + length * math.sin(ang)
                value = int(min(255, 90 + 7000 * width))
                draw.line([to_px(x, y), to_px(x1, y1)], fill=value,
                          width=max(1, int(round(width * scale))))
                if width < 0.003 or depth > 8 or abs(x1) > 0.95 or not -0.95 < y1 < 0.8:
                    continue
                for sign in (-1, 1):
                    if depth > 1 and rng.random() < 0.2:
                        continue
                    child = ang + sign * math.radians(rng.uniform(12, 32)) + rng.normal(0, 0.1)
                    stack.append((x1, y1, child, width * rng.uniform(0.68, 0.8), depth + 1))
            arr = np.asarray(img, dtype=np.float32) / 255.0
            if supersample > 1:
                arr = arr.reshape(side, supersample, side, supersample).mean(axis=(1, 3))
            arr = gaussian_filter(arr, max(0.6, n / 330))
            bank[k] = arr * falloff
        bank /= float(bank.max()) + 1e-8
        return bank

    def _make_airway_bank(self, rng: np.random.Generator) -> np.ndarray:
        """(2S, 2S) float32 field of thin branching tubes, 0..1 (air-bronchogram texture)."""
        from scipy.ndimage import gaussian_filter

        n = self.size
        side = 2 * n
        img = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(img)
        width_px = max(1, round(n / 160))
        for _ in range(40):
            stack = [(float(rng.uniform(0, side)), float(rng.uniform(0, side)),
                      float(rng.uniform(0, 2 * math.pi)), 0.09 * n, 0)]
            while stack:
                x, y, ang, length, depth = stack.pop()
                x1, y1 = x + length * math.cos(ang), y + length * math.sin(ang)
                draw.line([(x, y), (x1, y1)], fill=255, width=width_px)
                if depth < 3:
                    for sign in (-1, 1):
                        stack.append((x1, y1, ang + sign * float(rng.uniform(0.15, 0.4)),
                                      length * float(rng.uniform(0.6, 0.85)), depth + 1))
        bank = gaussian_filter(np.asarray(img, dtype=np.float32) / 255.0, max(0.5, n / 400),
                               mode="wrap")
        return (bank / (float(bank.max()) + 1e-8)).astype(np.float32)

    # ------------------------------------------------------------------ anatomy

    def sample_anatomy(self, rng: np.random.Generator | int, *, age: int | None = None,
                       sex: str | None = None) -> Anatomy:
        """Draw one patient's anatomy (age 18-90 and sex are drawn too unless given).

        Sex changes body width, lung size and adds breast shadows; age lowers bone density
        and enlarges heart and aortic knob a little.
        """
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(int(rng))

        def u(lo: float, hi: float) -> float:
            return float(rng.uniform(lo, hi))

        draw_age = int(rng.integers(18, 91))
        draw_sex = "F" if rng.random() < 0.5 else "M"
        age = draw_age if age is None else int(age)
        sex = draw_sex if sex is None else str(sex)
        if sex not in ("F", "M"):
            raise ValueError(f"sex must be 'F' or 'M', got {sex!r}")
        female = sex == "F"
        habitus = u(-1.0, 1.0)  # slim .. broad
        body_width = (0.9 if female else 0.95) + 0.04 * habitus + u(-0.02, 0.02)
        lung_scale = (0.94 if female else 1.0) * u(0.93, 1.06)
        old = (age - 18) / 72.0

        def lung(side_left: bool) -> LungShape:
            return LungShape(
                x_in=u(0.09, 0.13) + (0.015 if side_left else 0.0),
                x_out=min(body_width - 0.1, u(0.74, 0.82) * lung_scale + 0.03),
                y_apex=u(-0.84, -0.74),
                y_base=u(0.54, 0.64) * lung_scale + (0.045 if side_left else 0.0),
                dome_height=u(0.15, 0.24),
                dome_peak=u(0.38, 0.52),
                apex_peak=u(0.32, 0.45),
                apex_round=u(1.0, 1.6),
                knob=u(0.03, 0.06) + 0.03 * old if side_left else 0.0,
            )

        heart_scale = u(0.92, 1.08) * (1.0 + 0.07 * old)
        return Anatomy(
            sex=sex,
            age=age,
            body_width=body_width,
            soft_tissue=0.5 + 0.5 * habitus,
            lung_right=lung(False),
            lung_left=lung(True),
            air=u(0.9, 1.1),
            heart_x=u(0.16, 0.22),
            heart_y=u(-0.14, -0.08),
            heart_a=0.44 * heart_scale,
            heart_b=0.34 * heart_scale,
            heart_angle=u(0.25, 0.45),
            hilum_y=u(-0.13, -0.04),
            rib_y0=u(-0.92, -0.86),
            rib_alpha=u(8.5, 10.0),
            rib_beta=u(1.2, 1.8),
            rib_arch=u(1.0, 1.4),
            rib_vertex=u(0.22, 0.3),
            rib_width=u(0.42, 0.52),
            spine_width=u(0.065, 0.08),
            vertebra_period=u(0.085, 0.1),
            vertebra_phase=u(0.0, 1.0),
            clavicle_y=u(-0.68, -0.6),
            clavicle_rise=u(0.16, 0.26),
            bone_density=(1.0 - 0.35 * old) * (0.9 if female else 1.0) * u(0.9, 1.1),
            inspiration=u(0.35, 1.0),
            breast=u(0.5, 1.0) if female else 0.0,
            gastric_bubble=u(0.0, 1.0) if rng.random() < 0.7 else 0.0,
            vessel_trees=(int(rng.integers(self.n_vessel_trees)),
                          int(rng.integers(self.n_vessel_trees))),
            vessel_strength=u(0.8, 1.2),
        )

    # ------------------------------------------------------------------ geometry helpers

    @staticmethod
    def _pose(rng: np.random.Generator, anatomy: Anatomy, view: str) -> _Pose:
        ap = view == "AP"
        # a portable AP film magnifies (divergent beam, short distance) and is usually taken
        # in shallower inspiration
        mag = (1.07 if ap else 1.0) * float(rng.uniform(0.96, 1.03))
        insp = anatomy.inspiration + float(rng.normal(0.0, 0.08)) - (0.3 if ap else 0.0)
        return _Pose(tx=float(rng.normal(0.0, 0.02)),
                     ty=float(rng.normal(0.0, 0.025)) + (0.04 if ap else 0.0),
                     mag_x=mag * float(rng.uniform(0.98, 1.02)), mag_y=mag,
                     inspiration=float(min(1.0, max(0.0, insp))))

    def _frame(self, pose: _Pose) -> tuple[np.ndarray, np.ndarray]:
        """Patient-frame x of every column and y of every row, (S,) float32 each."""
        xs = (self._coords - pose.tx) * (1.0 / pose.mag_x)
        ys = (self._coords - pose.ty) * (1.0 / pose.mag_y)
        return xs, ys

    @staticmethod
    def _box(xs: np.ndarray, ys: np.ndarray, x0: float, x1: float, y0: float,
             y1: float) -> _Box | None:
        """Pixel slices (rows, cols) of a patient-frame rectangle, or None when off-image."""
        c0, c1 = int(np.searchsorted(xs, x0)), int(np.searchsorted(xs, x1, side="right"))
        r0, r1 = int(np.searchsorted(ys, y0)), int(np.searchsorted(ys, y1, side="right"))
        if c1 <= c0 or r1 <= r0:
            return None
        return slice(r0, r1), slice(c0, c1)

    @staticmethod
    def _lung_geometry(lung: LungShape, inspiration: float) -> _LungGeometry:
        """Outline numbers of ``lung`` at ``inspiration`` (deep: lower, flatter domes)."""
        y_base = lung.y_base + 0.16 * (inspiration - 0.5)
        dome_h = lung.dome_height * (1.2 - 0.4 * inspiration)
        width = lung.x_out - lung.x_in
        return _LungGeometry(
            x_in=lung.x_in, x_out=lung.x_out, y_apex=lung.y_apex, y_base=y_base,
            y_dome=y_base - dome_h, dome_h=dome_h, x_dome=lung.x_in + lung.dome_peak * width,
            x_apex=lung.x_in + lung.apex_peak * width, width=width)

    @staticmethod
    def _lung_depth(lung: LungShape, geo: _LungGeometry, xl: np.ndarray,
                    y: np.ndarray) -> np.ndarray:
        """Signed depth inside one lung field, (len(y), len(xl)) float32, > 0 inside.

        ``xl``: lateral distance from the midline of the box columns; ``y``: box rows. The
        depth is the smallest of four margins (apex cap, diaphragm dome, lateral and medial
        borders), each an outer difference of 1-D profiles.
        """
        w = geo.width
        dome = geo.dome(xl)
        # apex: a cap falling away faster laterally than medially
        t = (xl - geo.x_apex) * (1.0 / w)
        cap = geo.y_apex + lung.apex_round * t * t * np.where(t > 0, 1.0, 0.6)
        # lateral border: straight low down, curving medially towards the apex
        y_mid = geo.y_apex + 0.75 * (geo.y_base - geo.y_apex)
        k = (geo.x_out - geo.x_apex - 0.12 * w) / (y_mid - geo.y_apex) ** 2
        above = np.minimum(y - y_mid, 0.0)
        lateral = geo.x_out + 0.03 * (y - geo.y_base) - k * above * above
        # medial border: mediastinum, with the aortic knob bulging into the left lung
        medial = geo.x_in + 0.02 * np.maximum(y - geo.y_dome + 0.3, 0.0)
        if lung.knob > 0:
            bump = np.maximum(1.0 - ((y + 0.36) / 0.11) ** 2, 0.0)
            medial = medial + lung.knob * bump
        f32 = np.float32
        depth = np.subtract.outer(y, cap.astype(f32))  # below the apex cap
        bottom = np.subtract.outer((-2.5 * y).astype(f32), (-2.5 * dome).astype(f32))
        np.minimum(depth, bottom, out=depth)  # above the dome (sharp edge: x2.5)
        side = np.subtract.outer(lateral.astype(f32), xl)  # inside the lateral border
        np.minimum(depth, side, out=depth)
        np.subtract.outer(-medial.astype(f32), -xl, out=side)  # lateral of the mediastinum
        np.minimum(depth, side, out=depth)
        return depth

    # ------------------------------------------------------------------ rendering

    def render(self, label: str, seed: int, *, severity: float = 0.7, view: str = "PA",
               site: SiteProfile | None = None, anatomy: Anatomy | None = None,
               text: bool = True) -> PhantomSample:
        """Render one study.

        ``label`` in :data:`LABELS`; ``seed`` fixes anatomy (when ``anatomy`` is None), pose,
        lesion, textures and annotation text, each from its own stream, so the same seed with
        another label shows the same patient in the same pose. ``severity`` in [0, 1] scales
        lesion extent and density (ignored for ``normal``). ``view``: ``"PA"`` or ``"AP"``.
        ``site``: acquisition profile (default ``DEFAULT_SITES[0]``). ``text``: burn the
        site's text and side marker into ``image`` (``image_clean`` never has them).
        """
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        severity = float(min(1.0, max(0.0, severity)))
        site = DEFAULT_SITES[0] if site is None else site
        seed = int(seed)
        if anatomy is None:
            anatomy = self.sample_anatomy(_child_rng(seed, _ANATOMY))
        pose = self._pose(_child_rng(seed, _POSE), anatomy, view)
        tex_rng = _child_rng(seed, _TEXTURE)
        n = self.size
        ap = view == "AP"
        xs, ys = self._frame(pose)
        geo_r = self._lung_geometry(anatomy.lung_right, pose.inspiration)
        geo_l = self._lung_geometry(anatomy.lung_left, pose.inspiration)

        heart_mask, heart_soft = self._heart(anatomy, pose, ap, geo_r, geo_l, xs, ys)

        # ---- lungs: signed depth -> exact masks and soft air fields (0..1)
        air = np.zeros((n, n), np.float32)
        lung_masks: dict[str, np.ndarray] = {}
        for name, lung, geo, sign in (("lung_right", anatomy.lung_right, geo_r, -1.0),
                                      ("lung_left", anatomy.lung_left, geo_l, 1.0)):
            x0, x1 = sorted((sign * (geo.x_in - 0.01), sign * (geo.x_out + 0.02)))
            box = self._box(xs, ys, x0, x1, geo.y_apex - 0.01, geo.y_base + 0.01)
            mask = np.zeros((n, n), bool)
            if box is not None:
                depth = self._lung_depth(lung, geo, xs[box[1]] * sign, ys[box[0]])
                inside = depth > 0
                inside &= ~heart_mask[box]
                mask[box] = inside
                soft = _ramp_(depth, -0.006, 0.14)
                soft *= heart_soft[box]  # heart_soft: fraction of lung air the heart leaves
                air[box] = soft
            lung_masks[name] = mask
        lungs = lung_masks["lung_left"] | lung_masks["lung_right"]

        att = self._body(anatomy, xs, ys)

        # ---- lesion: density = fraction of lung air replaced (0..1), inside the lungs only
        lesion = self._lesion(label, severity, anatomy, geo_r, geo_l, xs, ys, lung_masks,
                              _child_rng(seed, _LESION))
        lesion_mask = np.zeros((n, n), bool)
        if lesion is not None:
            box, density, bronchogram, lesion_side = lesion
            lesion_mask[box] = (density > LESION_THRESHOLD) & lungs[box]
            region = air[box]
            # exudate adds some density of its own even where the lung is thin (its margins)
            exudate = region * 4.0
            _clip(exudate, 0.0, 1.0, out=exudate)
            exudate *= density
            exudate *= 0.1 if label == "pneumonia" else 0.04
            att[box] += exudate
            if bronchogram is not None:
                density -= bronchogram  # airways inside consolidation stay aerated
            region *= 1.0 - density
        else:
            lesion_side = "none"

        # ---- rib cage: ribs read against aerated lung, so they fade over the heart, the
        # abdomen and (partly) over dense consolidation, as on a windowed film
        bone_scale = anatomy.bone_density
        self._ribs(att, air, anatomy, geo_r, geo_l, xs, ys, 0.1 * bone_scale)

        # ---- lungs and vessels
        u_box = self._box(xs, ys, -geo_r.x_out - 0.03, geo_l.x_out + 0.03,
                          min(geo_r.y_apex, geo_l.y_apex) - 0.02,
                          max(geo_r.y_base, geo_l.y_base) + 0.02)
        if u_box is not None:
            air_u = air[u_box]
            texture = self._crop(self._mottle_bank, tex_rng)[u_box] * 0.035
            texture += 1.0
            air_u *= texture  # parenchymal mottle
            vessels = self._vessels(anatomy, pose, xs, ys, tex_rng)[u_box]
            vessels *= 0.17 * anatomy.vessel_strength
            vessels -= 0.38 * anatomy.air
            vessels *= air_u  # vessels show only against aerated lung
            att[u_box] += vessels

        self._airways(att, anatomy, xs, ys)
        self._abdomen(att, anatomy, geo_l, xs, ys, tex_rng)
        if anatomy.breast > 0:
            self._breasts(att, anatomy, xs, ys)

        # ---- other bones
        self._spine(att, anatomy, xs, ys, 0.07 * bone_scale)
        self._clavicles(att, anatomy, xs, ys, ap, 0.13 * bone_scale)
        self._shoulders(att, anatomy, xs, ys, ap, 0.12 * bone_scale)

        # ---- patient rotation on the detector (positioning): the anatomy and its masks turn
        # together about the image centre; detector noise and annotations do not turn.
        rotation_deg = float(np.clip(_child_rng(seed, _ROTATION).normal(0.0, ROTATION_SD_DEG),
                                     -ROTATION_MAX_DEG, ROTATION_MAX_DEG))
        att, lung_masks, heart_mask, lesion_mask = _rotate_anatomy(
            att, lung_masks, heart_mask, lesion_mask, rotation_deg)

        # ---- detector: blur, quantum noise, intensity curve
        passes = int(round(site.blur * site.blur / 0.5))  # variance adds: 0.5 px^2 per pass
        if passes:
            _blur3(att, passes)
        noise_sd = site.noise * (1.0 + 0.25 * anatomy.soft_tissue
                                 + 0.004 * (anatomy.age - 50))
        noise = self._crop(self._noise_bank, tex_rng) * noise_sd
        att += noise
        image_clean = self._intensity_curve(att, site, tex_rng)

        # ---- annotations
        if text:
            text_mask = self._annotation_mask(site, view, _child_rng(seed, _TEXT))
            image = image_clean.copy()
            image[text_mask] = TEXT_VALUE
        else:
            text_mask = np.zeros((n, n), bool)
            image = image_clean

        masks = {
            "lung_left": lung_masks["lung_left"],
            "lung_right": lung_masks["lung_right"],
            "heart": heart_mask,
            "lesion": lesion_mask,
            "text": text_mask,
        }
        meta = {
            "image_id": f"seed{seed}",
            "patient_id": f"seed{seed}",
            "label": label,
            "severity": 0.0 if label == "normal" else round(severity, 4),
            "site": site.name,
            "view": view,
            "age": anatomy.age,
            "sex": anatomy.sex,
            "study_index": 0,
            "seed": seed,
            "lesion_side": lesion_side,
            "rotation_deg": round(rotation_deg, 2),
        }
        return PhantomSample(image=image, image_clean=image_clean, masks=masks, meta=meta)

    # ------------------------------------------------------------------ components

    def _heart(self, anatomy: Anatomy, pose: _Pose, ap: bool, geo_r: _LungGeometry,
               geo_l: _LungGeometry, xs: np.ndarray,
               ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Heart mask (S, S) bool and the fraction of lung air left, (S, S) float32 in 0.1..1.

        A tilted ellipse (long axis from the base, upper image-left, to the apex, lower image
        right) sitting on the diaphragm; AP magnifies it, shallow inspiration broadens it.
        """
        n = self.size
        widen = (1.12 if ap else 1.0) * (1.0 + 0.12 * (0.6 - pose.inspiration))
        ha, hb = anatomy.heart_a * widen, anatomy.heart_b * (1.03 if ap else 1.0)
        # it rests on the left dome, so it moves with the diaphragm
        hx, hy = anatomy.heart_x, geo_l.y_dome + anatomy.heart_y
        mask = np.zeros((n, n), bool)
        clear = np.ones((n, n), np.float32)
        reach = max(ha, hb)
        box = self._box(xs, ys, hx - reach, hx + reach, hy - reach, hy + reach)
        if box is None:
            return mask, clear
        dx, dy = xs[box[1]] - hx, ys[box[0]] - hy
        ca, sa = math.cos(anatomy.heart_angle), math.sin(anatomy.heart_angle)
        along = np.add.outer(dy * (sa / ha), dx * (ca / ha))
        across = np.add.outer(dy * (ca / hb), dx * (-sa / hb))
        along *= along
        across *= across
        along += across
        np.subtract(1.0, along, out=along)
        along *= 0.5 * hb  # ~ depth inside the ellipse, normalised units
        # floor: the diaphragm under the heart, right dome blending into the left dome
        x = xs[box[1]]
        blend = _clip((x + 0.1) * 5.0, 0.0, 1.0)
        floor = geo_r.dome(-x) * (1.0 - blend) + geo_l.dome(x) * blend + 0.03
        np.subtract.outer(-0.5 * ys[box[0]], -0.5 * floor, out=across)
        np.minimum(along, across, out=along)
        mask[box] = along > 0
        # some lung lies behind the heart edge, so the shadow thickens towards its centre
        clear[box] = _ramp_(along, 0.04, -0.003)
        clear[box] *= 0.9
        clear[box] += 0.1
        return mask, clear

    def _body(self, anatomy: Anatomy, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Soft-tissue attenuation (S, S) float32: torso, arms, neck and shoulders, 0..~0.8.

        Brightness follows the tissue thickness crossed by the beam: an elliptical torso
        section (thick centrally, thin at the chest wall), arms beside it, neck and sloping
        shoulders on top; shoulder-girdle muscles brighten the lung apices.
        """
        f32 = np.float32
        xa = np.abs(xs)
        y = ys.astype(np.float64)
        bw = anatomy.body_width
        # torso half-width per row: widest at the lower chest, narrower at waist and axillae
        half = bw * (1.0 - 0.07 * (y - 0.35) ** 2) - 0.05 * _clip((y - 0.65) / 0.35, 0, 1)
        torso = np.multiply.outer((1.0 / half).astype(f32), xa)
        torso *= torso
        np.subtract(1.0, torso, out=torso)
        _clip(torso, 0.0, 1.0, out=torso)
        np.sqrt(torso, out=torso)  # chord length through an elliptical section, 0..1
        x = xa.astype(np.float64)
        arm_c, arm_r = bw + 0.12, 0.16
        arm = np.sqrt(np.maximum(1.0 - ((x - arm_c) / arm_r) ** 2, 0.0))
        # skin: thin tissue at the torso edge still shows; arms beside the torso
        att = _clip(torso, 0.0, 0.12)
        att *= (0.15 + 0.04 * anatomy.soft_tissue) / 0.12
        # arms: beside the torso up at the shoulders, out of the field lower down
        arm_profile = ((0.15 / 0.12) * np.minimum(arm, 0.12) + 0.3 * arm).astype(f32)
        arm_fade = _clip((-0.1 - y) / 0.5, 0.0, 1.0).astype(f32)
        att += np.multiply.outer(arm_fade, arm_profile)
        # vertical profile: shoulder-girdle muscles at the apices, abdomen low down
        vertical = 0.5 + 0.1 * _clip((-0.5 - y) / 0.4, 0.0, 1.0) \
            + 0.04 * _clip((y - 0.4) / 0.5, 0, 1)
        torso *= vertical.astype(f32)[:, None]
        att += torso
        # neck: near-vertical sides; shoulders: slope down laterally from the neck
        neck_w = 0.25
        top = np.where(x < neck_w, -0.97 - 5.0 * (neck_w - x), -0.97 + 0.2 * (x - neck_w) ** 2)
        support = np.subtract.outer((y * 25.0).astype(f32), (top * 25.0).astype(f32))
        _clip(support, 0.0, 1.0, out=support)
        att *= support
        return att

    def _vessels(self, anatomy: Anatomy, pose: _Pose, xs: np.ndarray, ys: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        """(S, S) float32 hilar vessel trees of both lungs, aligned with the hila, 0..~1."""
        n, m = self.size, self._margin
        hx, hy = self._VESSEL_HILUM
        out = np.empty((n, n), np.float32)
        step_x = (xs[-1] - xs[0]) / (n - 1)
        step_y = (ys[-1] - ys[0]) / (n - 1)
        split = int(np.searchsorted(xs, 0.0))
        for sign, tree in ((-1.0, anatomy.vessel_trees[0]), (1.0, anatomy.vessel_trees[1])):
            lung = anatomy.lung_left if sign > 0 else anatomy.lung_right
            # patient hilum in pixels vs the bank's canonical hilum (bank pixel = image pixel)
            col = (sign * (lung.x_in + 0.12) - xs[0]) / step_x
            row = (anatomy.hilum_y - ys[0]) / step_y
            canon_col = (sign * hx + 1.0) * n / 2 - 0.5
            canon_row = (hy + 1.0) * n / 2 - 0.5
            dr = int(round(_clip(canon_row - row + rng.normal(0, 1.5), -m, m)))
            dc = int(round(_clip(canon_col - col + rng.normal(0, 1.5), -m, m)))
            bank = self._vessel_bank[tree]
            if sign < 0:
                bank = bank[:, ::-1]
            view = bank[m + dr:m + dr + n, m + dc:m + dc + n]
            cols = slice(0, split) if sign < 0 else slice(split, n)
            out[:, cols] = view[:, cols]
        return out

    def _airways(self, att: np.ndarray, anatomy: Anatomy, xs: np.ndarray,
                 ys: np.ndarray) -> None:
        """Trachea and main bronchi: a dark air column down the upper mediastinum."""
        carina = anatomy.hilum_y - 0.1
        box = self._box(xs, ys, -0.2, 0.2, -1.2, carina + 0.16)
        if box is None:
            return
        x, y = xs[box[1]], ys[box[0]]
        # the trachea leans a little to the right of the aortic knob
        centre = 0.012 - 0.02 * _clip((y + 0.6) / 0.3, 0.0, 1.0)
        length = _clip((carina - y) / 0.03, 0.0, 1.0)
        trachea = _clip((0.036 - np.abs(x[None, :] - centre[:, None])) / 0.012, 0.0, 1.0)
        trachea *= length[:, None]
        below = np.maximum(y - carina, 0.0)[:, None]
        extent = (_clip((y - carina) / 0.02, 0, 1) * _clip((carina + 0.15 - y) / 0.05, 0, 1))
        right = _clip((0.024 - np.abs(x[None, :] + 0.6 * below)) / 0.01, 0.0, 1.0)
        left = _clip((0.022 - np.abs(x[None, :] - 1.1 * below)) / 0.01, 0.0, 1.0)
        bronchi = np.maximum(right, left) * extent[:, None]
        att[box] -= (0.085 * np.maximum(trachea, bronchi)).astype(np.float32)

    def _abdomen(self, att: np.ndarray, anatomy: Anatomy, geo_l: _LungGeometry,
                 xs: np.ndarray, ys: np.ndarray, rng: np.random.Generator) -> None:
        """Gastric air bubble under the left hemidiaphragm, with a flat air-fluid level."""
        if anatomy.gastric_bubble <= 0:
            return
        size = anatomy.gastric_bubble
        cx, cy = 0.3 + 0.1 * size, geo_l.y_dome + 0.1 + 0.03 * size
        rx, ry = 0.09 + 0.05 * size, 0.06
        box = self._box(xs, ys, cx - rx, cx + rx, cy - ry, cy + ry)
        if box is None:
            return
        dx = ((xs[box[1]] - cx) / rx) ** 2
        dy = ((ys[box[0]] - cy) / ry) ** 2
        bubble = _clip((1.0 - np.add.outer(dy, dx)) / 0.4, 0.0, 1.0)
        bubble *= _clip((cy + 0.2 * ry - ys[box[0]]) / 0.01, 0.0, 1.0)[:, None]
        att[box] -= ((0.08 + 0.05 * float(rng.random())) * bubble).astype(np.float32)

    def _breasts(self, att: np.ndarray, anatomy: Anatomy, xs: np.ndarray,
                 ys: np.ndarray) -> None:
        """Soft-tissue shadows over the lower lateral lung zones, with a curved lower edge."""
        box = self._box(xs, ys, -1.0, 1.0, 0.0, 0.95)
        if box is None:
            return
        xa = np.abs(xs[box[1]]).astype(np.float64)
        y = ys[box[0]].astype(np.float64)
        lower = 0.55 + 0.6 * (xa - 0.45) ** 2
        edge = np.subtract.outer((y * -20.0).astype(np.float32), (lower * -20.0).astype(np.float32))
        _clip(edge, 0.0, 1.0, out=edge)
        weight = np.multiply.outer(_clip(y / 0.3, 0.0, 1.0),
                                   _clip((xa - 0.12) / 0.25, 0.0, 1.0)
                                   * _clip((anatomy.body_width - xa) / 0.1, 0.0, 1.0))
        edge *= (0.07 * anatomy.breast * weight).astype(np.float32)
        att[box] += edge

    def _ribs(self, att: np.ndarray, air: np.ndarray, anatomy: Anatomy, geo_r: _LungGeometry,
              geo_l: _LungGeometry, xs: np.ndarray, ys: np.ndarray, amount: float) -> None:
        """Add the rib cage to ``att``.

        Posterior ribs use one curved coordinate (arching down laterally from the spine) and
        a periodic phase whose spacing grows downwards, so the whole cage costs a handful of
        array passes instead of one drawing per rib. Anterior ribs are fainter bands running
        down medially from the lateral chest wall.
        """
        x_cage = max(geo_r.x_out, geo_l.x_out) + 0.05
        box = self._box(xs, ys, -x_cage, x_cage, anatomy.rib_y0 - 0.08, 0.95)
        if box is None:
            return
        x = np.abs(xs[box[1]]).astype(np.float64)
        y = ys[box[0]].astype(np.float64)
        sharp = self.size / 28.0  # rib edge ~1.5 px at any size (in phase units per unit)
        # posterior: phase = alpha v - beta v^2 with v = y - arch(x); expanded into outer sums
        d = x - anatomy.rib_vertex
        arch = anatomy.rib_arch * (d * d - anatomy.rib_vertex ** 2)
        v_y = y - anatomy.rib_y0
        alpha, beta = anatomy.rib_alpha, anatomy.rib_beta
        row = alpha * v_y - beta * v_y * v_y
        col = -alpha * arch - beta * arch * arch
        f32 = np.float32
        phase = np.multiply.outer((2.0 * beta * v_y).astype(f32), arch.astype(f32))
        phase += np.add.outer(row.astype(f32), col.astype(f32))
        whole = np.floor(phase)
        phase -= whole  # fraction within one rib period
        np.subtract(anatomy.rib_width, phase, out=whole)
        np.minimum(phase, whole, out=phase)  # > 0 inside a rib band
        phase *= sharp
        _clip(phase, 0.0, 1.0, out=phase)
        # lateral end at the chest wall, medial end at the transverse processes; the
        # cage fades above the first rib and below the diaphragm
        lateral = _clip((x_cage - x) / 0.05, 0, 1) * _clip((x - 0.06) / 0.05, 0, 1)
        vertical = _clip((y - anatomy.rib_y0 + 0.02) / 0.04, 0, 1) \
            * (1.0 - 0.6 * _clip((y - max(geo_r.y_dome, geo_l.y_dome)) / 0.2, 0, 1))
        np.multiply.outer(vertical.astype(f32), (amount * lateral).astype(f32), out=whole)
        phase *= whole
        # bone contrast reads against aerated lung; over heart and liver the ribs fade
        np.multiply(air[box], 0.7, out=whole)
        whole += 0.3
        phase *= whole
        att[box] += phase
        # anterior ribs over the lateral lung fields
        ant = np.add.outer((y * 7.0).astype(f32), (x * 4.2 + anatomy.vertebra_phase).astype(f32))
        np.floor(ant, out=whole)
        ant -= whole
        np.subtract(0.36, ant, out=whole)
        np.minimum(ant, whole, out=ant)
        ant *= sharp * 0.8
        _clip(ant, 0.0, 1.0, out=ant)
        lateral_a = _clip((x - 0.3) / 0.25, 0, 1) * _clip((x_cage - x) / 0.08, 0, 1)
        vertical_a = _clip((0.4 - y) / 0.2, 0, 1) * _clip((y + 0.7) / 0.1, 0, 1)
        np.multiply.outer(vertical_a.astype(f32), (0.4 * amount * lateral_a).astype(f32),
                          out=whole)
        ant *= whole
        att[box] += ant

    def _spine(self, att: np.ndarray, anatomy: Anatomy, xs: np.ndarray, ys: np.ndarray,
               amount: float) -> None:
        """Vertebral column: bodies with darker discs, paired pedicles, spinous processes."""
        w = anatomy.spine_width
        box = self._box(xs, ys, -w - 0.03, w + 0.03, -1.2, 1.2)
        if box is None:
            return
        x = np.abs(xs[box[1]])
        y = ys[box[0]]
        # vertebrae grow towards the lumbar spine
        phase = y / anatomy.vertebra_period + anatomy.vertebra_phase - 0.15 * y * y
        frac = phase - np.floor(phase)
        sharp = self.size / 22.0
        vert = _clip(np.minimum(frac, 0.8 - frac) * sharp, 0.0, 1.0)  # bodies vs discs
        width = w * (1.0 + 0.12 * y)
        column = _clip((width[:, None] - x[None, :]) / 0.02, 0.0, 1.0)
        pedicle_y = _clip(1.0 - ((frac - 0.3) / 0.16) ** 2, 0.0, 1.0)
        pedicle_x = _clip(1.0 - ((x - 0.62 * w) / (0.2 * w)) ** 2, 0.0, 1.0)
        spinous_y = _clip(1.0 - ((frac - 0.65) / 0.18) ** 2, 0.0, 1.0)
        spinous_x = _clip(1.0 - (x / (0.14 * w)) ** 2, 0.0, 1.0)
        # the lumbar spine hides behind the abdomen more than the thoracic spine behind air
        bone = column * ((0.55 + 0.45 * vert) * (1.0 - 0.4 * _clip((y - 0.45) / 0.3, 0, 1)))[:, None]
        bone += 0.5 * np.multiply.outer(pedicle_y, pedicle_x)
        bone += 0.35 * np.multiply.outer(spinous_y, spinous_x)
        att[box] += (amount * bone).astype(np.float32)

    def _clavicles(self, att: np.ndarray, anatomy: Anatomy, xs: np.ndarray, ys: np.ndarray,
                   ap: bool, amount: float) -> None:
        """Two S-shaped clavicles from the sternal notch to the shoulders (higher on AP)."""
        y_med = anatomy.clavicle_y - (0.1 if ap else 0.0)
        rise = anatomy.clavicle_rise * (0.4 if ap else 1.0)
        x_med, x_lat = 0.05, 0.8
        box = self._box(xs, ys, -x_lat, x_lat, y_med - rise - 0.12, y_med + 0.08)
        if box is None:
            return
        x = np.abs(xs[box[1]])
        y = ys[box[0]]
        t = (x - x_med) / (x_lat - x_med)
        tc = _clip(t, 0.0, 1.0)
        centre = y_med - rise * tc - 0.02 * np.sin(2.0 * np.pi * tc)  # gentle S
        half = 0.045 - 0.018 * tc  # thicker at the sternal end
        dist = np.abs(np.subtract.outer(y, centre))
        clav = _clip((half[None, :] - dist) / 0.012, 0.0, 1.0)
        clav *= 1.0 - 0.25 * _clip((0.5 * half[None, :] - dist) / 0.015, 0.0, 1.0)  # cortex
        clav *= (_clip((t + 0.02) / 0.08, 0, 1) * _clip((1.0 - t) / 0.05, 0, 1))[None, :]
        att[box] += (amount * clav).astype(np.float32)

    def _shoulders(self, att: np.ndarray, anatomy: Anatomy, xs: np.ndarray, ys: np.ndarray,
                   ap: bool, amount: float) -> None:
        """Humeral heads in the upper corners and the scapulae (over the lungs on AP)."""
        bw = anatomy.body_width
        hx, hy, r = bw + 0.14, -0.69, 0.14
        medial_top = 0.55 if ap else 0.72  # AP: the scapulae are not rotated off the lungs
        for sign in (-1.0, 1.0):
            x0, x1 = sorted((sign * (medial_top - 0.05), sign * (hx + r)))
            box = self._box(xs, ys, x0, x1, -1.2, 0.25)
            if box is None:
                continue
            x = sign * xs[box[1]]
            y = ys[box[0]]
            dist = np.add.outer((y - hy) ** 2, (x - hx) ** 2)
            np.sqrt(dist, out=dist)
            head = _ramp(dist, r, r - 0.015)
            head *= 1.0 - 0.35 * _ramp_(dist, r - 0.03, r - 0.06)  # cortex brighter
            # scapula: medial border running down-laterally, tip near the mid chest
            medial = medial_top + 0.14 * (y + 0.75)
            scap = _ramp_(np.subtract.outer(-medial, -x), 0.0, 0.03)
            scap *= np.multiply.outer(_clip((y + 0.8) / 0.06, 0, 1),
                                      (0.5 if ap else 0.35) * _clip((bw + 0.04 - x) / 0.04, 0, 1))
            scap *= _ramp_(np.subtract.outer(y, 0.3 * (x - 0.6)), 0.1, -0.02)
            head += scap
            head *= amount
            att[box] += head

    # ------------------------------------------------------------------ lesions

    @staticmethod
    def _pick_lung_point(mask: np.ndarray, geo: _LungGeometry, sign: float,
                         zone: tuple[float, float],
                         xs: np.ndarray, ys: np.ndarray,
                         rng: np.random.Generator) -> tuple[float, float]:
        """A random visible lung point (patient frame) between fractions ``zone`` of the
        lung height; the zone's geometric centre when the lung shows no pixel there.
        ``sign``: -1 for the right lung (image left), +1 for the left lung."""
        height = geo.y_base - geo.y_apex
        y0, y1 = geo.y_apex + zone[0] * height, geo.y_apex + zone[1] * height
        r0, r1 = int(np.searchsorted(ys, y0)), int(np.searchsorted(ys, y1))
        candidates = np.flatnonzero(mask[r0:r1])
        if candidates.size == 0:
            return sign * (geo.x_in + 0.6 * geo.width), 0.5 * (y0 + y1)
        row, col = divmod(int(candidates[int(rng.integers(candidates.size))]), mask.shape[1])
        return float(xs[col]), float(ys[r0 + row])

    def _lesion(self, label: str, severity: float, anatomy: Anatomy, geo_r: _LungGeometry,
                geo_l: _LungGeometry, xs: np.ndarray, ys: np.ndarray,
                lung_masks: dict[str, np.ndarray], rng: np.random.Generator
                ) -> tuple[_Box, np.ndarray, np.ndarray | None, str] | None:
        """Lesion of ``label`` or None for ``normal``.

        Returns (box, density, bronchogram, side): density (box-shaped float32, 0..1) is the
        fraction of lung air replaced (it acts on lung air only, so it needs no clipping to
        the lungs); bronchogram (or None) is the fraction kept aerated along airways inside
        consolidation; side is ``"left"``,
        ``"right"`` or ``"both"`` (the patient's sides).
        """
        if label == "normal":
            return None
        blobs: list[tuple[float, float, float, float, float, float]] = []  # x y rx ry angle amp

        def where(side: float, u_lat: float, t_down: float) -> tuple[float, float]:
            x, y = (geo_l if side > 0 else geo_r).point(u_lat, t_down)
            return side * x, y

        if label == "pneumonia":
            side = 1.0 if rng.random() < 0.45 else -1.0  # the right lung is hit more often
            sides = [side]
            second = rng.random()
            if second < 0.15:
                sides.append(-side)
            elif second < 0.45:
                sides.append(side)  # a second region in the same lung
            fissure_cut = None  # (side, y, +1 keep above / -1 keep below)
            for k, s in enumerate(sides):
                lobe = int(rng.integers(0, 3))  # upper, middle (lingula), lower zone
                if k == 0 and s < 0 and lobe < 2 and rng.random() < 0.6:
                    # right upper / middle lobe: the minor fissure gives a sharp straight edge
                    fissure_cut = (s, anatomy.hilum_y + 0.02, 1.0 if lobe == 0 else -1.0)
                scale = (0.85 + 0.4 * severity) * (0.75 if k else 1.0)
                # centre on a visible lung pixel of the zone (not hidden behind the heart)
                zone = ((0.2, 0.48), (0.5, 0.7), (0.66, 0.9))[lobe]
                cx, cy = self._pick_lung_point(lung_masks["lung_left" if s > 0 else "lung_right"],
                                               geo_l if s > 0 else geo_r, s, zone, xs, ys, rng)
                for _ in range(int(rng.integers(3, 6))):
                    blobs.append((cx + float(rng.normal(0, 0.07)) * scale,
                                  cy + float(rng.normal(0, 0.08)) * scale,
                                  float(rng.uniform(0.1, 0.18)) * scale,
                                  float(rng.uniform(0.1, 0.2)) * scale,
                                  float(rng.uniform(0, math.pi)), float(rng.uniform(0.7, 1.0))))
            lesion_side = "both" if len(set(sides)) == 2 else ("left" if side > 0 else "right")
        else:  # covid
            bilateral = rng.random() < 0.9
            first = 1.0 if rng.random() < 0.5 else -1.0
            sides = [first, -first] if bilateral else [first]
            for s in sides:
                for _ in range(int(rng.integers(3, 5)) + int(round(4 * severity))):
                    # peripheral and basal: lateral part, lower zones weighted
                    u_lat = float(rng.uniform(0.78, 1.0)) - 0.3 * severity * float(rng.random())
                    t_down = 0.95 - 0.6 * float(rng.random()) ** 1.5
                    cx, cy = where(s, u_lat, t_down)
                    size = 0.065 + 0.07 * severity
                    blobs.append((cx, cy, float(rng.uniform(0.8, 1.3)) * size,
                                  float(rng.uniform(1.0, 1.7)) * size, float(rng.uniform(0, math.pi)),
                                  float(rng.uniform(0.6, 1.0))))
            lesion_side = "both" if bilateral else ("left" if first > 0 else "right")

        params = np.array(blobs)
        reach = np.maximum(params[:, 2], params[:, 3])
        box = self._box(xs, ys, float((params[:, 0] - reach).min()),
                        float((params[:, 0] + reach).max()),
                        float((params[:, 1] - reach).min()), float((params[:, 1] + reach).max()))
        if box is None:
            return None
        bx, by = xs[box[1]], ys[box[0]]
        field_ = np.zeros((by.size, bx.size), np.float32)
        for (cx, cy, rx, ry, ang, amp), r in zip(blobs, reach.tolist(), strict=True):
            c0, c1 = int(np.searchsorted(bx, cx - r)), int(np.searchsorted(bx, cx + r))
            r0, r1 = int(np.searchsorted(by, cy - r)), int(np.searchsorted(by, cy + r))
            if c1 <= c0 or r1 <= r0:
                continue
            dx, dy = bx[c0:c1] - cx, by[r0:r1] - cy
            c, s = math.cos(ang), math.sin(ang)
            u = np.add.outer(dy * (s / rx), dx * (c / rx))
            v = np.add.outer(dy * (c / ry), dx * (-s / ry))
            u *= u
            v *= v
            u += v
            np.subtract(1.0, u, out=u)
            _clip(u, 0.0, 1.0, out=u)  # compact parabolic bump, 1 at the centre
            u *= amp
            field_[r0:r1, c0:c1] += u

        coarse = self._crop(self._coarse_bank, rng)[box]
        bronchogram = None
        if label == "pneumonia":
            # consolidation: a dense plateau with an irregular, fluffy margin
            # irregular margin: noise shifts the edge but never punches holes in the core
            coarse = coarse * 0.2
            coarse *= _ramp(field_, 0.0, 0.25)
            field_ += coarse
            density = _ramp_(field_, 0.06, 0.9)  # wide ramp: ill-defined, fluffy margins
            density *= 1.0 + 0.05 * self._crop(self._mottle_bank, rng)[box]
            density *= 0.5 + 0.45 * severity
            if fissure_cut is not None:
                side, y_fissure, keep = fissure_cut
                cut = _clip(keep * (y_fissure - by) / 0.008 + 0.5, 0.0, 1.0)
                side_cols = (bx * side) > 0
                density[:, side_cols] *= cut.astype(np.float32)[:, None]
            if rng.random() < 0.6:
                # air bronchograms: thin branching airways stay dark inside the plateau
                airways = self._crop(self._airway_bank, rng)[box]
                bronchogram = _ramp(density, 0.5, 0.8)
                bronchogram *= airways
                bronchogram *= 0.3
        else:
            # ground glass: hazy, patchy, lower density; vessels stay visible through it
            coarse = coarse * 0.55
            coarse += 1.0
            field_ *= coarse
            density = _ramp_(field_, 0.03, 0.6)
            density *= 1.0 + 0.1 * self._crop(self._mottle_bank, rng)[box]
            density *= 0.42 + 0.28 * severity
        _clip(density, 0.0, 1.0, out=density)
        return box, density, bronchogram, lesion_side

    # ------------------------------------------------------------------ detector / text

    def _intensity_curve(self, att: np.ndarray, site: SiteProfile,
                         rng: np.random.Generator) -> np.ndarray:
        """Attenuation -> uint8 through the site's window and midtone curve.

        ``y = clip(contrast * (a - 0.03) / 0.8 + brightness)``; ``y ** gamma`` is replaced by
        the quadratic ``y + k y (1 - y)`` that agrees at y = 0.5 (monotone for |k| <= 1 and
        several times cheaper than a power or a lookup table).
        """
        contrast = site.contrast * float(rng.uniform(0.96, 1.04)) / 0.8
        brightness = site.brightness + float(rng.normal(0.0, 0.015)) - 0.03 * contrast
        k = float(_clip(4.0 * (0.5 ** site.gamma - 0.5), -1.0, 1.0))
        y = att * contrast
        y += brightness
        _clip(y, 0.0, 1.0, out=y)
        if k:
            curve = 1.0 - y
            curve *= y
            curve *= k
            y += curve
        y *= float(site.white_level - site.black_level)
        y += site.black_level + 0.5
        return y.astype(np.uint8)

    def _font(self, px: int) -> Any:
        font = self._fonts.get(px)
        if font is None:
            try:
                font = ImageFont.load_default(size=px)
            except (TypeError, OSError, ImportError, AttributeError):  # Pillow without FreeType
                font = ImageFont.load_default()
            self._fonts[px] = font
        return font

    def _text_bitmap(self, px: int, text: str, *, cache: bool = False) -> np.ndarray:
        """(h, w) bool bitmap of one line of ``text`` at font size ``px``, pen at (0, 0).

        PIL lays the line out (kerning, hinting); lines that recur on every image of a site
        (its name, the view label, the marker letter) are cached.
        """
        key = (px, text)
        bitmap = self._lines.get(key) if cache else None
        if bitmap is None:
            font = self._font(px)
            # generous canvas (binary hinting can widen a line), then trimmed on the right
            width = int(px * (0.8 * len(text) + 2))
            canvas = Image.new("1", (width, 2 * px), 0)
            draw = ImageDraw.Draw(canvas)
            draw.fontmode = "1"  # binary glyphs: the mask is exact, no anti-aliased fringe
            draw.text((0, 0), text, font=font, fill=1)
            bitmap = np.asarray(canvas, dtype=bool)
            cols = np.flatnonzero(bitmap.any(axis=0))
            bitmap = bitmap[:, :cols[-1] + 1] if cols.size else bitmap[:, :1]
            if cache:
                self._lines[key] = bitmap
        return bitmap

    @staticmethod
    def _stamp(mask: np.ndarray, bitmap: np.ndarray, x: int, y: int) -> None:
        """OR ``bitmap`` into ``mask`` with its top-left corner at (x, y), clipped."""
        h, w = bitmap.shape
        n_rows, n_cols = mask.shape
        r0, c0, r1, c1 = max(y, 0), max(x, 0), min(y + h, n_rows), min(x + w, n_cols)
        if r1 > r0 and c1 > c0:
            mask[r0:r1, c0:c1] |= bitmap[r0 - y:r1 - y, c0 - x:c1 - x]

    def _annotation_mask(self, site: SiteProfile, view: str,
                         rng: np.random.Generator) -> np.ndarray:
        """(S, S) bool mask of burned-in text lines and the boxed side-marker letter."""
        n = self.size
        mask = np.zeros((n, n), bool)
        small, big = max(6, round(n / 25)), max(8, round(n / 14))
        pad = max(2, n // 40)

        def place(corner: str, w: int, h: int) -> tuple[int, int]:
            jitter = int(rng.integers(0, pad + 1))
            x = pad + jitter if corner[1] == "l" else n - w - pad - jitter
            y = pad + jitter if corner[0] == "t" else n - h - pad - jitter
            return x, y

        # side marker: a letter in a box
        letter = self._text_bitmap(big, site.marker, cache=True)
        rows, cols = np.flatnonzero(letter.any(axis=1)), np.flatnonzero(letter.any(axis=0))
        letter = letter[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        h, w = letter.shape
        gap, line = max(2, n // 64), max(1, n // 200)
        box_w, box_h = w + 2 * gap, h + 2 * gap
        x, y = place(site.marker_corner, box_w, box_h)
        self._stamp(mask, letter, x + gap, y + gap)
        frame = np.ones((box_h, box_w), bool)
        frame[line:-line, line:-line] = False
        self._stamp(mask, frame, x, y)
        # text block: site name, accession, date, view (the first and last recur)
        accession = f"{site.accession_prefix}{int(rng.integers(10**6, 10**7))}"
        date = (f"20{int(rng.integers(19, 24))}-{int(rng.integers(1, 13)):02d}-"
                f"{int(rng.integers(1, 29)):02d}")
        lines = [site.text or site.name.upper(), accession, date,
                 "AP PORTABLE" if view == "AP" else "PA ERECT"]
        bitmaps = [self._text_bitmap(small, line_text, cache=k in (0, 3))
                   for k, line_text in enumerate(lines)]
        line_h = int(round(small * 1.15))
        block_w = max(b.shape[1] for b in bitmaps)
        x, y = place(site.text_corner, block_w, line_h * len(lines))
        for k, bitmap in enumerate(bitmaps):
            lx = x if site.text_corner[1] == "l" else x + block_w - bitmap.shape[1]
            self._stamp(mask, bitmap, lx, y + k * line_h)
        return mask

    # ------------------------------------------------------------------ cohorts

    def cohort(self, config: CohortConfig) -> Iterator[PhantomSample]:
        """Render a cohort: patients in order, each patient's studies in order."""
        if config.size != self.size:
            raise ValueError(f"config.size {config.size} != generator size {self.size}")
        for study in plan_cohort(config):
            anatomy = self._patient_anatomy(config, study)
            sample = self.render(study["label"], study["seed"], severity=study["severity"],
                                 view=study["view"], site=config.sites[study["site_index"]],
                                 anatomy=anatomy, text=config.text)
            sample.meta.update({key: study[key] for key in
                                ("image_id", "patient_id", "study_index", "n_studies",
                                 "severity")})
            yield sample

    def _patient_anatomy(self, config: CohortConfig, study: dict[str, Any]) -> Anatomy:
        """The patient's anatomy (drawn from its own stream; cached for its follow-ups)."""
        key = (config.seed, study["patient_index"])
        if self._anatomy_cache is not None and self._anatomy_cache[0] == key:
            return self._anatomy_cache[1]
        rng = _child_rng(config.seed, study["patient_index"], _P_ANATOMY)
        anatomy = self.sample_anatomy(rng, age=study["age"], sex=study["sex"])
        self._anatomy_cache = (key, anatomy)
        return anatomy


def plan_cohort(config: CohortConfig) -> list[dict[str, Any]]:
    """Per-study plan of a cohort (no pixels): ids, label, site, view, severity, seeds.

    Every patient p draws from streams ``SeedSequence(config.seed, spawn_key=(p, k))``, one
    per purpose (label, demographics, anatomy, site, number of studies, each study), so
    changing e.g. the class weights changes labels and sites but not anatomy or pose.
    """
    weights = np.asarray(config.class_weights, dtype=np.float64)
    weights = weights / weights.sum()
    cumulative = np.cumsum(weights)
    n_sites = len(config.sites)
    lo, hi = config.images_per_patient
    s_lo, s_hi = config.severity_range
    studies: list[dict[str, Any]] = []
    for p in range(config.n_patients):
        rng = _child_rng(config.seed, p, _P_LABEL)
        label_index = min(int(np.searchsorted(cumulative, rng.random(), side="right")),
                          len(LABELS) - 1)
        label = LABELS[label_index]
        rng = _child_rng(config.seed, p, _P_DEMOGRAPHICS)
        age = int(rng.integers(18, 91))
        sex = "F" if rng.random() < 0.5 else "M"
        base_severity = float(rng.uniform(s_lo, s_hi))
        rng = _child_rng(config.seed, p, _P_SITE)
        follow_home, any_site = rng.random(), int(rng.integers(n_sites))
        # with probability c the patient comes from the label's own site, else any site
        site_index = label_index % n_sites if follow_home < config.site_label_correlation \
            else any_site
        rng = _child_rng(config.seed, p, _P_STUDIES)
        n_studies = int(rng.integers(lo, hi + 1))
        patient_id = f"p{p:04d}"
        for k in range(n_studies):
            rng = _child_rng(config.seed, p, _P_STUDY0 + k)
            view = "AP" if rng.random() < config.ap_fraction else "PA"
            severity = float(_clip(base_severity + rng.normal(0.0, 0.1), s_lo, s_hi))
            seed = _seed_int(np.random.SeedSequence(config.seed, spawn_key=(p, _P_STUDY0 + k, 1)))
            studies.append({
                "image_id": f"{patient_id}_s{k}",
                "patient_id": patient_id,
                "patient_index": p,
                "study_index": k,
                "n_studies": n_studies,
                "label": label,
                "severity": 0.0 if label == "normal" else round(severity, 4),
                "site_index": site_index,
                "site": config.sites[site_index].name,
                "view": view,
                "age": age,
                "sex": sex,
                "seed": seed,
            })
    return studies


def generate_cohort(config: CohortConfig) -> Iterator[PhantomSample]:
    """Render ``config``'s cohort with a fresh generator of ``config.size`` (seeded by it)."""
    return PhantomGenerator(config.size, seed=config.seed).cohort(config)


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(temporary_path)`` then move the file into place with ``os.replace``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _save_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 (H, W) array as an 8-bit grayscale PNG, atomically."""
    image = Image.fromarray(array)
    # zlib level 1: noisy radiographs barely compress further, and it is 2-3x faster
    _atomic_write(path, lambda tmp: image.save(tmp, format="PNG", compress_level=1))


def write_cohort(out_dir: str | os.PathLike, config: CohortConfig, *,
                 progress: bool = True) -> pd.DataFrame:
    """Write a cohort's PNGs and ``manifest.csv`` under ``out_dir``; return the manifest.

    Files: ``images/<image_id>.png`` (with text when ``config.text``), ``images_clean/
    <image_id>.png`` (without text, only when ``config.text``), ``masks/<kind>/<image_id>.png``
    for every kind in :data:`MASK_KINDS` (uint8 0 / 255). Every file is written atomically
    and the manifest last, so a half-written cohort has no manifest. Paths in the file are
    POSIX, relative to ``out_dir``; in the returned frame they are absolute. Columns are
    :data:`MANIFEST_COLUMNS`.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():  # refuse before any folder is made
        raise ValueError(f"output folder {out} exists and is not a folder")
    folders = ["images", *[f"masks/{kind}" for kind in MASK_KINDS]]
    if config.text:
        folders.append("images_clean")
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
    samples = generate_cohort(config)
    if progress:
        from tqdm.auto import tqdm

        total = len(plan_cohort(config))
        samples = tqdm(samples, total=total, desc="phantom cohort", unit="img")
    rows = []
    for sample in samples:
        meta = sample.meta
        image_id = meta["image_id"]
        image_rel = f"images/{image_id}.png"
        _save_png(out / image_rel, sample.image)
        if config.text:
            _save_png(out / f"images_clean/{image_id}.png", sample.image_clean)
        row = {
            "image_id": image_id, "path": image_rel, "label": meta["label"],
            "patient_id": meta["patient_id"], "source": "phantom", "view": meta["view"],
            "split": "", "mask_path": "", "origin": "real", "site": meta["site"],
            "age": meta["age"], "sex": meta["sex"], "severity": meta["severity"],
            "study_index": meta["study_index"],
        }
        for kind in MASK_KINDS:
            rel = f"masks/{kind}/{image_id}.png"
            _save_png(out / rel, sample.masks[kind].astype(np.uint8) * np.uint8(255))
            row[f"mask_{kind}"] = rel
        rows.append(row)
    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    _atomic_write(out / "manifest.csv",
                  lambda tmp: manifest.to_csv(tmp, index=False, lineterminator="\n"))
    # in memory, as in every manifest, paths are absolute (the file keeps them relative)
    base = out.resolve()
    for column in ("path", *(f"mask_{kind}" for kind in MASK_KINDS)):
        manifest[column] = [str(base / value) for value in manifest[column]]
    return manifest


__all__ = [
    "LABELS", "MASK_KINDS", "VIEWS", "MANIFEST_COLUMNS", "SiteProfile", "DEFAULT_SITES",
    "LungShape", "Anatomy", "CohortConfig", "PhantomSample", "PhantomGenerator",
    "plan_cohort", "generate_cohort", "write_cohort",
]

