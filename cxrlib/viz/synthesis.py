"""Figures and widgets of the CycleGAN synthesis stage (notebook 03)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from cxrlib.stages.cyclegan import blend


def loss_curves(histories: Mapping[str, pd.DataFrame]):
    """Per translator: adversarial, cycle and identity losses (generator side) and the
    discriminator losses per epoch (``history`` of :func:`cxrlib.train.cyclegan.train_cyclegan`)."""
    fig, axes = plt.subplots(1, len(histories), figsize=(5.2 * len(histories), 3.4), squeeze=False)
    for ax, (name, history) in zip(axes[0], histories.items(), strict=True):
        for column, label in (("adv_AB", "adversarial A->B"), ("adv_BA", "adversarial B->A"),
                              ("cycle_A", "cycle A"), ("cycle_B", "cycle B"), ("idt_A", "identity A"),
                              ("idt_B", "identity B"), ("D_A", "D_A"), ("D_B", "D_B")):
            if column in history and len(history):
                ax.plot(history["epoch"], history[column], marker="o", ms=3, label=label,
                        ls="--" if column.startswith("D_") else "-")
        ax.set(xlabel="epoch", ylabel="mean loss", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def samples_figure(rows: Sequence[tuple[str, np.ndarray]], *, n: int | None = None):
    """A grid of image rows: ``rows`` = ``[(row title, (K, H, W) uint8), ...]``, one column per image."""
    count = min(len(images) for _, images in rows) if n is None else n
    fig, axes = plt.subplots(len(rows), count, figsize=(1.6 * count, 1.7 * len(rows)), squeeze=False)
    for r, (title, images) in enumerate(rows):
        for c in range(count):
            ax = axes[r, c]
            ax.imshow(images[c], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    return fig


def difference_map(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """``after - before`` in grey levels, float ``(H, W)`` (positive: density added)."""
    return after.astype(np.float64) - before.astype(np.float64)


def before_after_slider(sources: Mapping[str, np.ndarray], translations: Mapping[str, np.ndarray],
                        image_ids: Mapping[str, Sequence[str]], lung_masks: Mapping[str, np.ndarray] | None = None):
    """Pick a translator and an image; a slider blends source (0) into translation (1), next to
    the difference map (red: density added, blue: removed; lung outline when masks are given).

    All arrays are ``(N, H, W)`` (uint8 images, bool masks) per translator name. Returns the widget.
    """
    import ipywidgets as widgets

    names = list(sources)
    which = widgets.Dropdown(options=names, description="translator")
    index = widgets.IntSlider(min=0, max=max(len(sources[names[0]]) - 1, 0), description="image")
    alpha = widgets.FloatSlider(min=0.0, max=1.0, step=0.05, value=1.0, description="source->translated")
    out = widgets.Output()

    def redraw(*_):
        name = which.value
        index.max = max(len(sources[name]) - 1, 0)
        i = min(index.value, index.max)
        before, after = sources[name][i], translations[name][i]
        with out:
            out.clear_output(wait=True)
            fig, (ax_image, ax_diff) = plt.subplots(1, 2, figsize=(8, 4))
            ax_image.imshow(blend(before, after, alpha.value), cmap="gray", vmin=0, vmax=255)
            ax_image.set_title(f"{image_ids[name][i]}: {alpha.value:.2f} translated", fontsize=9)
            diff = difference_map(before, after)
            limit = max(np.abs(diff).max(), 1.0)
            shown = ax_diff.imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit)
            if lung_masks is not None:
                ax_diff.contour(lung_masks[name][i], levels=[0.5], colors="k", linewidths=0.8)
            ax_diff.set_title("translated - source (grey levels)", fontsize=9)
            fig.colorbar(shown, ax=ax_diff, fraction=0.046)
            for ax in (ax_image, ax_diff):
                ax.set_xticks([])
                ax.set_yticks([])
            plt.show()

    for control in (which, index, alpha):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([which, index]), alpha, out])
