"""Figures and the reader-study app of notebook 06 (diffusion synthesis, text removal, reader study)."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def _blank(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def samples_with_neighbours(samples: Mapping[str, np.ndarray], neighbours: Mapping[str, np.ndarray],
                            distances: Mapping[str, np.ndarray] | None = None, *, n: int = 6,
                            threshold: float | None = None):
    """Per class two rows: ``n`` samples, and under each its nearest training image.

    ``samples`` / ``neighbours``: ``{class: (K, H, W) uint8}`` (row i of ``neighbours`` is the
    nearest training image of sample i); ``distances``: ``{class: (K,)}`` shown under each
    pair, red when below ``threshold`` (a possible copy). Returns the figure.
    """
    classes = [name for name in samples if len(samples[name])]
    count = min(n, *(len(samples[name]) for name in classes)) if classes else 0
    fig, axes = plt.subplots(2 * len(classes), max(count, 1), figsize=(1.5 * max(count, 1), 3.1 * len(classes)),
                             squeeze=False)
    for r, name in enumerate(classes):
        for c in range(count):
            top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
            top.imshow(samples[name][c], cmap="gray", vmin=0, vmax=255)
            bottom.imshow(neighbours[name][c], cmap="gray", vmin=0, vmax=255)
            _blank(top)
            _blank(bottom)
            if distances is not None:
                value = float(distances[name][c])
                copy = threshold is not None and value < threshold
                bottom.set_xlabel(f"d={value:.2f}" + (" copy?" if copy else ""), fontsize=7,
                                  color="red" if copy else "black")
        axes[2 * r, 0].set_ylabel(f"{name}\nsample", fontsize=8)
        axes[2 * r + 1, 0].set_ylabel("nearest\ntraining", fontsize=8)
    fig.tight_layout()
    return fig


def closest_pairs(samples: np.ndarray, train_images: np.ndarray, distances: np.ndarray, indices: np.ndarray, *,
                  k: int = 8, threshold: float | None = None, title: str = ""):
    """The ``k`` samples closest to a training image, each above its neighbour (memorisation check).

    ``samples``: ``(N, H, W)``; ``train_images``: ``(M, H, W)``; ``distances`` / ``indices``:
    ``(N,)`` nearest-training distance and index of each sample. Returns the figure.
    """
    order = np.argsort(distances)[:k]
    fig, axes = plt.subplots(2, max(len(order), 1), figsize=(1.5 * max(len(order), 1), 3.3), squeeze=False)
    for c, i in enumerate(order):
        axes[0, c].imshow(samples[i], cmap="gray", vmin=0, vmax=255)
        axes[1, c].imshow(train_images[indices[i]], cmap="gray", vmin=0, vmax=255)
        copy = threshold is not None and distances[i] < threshold
        axes[1, c].set_xlabel(f"d={distances[i]:.2f}", fontsize=7, color="red" if copy else "black")
        _blank(axes[0, c])
        _blank(axes[1, c])
    axes[0, 0].set_ylabel("sample", fontsize=8)
    axes[1, 0].set_ylabel("nearest\ntraining", fontsize=8)
    fig.suptitle(title or "closest sample / training pairs", fontsize=9)
    fig.tight_layout()
    return fig


def text_removal_figure(columns: Sequence[tuple[str, np.ndarray]], *, n: int = 4,
                        crops: Sequence[tuple[slice, slice]] | None = None):
    """Rows = images, columns = versions (``[(title, (N, H, W) uint8 or bool), ...]``, e.g. with
    text, predicted mask, Telea, diffusion, text-free twin). ``crops``: one ``(rows, cols)``
    window per image to zoom into the text. Returns the figure."""
    count = min(n, *(len(images) for _, images in columns))
    fig, axes = plt.subplots(count, len(columns), figsize=(2.2 * len(columns), 2.2 * count), squeeze=False)
    for r in range(count):
        for c, (title, images) in enumerate(columns):
            image = images[r]
            if crops is not None:
                image = image[crops[r]]
            if image.dtype == bool:
                axes[r, c].imshow(image, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            else:
                axes[r, c].imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            _blank(axes[r, c])
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def text_window(mask: np.ndarray, size: int = 96) -> tuple[slice, slice]:
    """A ``size x size`` window around the largest cluster of text pixels of a ``(H, W)`` mask
    (the image centre when there is none)."""
    height, width = mask.shape
    size = min(size, height, width)
    if mask.any():
        ys, xs = np.nonzero(mask)
        cy, cx = int(np.median(ys)), int(np.median(xs))
    else:
        cy, cx = height // 2, width // 2
    top = int(np.clip(cy - size // 2, 0, height - size))
    left = int(np.clip(cx - size // 2, 0, width - size))
    return slice(top, top + size), slice(left, left + size)


def reader_scores_figure(table: pd.DataFrame, paper: Mapping[str, float] | None = None):
    """Accuracy / sensitivity / specificity with 95% intervals per reader (``score_table`` rows),
    with the published radiologists' values as dashed lines when ``paper`` is given."""
    measures = ("accuracy", "sensitivity", "specificity")
    fig, ax = plt.subplots(figsize=(1.9 * len(measures) + 1.5, 3.2))
    width = 0.8 / max(len(table), 1)
    for i, row in enumerate(table.to_dict("records")):
        x = np.arange(len(measures)) + (i - (len(table) - 1) / 2) * width
        values = np.array([row[m] for m in measures], dtype=float)
        low = values - np.array([row[f"{m}_low"] for m in measures], dtype=float)
        high = np.array([row[f"{m}_high"] for m in measures], dtype=float) - values
        ax.bar(x, values, width, yerr=[low, high], capsize=3, label=str(row["reader"]))
    for j, m in enumerate(measures):
        if paper and m in paper:
            ax.hlines(paper[m], j - 0.45, j + 0.45, colors="k", linestyles="--", linewidth=1)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(np.arange(len(measures)), measures)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate (95% Wilson CI)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("reader study" + (" (dashed: published radiologists)" if paper else ""), fontsize=9)
    fig.tight_layout()
    return fig


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def reader_app(session, load_image: Callable[[dict], np.ndarray], *, classes: Sequence[str] = ("normal", "pneumonia",
               "covid"), ask_class: bool = True, ask_confidence: bool = True):
    """The reader-study app: one image at a time, buttons *real* / *synthetic*, scores at the end.

    ``session``: a :class:`cxrlib.reader_study.ReaderSession` (resumes where its file stops);
    ``load_image(trial)``: the ``(H, W)`` uint8 image to show for a sequence row (every image
    at the same display size, so size does not give the answer away). Each click appends
    the answer to the session's CSV before the next image appears. Optional class and
    confidence (1 guess .. 5 certain) are recorded with it. Returns the widget.
    """
    import ipywidgets as widgets

    from cxrlib.reader_study import score_table

    picture = widgets.Image(format="png", width=384, height=384)
    real_button = widgets.Button(description="real", button_style="success", icon="check")
    synthetic_button = widgets.Button(description="synthetic", button_style="danger", icon="magic")
    class_choice = widgets.ToggleButtons(options=["(no answer)", *classes], description="class")
    confidence = widgets.IntSlider(value=3, min=1, max=5, description="confidence")
    progress = widgets.IntProgress(min=0, max=len(session), value=session.n_answered)
    status = widgets.Label()
    scores = widgets.HTML()  # the reader's own scores once the sequence is done

    def show() -> None:
        trial = session.current()
        progress.value = session.n_answered
        if trial is None:
            real_button.disabled = synthetic_button.disabled = True
            status.value = f"done: {session.n_answered} answers saved to {session.path}"
            table = score_table(session.answers)
            scores.value = table[[c for c in table.columns if c != "n"]].round(2).T.to_html(header=False)
            return
        picture.value = _png_bytes(load_image(trial))
        status.value = f"image {trial['trial']} of {len(session)}" + (" (resumed session)" if session.resumed else "")
        class_choice.value = "(no answer)"
        session.mark_shown()

    def on_click(answer: str):
        def handler(_button) -> None:
            chosen = class_choice.value if ask_class and class_choice.value != "(no answer)" else None
            session.answer(answer, class_answer=chosen, confidence=confidence.value if ask_confidence else None)
            show()
        return handler

    real_button.on_click(on_click("real"))
    synthetic_button.on_click(on_click("synthetic"))
    show()
    controls = [widgets.HBox([real_button, synthetic_button])]
    if ask_class:
        controls.append(class_choice)
    if ask_confidence:
        controls.append(confidence)
    return widgets.VBox([picture, *controls, widgets.HBox([progress, status]), scores])
