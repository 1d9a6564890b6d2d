"""Figures and an ipywidgets viewer for lung segmentation (notebook 02)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch, Rectangle

from cxrlib.data import manifest as mf
from cxrlib.data.io import read_image
from cxrlib.data.masks import LUNG_LEFT, LUNG_RIGHT, LungPatchSampler
from cxrlib.stages.lung_segmentation import (
    CROP_COLUMN,
    ERROR_CLASSES,
    MASKED_COLUMN,
    PRED_MASK_COLUMN,
    SegmentationEvaluation,
    error_categories,
    read_label_map,
)
from cxrlib.viz.figures import CLASS_ORDER, show_with_masks

#: Contour colours (Okabe-Ito): the reference in green, the prediction in vermilion.
TRUTH_COLOR, PRED_COLOR = "#009E73", "#D55E00"
#: Colours of the :data:`cxrlib.stages.lung_segmentation.ERROR_CLASSES` codes, in code order.
ERROR_COLORS = ("#000000", "#7f7f7f", "#E69F00", "#0072B2", "#CC79A7")


def _lungs(labels: np.ndarray) -> dict[str, np.ndarray]:
    return {"left": labels == LUNG_LEFT, "right": labels == LUNG_RIGHT}


def show_overlay(ax, image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray | None,
                 title: str = "", linewidth: float = 1.0) -> None:
    """Image with the reference lungs (green) and the predicted lungs (vermilion) as contours."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    for labels, color in ((truth, TRUTH_COLOR), (pred, PRED_COLOR)):
        if labels is None:
            continue
        for mask in _lungs(labels).values():
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=linewidth)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _overlay_legend(fig) -> None:
    handles = [plt.Line2D([], [], color=TRUTH_COLOR, label="reference"),
               plt.Line2D([], [], color=PRED_COLOR, label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)


def learning_curves(history: pd.DataFrame):
    """Training loss and validation Dice per epoch; the chosen (best validation) epoch is marked."""
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.4))
    for column, name in (("train_loss", "total"), ("train_ce", "cross-entropy"),
                         ("train_dice_loss", "1 - soft Dice")):
        if column in history:
            ax_loss.plot(history["epoch"], history[column], marker="o", ms=3, label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_loss.legend(fontsize=8)
    for column, name in (("val_dice", "mean of both lungs"), ("val_dice_lung_left", "left lung"),
                         ("val_dice_lung_right", "right lung")):
        if column in history:
            ax_dice.plot(history["epoch"], history[column], marker="o", ms=3, label=name)
    if "val_dice" in history and len(history):
        best = history.loc[history["val_dice"].idxmax()]
        ax_dice.axvline(best["epoch"], color="grey", ls=":", lw=1)
        ax_dice.annotate(f"chosen: epoch {int(best['epoch'])}\nval Dice {best['val_dice']:.3f}",
                         (best["epoch"], best["val_dice"]), textcoords="offset points",
                         xytext=(-12, -45), ha="right", fontsize=8,
                         arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.8})
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="validation Dice (selects the checkpoint)")
    ax_dice.legend(fontsize=8, loc="lower right")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        if len(history) and history["epoch"].max() <= 20:
            ax.set_xticks(history["epoch"])
    fig.tight_layout()
    return fig


def _best_worst_grid(ranked: pd.DataFrame, k: int, draw) -> plt.Figure:
    """Top row: the ``k`` best rows of ``ranked`` (sorted worst first), best first; bottom row: the
    ``k`` worst. ``draw(ax, row, name)`` draws one image; empty cells are hidden."""
    k = max(1, min(k, len(ranked)))
    picks = {"best": ranked.tail(k).iloc[::-1], "worst": ranked.head(k)}
    fig, axes = plt.subplots(2, k, figsize=(2.6 * k, 6.3), squeeze=False)
    for row, (name, table) in enumerate(picks.items()):
        for col in range(k):
            if col >= len(table):
                axes[row, col].set_axis_off()
                continue
            draw(axes[row, col], table.iloc[col], name)
    _overlay_legend(fig)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def best_worst_gallery(evaluation: SegmentationEvaluation, k: int = 4, variant: str = "post"):
    """Top row: the ``k`` test images with the highest Dice (both lungs); bottom row: the lowest."""
    def draw(ax, item, name):
        index = int(item["index"])
        show_overlay(ax, evaluation.images[index], evaluation.truth[index], evaluation.pred[variant][index],
                     title=f"{name}: {item['image_id']}\n{item['label']}  Dice {item['dice_lungs']:.3f}")

    return _best_worst_grid(evaluation.ranked(variant), k, draw)


def predictions_by_class(df: pd.DataFrame, *, n_per_class: int = 3, seed: int = 0,
                         classes: Sequence[str] = CLASS_ORDER):
    """Per class, images of a segmented manifest: predicted lungs, lung crop, lungs only.

    ``df`` is the manifest :func:`cxrlib.stages.lung_segmentation.segment_manifest` returns (absolute
    paths to the written files). Images come from distinct patients, drawn with ``seed``.
    """
    present = [c for c in classes if (df["label"] == c).any()] or sorted(df["label"].unique())
    columns = ("prediction", "lung crop", "lungs only")
    fig, axes = plt.subplots(len(present), 3 * n_per_class,
                             figsize=(1.9 * 3 * n_per_class, 2.2 * len(present)), squeeze=False)
    for r, label in enumerate(present):
        rows = (df[df["label"] == label].drop_duplicates("patient_id")
                .sample(frac=1.0, random_state=seed).head(n_per_class))
        for i in range(n_per_class):
            cells = axes[r, 3 * i:3 * i + 3]
            if i >= len(rows):
                for ax in cells:
                    ax.set_axis_off()
                continue
            row = rows.iloc[i]
            image = read_image(mf.resolve_path(df, row["path"]))
            labels = read_label_map(mf.resolve_path(df, row[PRED_MASK_COLUMN]))
            show_overlay(cells[0], image, None, labels, title=f"{label}\n{row['image_id']}")
            show_with_masks(cells[1], read_image(mf.resolve_path(df, row[CROP_COLUMN])), None,
                            title=columns[1])
            show_with_masks(cells[2], read_image(mf.resolve_path(df, row[MASKED_COLUMN])), None,
                            title=columns[2])
    fig.tight_layout()
    return fig


def patch_sampler_figure(image: np.ndarray, lung_mask: np.ndarray, sampler: LungPatchSampler,
                         k: int = 12, seed: int = 0, title: str = ""):
    """Left: the image with ``k`` sampled patches outlined; right: the patches themselves."""
    patches, centres = sampler.sample(image, lung_mask, k, np.random.default_rng(seed))
    side = patches.shape[1]
    n_cols = int(np.ceil(np.sqrt(k)))
    n_rows = int(np.ceil(k / n_cols))
    fig = plt.figure(figsize=(4.2 + 1.3 * n_cols, max(4.2, 1.3 * n_rows)))
    grid = fig.add_gridspec(n_rows, 1 + n_cols, width_ratios=[3.2] + [1] * n_cols)
    ax = fig.add_subplot(grid[:, 0])
    show_with_masks(ax, image, {"lung": lung_mask}, title=title or f"{k} patches of {side}x{side} px")
    for row, col in centres:
        ax.add_patch(Rectangle((col - side // 2 - 0.5, row - side // 2 - 0.5), side, side,
                               fill=False, edgecolor="#F0E442", linewidth=0.8))
        ax.plot(col, row, "+", color="#F0E442", ms=4)
    for index, patch in enumerate(patches):
        sub = fig.add_subplot(grid[index // n_cols, 1 + index % n_cols])
        sub.imshow(patch, cmap="gray", vmin=0, vmax=255)
        sub.set_axis_off()
    fig.tight_layout()
    return fig


def _error_image(ax, truth: np.ndarray, pred: np.ndarray, title: str) -> None:
    ax.imshow(error_categories(truth, pred), cmap=ListedColormap(ERROR_COLORS), vmin=-0.5,
              vmax=len(ERROR_COLORS) - 0.5, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _label_image(ax, labels: np.ndarray, title: str) -> None:
    ax.imshow(labels, cmap=ListedColormap(["#000000", "#56B4E9", "#0072B2", "#E69F00"]), vmin=-0.5,
              vmax=3.5, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def error_legend(fig) -> None:
    """Legend of the error-map colours at the bottom of ``fig``."""
    handles = [Patch(color=color, label=ERROR_CLASSES[code]) for code, color in enumerate(ERROR_COLORS)]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)


def case_figure(evaluation: SegmentationEvaluation, index: int, variant: str = "post"):
    """One test image: image, reference labels, predicted labels and the error map."""
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.6))
    table = evaluation.per_image[variant].iloc[index]
    show_overlay(axes[0], evaluation.images[index], None, None,
                 title=f"{table['image_id']} ({table['label']})")
    _label_image(axes[1], evaluation.truth[index], "reference (light: left lung)")
    _label_image(axes[2], evaluation.pred[variant][index], f"prediction ({variant})")
    _error_image(axes[3], evaluation.truth[index], evaluation.pred[variant][index],
                 f"errors: Dice {table['dice_lungs']:.3f}, HD95 {table['hd95_lungs']:.1f} px")
    error_legend(fig)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def segmentation_viewer(evaluation: SegmentationEvaluation):
    """Step through the test images, worst Dice first: image, reference, prediction, error map.

    A toggle switches between the raw network output and the post-processed masks.
    Returns the widget (display it as the last expression of a cell).
    """
    import ipywidgets as widgets

    variant = widgets.ToggleButtons(options=[("post-processed", "post"), ("raw", "raw")], value="post")
    order = widgets.ToggleButtons(options=["worst first", "best first"], value="worst first")
    position = widgets.IntSlider(min=0, max=max(evaluation.n_images - 1, 0), description="rank")
    out = widgets.Output()

    def redraw(*_):
        ranked = evaluation.ranked(variant.value)
        if order.value == "best first":
            ranked = ranked.iloc[::-1]
        with out:
            out.clear_output(wait=True)
            if ranked.empty:
                print("no test image")
                return
            index = int(ranked.iloc[min(position.value, len(ranked) - 1)]["index"])
            case_figure(evaluation, index, variant.value)
            plt.show()

    for control in (variant, order, position):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([variant, order]), position, out])


# ----------------------------------------------------------------------------- diseased lungs


def qc_failure_gallery(df: pd.DataFrame, qc: pd.DataFrame, *, max_images: int = 24, columns: int = 6,
                       column: str = PRED_MASK_COLUMN):
    """The images that fail mask quality control, with their predicted lungs and the reason.

    ``df``: a segmented manifest (:func:`cxrlib.stages.lung_segmentation.segment_manifest`);
    ``qc``: :func:`cxrlib.stages.lung_segmentation.qc_manifest` of it. Shows up to
    ``max_images`` failures (the title says how many there are in all); with none, a
    figure that says so.
    """
    failed = qc[~qc["qc_pass"].astype(bool)]
    shown = failed.head(max_images)
    count = max(1, len(shown))
    columns = max(1, min(columns, count))
    rows = int(np.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.8 * rows), squeeze=False)
    by_id = df.set_index("image_id")
    for ax in axes.ravel():
        ax.set_axis_off()
    if failed.empty:
        axes[0, 0].text(0.5, 0.5, f"all {len(qc)} masks pass", ha="center", va="center")
    for ax, item in zip(axes.ravel(), shown.itertuples(), strict=False):
        row = by_id.loc[item.image_id]
        image = read_image(mf.resolve_path(df, row["path"]))
        labels = read_label_map(mf.resolve_path(df, row[column]))
        if labels.shape != image.shape:
            from cxrlib.data.transforms import resize_image

            image = resize_image(image, labels.shape)
        reason = "\n".join(_wrap(str(item.qc_reason), 34))
        show_overlay(ax, image, None, labels, title=f"{_short(item.image_id)}\n{reason}")
    fig.suptitle(f"mask quality control: {len(failed)} of {len(qc)} images fail"
                 + (f" ({len(shown)} shown)" if len(shown) < len(failed) else ""), fontsize=10)
    fig.tight_layout()
    return fig


def _short(name: object, width: int = 30) -> str:
    """A long image id cut in the middle, so that titles of neighbouring panels do not overlap."""
    text = str(name)
    return text if len(text) <= width else f"{text[:width // 2 - 1]}...{text[-(width // 2 - 2):]}"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def dice_by_burden_figure(evaluation, *, metric: str = "dice_lungs", by_burden: pd.DataFrame | None = None):
    """Dice (or ``metric``) per image against lesion burden, one colour per convention, with the
    binned means and their 95% intervals (:meth:`ConventionEvaluation.by_burden`).

    ``evaluation``: a :class:`cxrlib.stages.lung_segmentation.ConventionEvaluation`; images
    without lesion masks are left out.
    """
    table = evaluation.per_image[evaluation.per_image["lesion_burden"].notna()]
    binned = evaluation.by_burden(metrics=(metric,)) if by_burden is None else by_burden
    colours = {"anatomical": "#0072B2", "visible": "#E69F00"}
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    for convention, rows in table.groupby("convention"):
        colour = colours.get(convention, "#7f7f7f")
        ax.scatter(100 * rows["lesion_burden"], rows[metric], s=14, alpha=0.6, color=colour,
                   label=f"{convention} lungs (per image)")
        bins = binned[(binned["convention"] == convention) & (binned["n_images"] > 0)]
        centres = 100 * (bins["burden_low"] + bins["burden_high"]) / 2
        ax.errorbar(centres, bins[f"{metric}_mean"],
                    yerr=[bins[f"{metric}_mean"] - bins[f"{metric}_low"],
                          bins[f"{metric}_high"] - bins[f"{metric}_mean"]],
                    fmt="s-", color=colour, capsize=3, label=f"{convention}: bin mean, 95% CI")
    ax.set_xlabel("lesion burden (% of the lung under ground glass or consolidation)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.legend(fontsize=7, frameon=False, loc="lower left")
    ax.set_title("segmentation quality against lesion burden", fontsize=10)
    fig.tight_layout()
    return fig


def convention_gallery(evaluation, k: int = 4, convention: str = "anatomical"):
    """Best (top) and worst (bottom) ``k`` images under one convention: the reference as drawn
    (green), the prediction (vermilion) and the cardiomediastinum (dashed), whose removal
    turns anatomical into visible lungs."""
    positions = {image_id: i for i, image_id in enumerate(evaluation.per_image
                                                           .drop_duplicates("image_id")["image_id"])}

    def draw(ax, item, name):
        index = positions[item["image_id"]]
        show_overlay(ax, evaluation.images[index], evaluation.truth[index], evaluation.pred[convention][index],
                     title=f"{name}: {_short(item['image_id'])}\n{convention} Dice {item['dice_lungs']:.3f}")
        heart = evaluation.cardiomediastinum[index]
        if heart is not None and heart.any():
            ax.contour(heart.astype(float), levels=[0.5], colors=["#56B4E9"], linewidths=0.8, linestyles="dashed")

    return _best_worst_grid(evaluation.ranked(convention), k, draw)
