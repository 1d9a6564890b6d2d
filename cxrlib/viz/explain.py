"""Figures and the explorer of notebook 05 (UMAP maps, CAM galleries, saliency tables)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from cxrlib.explain.cam import overlay_cam
from cxrlib.explain.embed import GROUP_ORDER

#: Okabe-Ito colours for the analysis groups and image makers (colour-blind friendly).
GROUP_COLORS: dict[str, str] = {
    "normal": "#0072B2",
    "pneumonia": "#009E73",
    "real covid": "#D55E00",
    "synthetic covid": "#CC79A7",
    "real": "#7F7F7F",
    "G_NC": "#E69F00",
    "G_PC": "#56B4E9",
}
_OTHER_COLORS = ("#E69F00", "#56B4E9", "#F0E442", "#000000", "#999999")

METHOD_TITLES: dict[str, str] = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "eigencam": "EigenCAM",
                                 "scorecam": "ScoreCAM"}


def _colours(values: pd.Series) -> dict[str, str]:
    names = [g for g in GROUP_ORDER if g in set(values)] + sorted(set(values) - set(GROUP_ORDER))
    spare = iter(_OTHER_COLORS * 4)
    return {name: GROUP_COLORS.get(name) or next(spare) for name in names}


def embedding_figure(coords: np.ndarray, frame: pd.DataFrame, columns: Sequence[str], *, title: str = "",
                     point_size: float = 9.0):
    """One scatter panel per column of ``frame`` (e.g. group, made_by, site, split), points coloured by it.

    ``coords``: ``(N, 2)`` (UMAP or PCA) in the row order of ``frame``. Synthetic rows
    (``made_by`` not ``real``, when present) are drawn as crosses in every panel.
    """
    columns = [c for c in columns if c in frame.columns]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 4.2), squeeze=False)
    synthetic = (frame["made_by"] != "real").to_numpy() if "made_by" in frame.columns else np.zeros(len(frame), bool)
    for ax, column in zip(axes[0], columns, strict=True):
        values = frame[column].astype(str)
        labelled: set[str] = set()
        for name, colour in _colours(values).items():
            for fake, marker in ((False, "o"), (True, "x")):
                keep = (values == name).to_numpy() & (synthetic == fake)
                if keep.any():
                    ax.scatter(coords[keep, 0], coords[keep, 1], s=point_size, c=colour, marker=marker,
                               alpha=0.7, linewidths=0.8, label=None if name in labelled else name)
                    labelled.add(name)
        ax.set_title(f"coloured by {column}" + (" (x = synthetic)" if synthetic.any() else ""), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=1.5, loc="best", frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def cam_gallery(display: np.ndarray, maps: Mapping[str, np.ndarray], titles: Sequence[str], *,
                row_labels: Sequence[str] | None = None, image_weight: float = 0.55):
    """Rows = images, columns = the image and one overlay per CAM method (Zunair & Hamza's Figure 4 layout).

    ``display``: ``(N, S, S)`` uint8 images; ``maps``: method -> ``(N, h, w)`` in [0, 1];
    ``titles``: one line per image (id, label, probability).
    """
    methods = list(maps)
    n = len(display)
    fig, axes = plt.subplots(max(n, 1), 1 + len(methods), figsize=(1.9 * (1 + len(methods)), 2.05 * max(n, 1)),
                             squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(display[i], cmap="gray", vmin=0, vmax=255)
        axes[i, 0].set_title(titles[i], fontsize=7)
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i], fontsize=9)
        for j, method in enumerate(methods, start=1):
            axes[i, j].imshow(overlay_cam(display[i], maps[method][i], image_weight=image_weight))
            if i == 0:
                axes[i, j].set_title(METHOD_TITLES.get(method, method), fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if n == 0:
        axes[0, 0].text(0.5, 0.5, "no image", ha="center", va="center")
    fig.tight_layout()
    return fig


_FRACTIONS = ("lung_overlap", "pointing_game", "lesion_energy")


def saliency_figure(summary: pd.DataFrame, metrics: Sequence[str], *, title: str = ""):
    """One bar panel per metric: the mean per method (CAM methods and baselines) with its 95 % interval."""
    metrics = [m for m in metrics if m in summary.columns and summary[m].notna().any()]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(3.6 * max(len(metrics), 1), 3.4), squeeze=False)
    baseline = summary["method"].isin(["random map", "centre prior"]).to_numpy()
    for ax, metric in zip(axes[0], metrics, strict=False):
        estimate = summary[metric].to_numpy(dtype=float)
        error = np.abs(np.vstack([estimate - summary[f"{metric}_low"].to_numpy(dtype=float),
                                  summary[f"{metric}_high"].to_numpy(dtype=float) - estimate]))
        ax.bar(range(len(summary)), estimate, yerr=np.nan_to_num(error), capsize=3,
               color=np.where(baseline, "#BBBBBB", "#0072B2"))
        ax.set_xticks(range(len(summary)), [METHOD_TITLES.get(m, m) for m in summary["method"]], rotation=45,
                      ha="right", fontsize=8)
        ax.set_title(metric.replace("_", " "), fontsize=10)
        if metric in _FRACTIONS:
            ax.set_ylim(0, 1.02)
        else:  # probability changes (ROAD, CAM-multiply): signed and small
            ax.axhline(0, color="black", lw=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def cam_explorer(frame: pd.DataFrame, display: np.ndarray, compute: Callable[[int, str, str, int], np.ndarray], *,
                 methods: Sequence[str], layers: Sequence[str], classes: Sequence[str],
                 coords: np.ndarray | None = None, coords_frame: pd.DataFrame | None = None):
    """Pick an image, CAM method, layer and target class: the image, its CAM and where it lies on the UMAP.

    ``frame``: one row per explorable image (``image_id``, ``label``, optional ``prob``);
    ``display``: its ``(N, S, S)`` uint8 images; ``compute(index, method, layer, class)``
    returns the ``(h, w)`` map. ``coords`` / ``coords_frame``: the 2-D embedding and its
    rows; the chosen image is ringed on it when it is there. Returns the widget.
    """
    import ipywidgets as widgets

    labels = [f"{i}: {row['image_id']} ({row['label']})" for i, row in enumerate(frame.to_dict("records"))]
    image = widgets.Dropdown(options=list(zip(labels, range(len(labels)), strict=True)), description="image")
    index = widgets.IntSlider(min=0, max=max(len(labels) - 1, 0), description="index")
    widgets.jslink((image, "index"), (index, "value"))
    method = widgets.Dropdown(options=[(METHOD_TITLES.get(m, m), m) for m in methods], description="method")
    layer = widgets.Dropdown(options=list(layers), value=list(layers)[-1], description="layer")
    target = widgets.Dropdown(options=list(zip(classes, range(len(classes)), strict=True)),
                              value=len(classes) - 1, description="explain")
    out = widgets.Output()
    position = ({str(i): k for k, i in enumerate(coords_frame["image_id"])} if coords_frame is not None else {})

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            if not labels:
                print("no image to explore")
                return
            k = int(index.value)
            heat = compute(k, method.value, layer.value, int(target.value))
            panels = 3 if coords is not None else 2
            fig, axes = plt.subplots(1, panels, figsize=(4.0 * panels, 4.0))
            axes[0].imshow(display[k], cmap="gray", vmin=0, vmax=255)
            row = frame.iloc[k]
            prob = f", p(covid) {row['prob']:.2f}" if "prob" in row else ""
            axes[0].set_title(f"{row['image_id']} ({row['label']}{prob})", fontsize=9)
            axes[1].imshow(overlay_cam(display[k], heat))
            axes[1].set_title(f"{METHOD_TITLES.get(method.value, method.value)} for '{classes[int(target.value)]}'\n"
                              f"{layer.value}", fontsize=9)
            if coords is not None:
                groups = coords_frame["group"].astype(str)
                for name, colour in _colours(groups).items():
                    keep = (groups == name).to_numpy()
                    axes[2].scatter(coords[keep, 0], coords[keep, 1], s=5, c=colour, alpha=0.5, label=name)
                where = position.get(str(row["image_id"]))
                if where is not None:
                    axes[2].scatter(*coords[where], s=160, facecolors="none", edgecolors="black", linewidths=2)
                axes[2].set_title("UMAP (ringed: this image)" if where is not None else "UMAP (image not embedded)",
                                  fontsize=9)
                axes[2].legend(fontsize=7, frameon=False)
            for ax in axes:
                ax.set_xticks([])
                ax.set_yticks([])
            fig.tight_layout()
            plt.show()

    for control in (index, method, layer, target):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([image, index]), widgets.HBox([method, layer, target]), out])
