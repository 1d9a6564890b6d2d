"""Matplotlib figures shared by the notebooks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from cxrlib.data import manifest as mf
from cxrlib.data.io import read_image, read_mask
from cxrlib.runs import atomic_write

#: Contour colours per mask kind (colour-blind friendly Okabe-Ito hues).
MASK_COLORS: dict[str, str] = {
    "lung_left": "#56B4E9",
    "lung_right": "#0072B2",
    "lung": "#56B4E9",
    "heart": "#E69F00",
    "lesion": "#D55E00",
    "text": "#CC79A7",
}

CLASS_ORDER = ("normal", "pneumonia", "covid")


def row_masks(row: Mapping, kinds: Sequence[str]) -> dict[str, np.ndarray]:
    """Read the masks a manifest row has among ``kinds`` (``mask_<kind>`` columns, or ``mask_path``
    as 'lung'; paths absolute)."""
    masks = {}
    for kind in kinds:
        column = "mask_path" if kind == "lung" else f"mask_{kind}"
        rel = str(row.get(column, "") or "")
        if rel:
            masks[kind] = read_mask(mf.resolve_path(None, rel))
    return masks


def show_with_masks(ax, image: np.ndarray, masks: Mapping[str, np.ndarray] | None = None,
                    title: str = "", linewidth: float = 1.0) -> None:
    """Grayscale image with each mask drawn as a coloured contour (the image stays readable)."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    for kind, mask in (masks or {}).items():
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=[MASK_COLORS.get(kind, "yellow")],
                       linewidths=linewidth)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def class_gallery(df: pd.DataFrame, *, n_per_class: int = 4,
                  kinds: Sequence[str] = ("lung_left", "lung_right", "heart", "lesion"),
                  overlay_first: bool = True, seed: int = 0, classes: Sequence[str] = CLASS_ORDER):
    """One row per class: the first column with mask contours, the rest plain images.

    Returns the matplotlib Figure. Images are sampled with ``seed`` from distinct patients.
    """
    classes = [c for c in classes if (df["label"] == c).any()]
    fig, axes = plt.subplots(len(classes), n_per_class, figsize=(2.4 * n_per_class, 2.5 * len(classes)),
                             squeeze=False)
    for r, label in enumerate(classes):
        rows = (df[df["label"] == label].drop_duplicates("patient_id")
                .sample(frac=1.0, random_state=seed).head(n_per_class))
        for c in range(n_per_class):
            ax = axes[r, c]
            if c >= len(rows):
                ax.set_axis_off()
                continue
            row = rows.iloc[c]
            image = read_image(mf.resolve_path(df, row["path"]))
            masks = row_masks(row, kinds) if (overlay_first and c == 0) else None
            extra = f" sev {float(row['severity']):.1f}" if str(row.get("severity", "")) not in ("", "nan") and label != "normal" else ""
            show_with_masks(ax, image, masks, title=f"{label}{extra}\n{row['image_id']} {row.get('view', '')}")
    handles = [plt.Line2D([], [], color=MASK_COLORS[k], label=k) for k in kinds]
    fig.legend(handles=handles, loc="lower center", ncol=len(kinds), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Save a figure atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    atomic_write(path, lambda handle: fig.savefig(handle, format=path.suffix.lstrip(".") or "png",
                                                  dpi=dpi, bbox_inches="tight"))
    return path


def count_table(df: pd.DataFrame, index: str, columns: str, order: Sequence[str] | None = None) -> pd.DataFrame:
    """Cross-tabulation with margins, rows in ``order`` when given (e.g. class x split)."""
    table = pd.crosstab(df[index], df[columns], margins=True, margins_name="total")
    if order is not None:
        present = [o for o in order if o in table.index]
        table = table.loc[present + ["total"]]
    return table
