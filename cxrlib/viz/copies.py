"""Figures of copy-detector pairs (:mod:`cxrlib.data.copies`): the pairs nearest the
decision boundary, or any sample of pairs, side by side with their evidence."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from cxrlib.data.io import ImageReadError, read_image
from cxrlib.runs import atomic_write


def nearest_boundary(pairs: pd.DataFrame, threshold: float, n: int = 12) -> pd.DataFrame:
    """The ``n`` aligned pairs whose ``score`` is closest to ``threshold``, half from each side
    where there are enough, sorted by score (highest first)."""
    aligned = pairs[pairs["aligned"].astype(bool)] if "aligned" in pairs else pairs
    ranked = aligned.loc[(aligned["score"] - threshold).abs().sort_values(kind="stable").index]
    above, below = ranked[ranked["score"] >= threshold], ranked[ranked["score"] < threshold]
    n_above = min(len(above), max(n - len(below), n // 2))
    chosen = pd.concat([above.head(n_above), below.head(n - n_above)])
    return chosen.sort_values("score", ascending=False)


def _thumbnail(path: str) -> np.ndarray | None:
    try:
        return read_image(path)
    except (ImageReadError, ValueError):
        return None


def plot_pairs(pairs: pd.DataFrame, *, title: str = "", columns: int = 3,
               out: str | os.PathLike | None = None) -> plt.Figure:
    """Each row of ``pairs`` (``path_first``, ``path_second``, ``score``, ``copy`` and the
    evidence columns) as the two images side by side, captioned with the decision.

    Paths must be readable as given (absolute, or relative to the working folder). With
    ``out``, the figure is also saved there (PNG, atomically).
    """
    rows = max(1, -(-len(pairs) // columns))
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(4.2 * columns, 2.4 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for number, row in enumerate(pairs.itertuples(index=False)):
        line, place = divmod(number, columns)
        left, right = axes[line, 2 * place], axes[line, 2 * place + 1]
        for axis, path in ((left, row.path_first), (right, row.path_second)):
            image = _thumbnail(str(path))
            if image is not None:
                axis.imshow(image, cmap="gray")
            axis.set_title(Path(str(path)).name[:22], fontsize=7)
        verdict = "COPY" if bool(row.copy) else "not a copy"
        extra = f", rot {row.rotation_deg:.0f}°, scale {row.scale:.2f}" if hasattr(row, "rotation_deg") else ""
        left.text(1.0, -0.08, f"{verdict}: score {row.score:.2f}{extra}", transform=left.transAxes,
                  ha="center", va="top", fontsize=8, color="#D55E00" if bool(row.copy) else "#0072B2")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    if out is not None:
        atomic_write(Path(out), lambda stream: figure.savefig(stream, format="png", dpi=110))
    return figure


def plot_boundary_pairs(pairs: pd.DataFrame, threshold: float, n: int = 12, *,
                        out: str | os.PathLike | None = None) -> plt.Figure:
    """The ``n`` examined pairs nearest the decision ``threshold`` (:func:`nearest_boundary`),
    drawn by :func:`plot_pairs`: where a wrong decision would show first."""
    chosen = nearest_boundary(pairs, threshold, n)
    return plot_pairs(chosen, title=f"{len(chosen)} pairs nearest the copy threshold {threshold:.2f}",
                      out=out)
