"""Figures and an ipywidgets explorer for the classifier experiments (notebook 04).

Inputs are the tables of :mod:`cxrlib.stages.classifiers`: the grid's results (one row per cell),
its long test-prediction table (:func:`~cxrlib.stages.classifiers.read_predictions`) and the
seed-pooled summary (:func:`~cxrlib.stages.classifiers.summarize_over_seeds`).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from cxrlib.evaluate.classification import (
    expected_calibration_error,
    reliability_curve,
    roc_pr_curves,
)
from cxrlib.stages.classifiers import CONDITIONS, POSITIVE, TASKS

#: One colour per condition (Okabe-Ito), used by every figure of notebook 04.
CONDITION_COLORS: dict[str, str] = {
    "real": "#7f7f7f",
    "real_oversample": "#56B4E9",
    "real_gnc": "#E69F00",
    "real_gnc_gpc": "#D55E00",
    "synthetic_only": "#009E73",
}


def _ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


def _title(condition: str) -> str:
    return CONDITIONS[condition].title if condition in CONDITIONS else condition


def sensitivity_figure(summary: pd.DataFrame, *, metric: str = "sensitivity", companion: str | None = "specificity",
                       ylabel: str | None = None):
    """Zunair & Hamza (2021) Fig. 2 layout: COVID-19 sensitivity per architecture and condition.

    ``summary``: :func:`~cxrlib.stages.classifiers.summarize_over_seeds` output. One panel per task
    (columns) and imbalance ratio (rows); within a panel, a group of bars per
    architecture, one bar per condition: the seed-mean with its 95 % interval over test
    patients as the error bar, and the value written in the bar. ``companion`` (when in
    ``summary``): a second metric's seed-mean drawn as a marker on each bar (specificity:
    sensitivity bought with false alarms shows at once).
    """
    rows = summary[summary["metric"] == metric]
    others = summary[summary["metric"] == companion] if companion else summary.iloc[:0]
    tasks = _ordered(rows["task"], list(TASKS))
    imbalances = list(dict.fromkeys(rows["imbalance"]))
    fig, axes = plt.subplots(len(imbalances), len(tasks), figsize=(1.0 + 4.6 * len(tasks), 0.6 + 3.4 * len(imbalances)),
                             squeeze=False, sharey=True)
    conditions = _ordered(rows["condition"], list(CONDITIONS))
    for i, imbalance in enumerate(imbalances):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            panel = rows[(rows["task"] == task) & (rows["imbalance"] == imbalance)]
            archs = list(dict.fromkeys(panel["arch"]))
            width = 0.8 / max(len(conditions), 1)
            for k, condition in enumerate(conditions):
                bars = panel[panel["condition"] == condition].set_index("arch").reindex(archs)
                x = np.arange(len(archs)) - 0.4 + width * (k + 0.5)
                estimate = bars["estimate"].to_numpy(dtype=float)
                error = np.vstack([estimate - bars["low"].to_numpy(dtype=float),
                                   bars["high"].to_numpy(dtype=float) - estimate])
                ax.bar(x, estimate, width * 0.92, yerr=np.nan_to_num(error), capsize=2.5, label=_title(condition),
                       color=CONDITION_COLORS.get(condition, "#333333"), error_kw={"linewidth": 0.9})
                marks = others[(others["task"] == task) & (others["imbalance"] == imbalance)
                               & (others["condition"] == condition)].set_index("arch").reindex(archs)
                if len(marks) and marks["estimate"].notna().any():
                    ax.plot(x, marks["estimate"].to_numpy(dtype=float), "D", color="black", mfc="white", ms=5,
                            label=f"{companion} (mean over seeds)" if k == 0 and i == 0 and j == 0 else None)
                for xi, value in zip(x, estimate, strict=True):
                    if np.isfinite(value):
                        ax.text(xi, 0.02, f"{value:.2f}", ha="center", va="bottom", fontsize=7, rotation=90,
                                color="white")
            ax.set_xticks(np.arange(len(archs)), archs)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{TASKS[task].title if task in TASKS else task} ({imbalance})", fontsize=10)
            if j == 0:
                ax.set_ylabel(ylabel or f"COVID-19 {metric}")
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    order = [n for n, label in enumerate(labels) if not label.startswith(str(companion))]
    order += [n for n in range(len(labels)) if n not in order]  # the marker last
    handles, labels = [handles[n] for n in order], [labels[n] for n in order]
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"COVID-19 {metric} on the test split: mean over seeds, 95% CI over test patients", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return fig


def _selection(predictions: pd.DataFrame, task: str, arch: str, imbalance: str) -> pd.DataFrame:
    return predictions[(predictions["task"] == task) & (predictions["arch"] == arch)
                       & (predictions["imbalance"] == imbalance)]


def roc_pr_figure(predictions: pd.DataFrame, task: str, arch: str, imbalance: str):
    """ROC and precision-recall curves of COVID-19 (vs the rest) per condition, one line per seed.

    The marker on each ROC curve is the operating point of the validation threshold.
    """
    chosen = _selection(predictions, task, arch, imbalance)
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.2))
    prevalence = float("nan")
    for condition in _ordered(chosen["condition"], list(CONDITIONS)):
        color = CONDITION_COLORS.get(condition, "#333333")
        for n, (_, rows) in enumerate(chosen[chosen["condition"] == condition].groupby("seed")):
            positive = (rows["label"] == POSITIVE).astype(int).to_numpy()
            curves = roc_pr_curves(positive, rows["score"].to_numpy())
            prevalence = curves["prevalence"]
            label = _title(condition) if n == 0 else None
            ax_roc.plot(curves["roc"]["fpr"], curves["roc"]["tpr"], color=color, lw=1.1, alpha=0.8, label=label)
            called = rows["called"].astype(bool).to_numpy()
            ax_roc.plot(np.mean(called[positive == 0]), np.mean(called[positive == 1]), "o", color=color, ms=4)
            ax_pr.plot(curves["pr"]["recall"], curves["pr"]["precision"], color=color, lw=1.1, alpha=0.8,
                       label=label)
    ax_roc.plot([0, 1], [0, 1], ":", color="black", lw=0.8)
    ax_roc.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (dots: validation threshold)")
    ax_pr.axhline(prevalence, ls=":", color="black", lw=0.8)
    ax_pr.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="precision-recall (dotted: prevalence)")
    ax_roc.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{TASKS[task].title if task in TASKS else task}, {arch}, {imbalance}: COVID-19 vs rest, test split",
                 fontsize=10)
    fig.tight_layout()
    return fig


def _draw_confusion(ax, rows: pd.DataFrame, classes: Sequence[str], fontsize: float = 10) -> None:
    """Counts of (true ``label``, ``pred``), coloured by the share of their row."""
    table = pd.crosstab(rows["label"], rows["pred"]).reindex(index=classes, columns=classes, fill_value=0).to_numpy()
    share = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (r, c), value in np.ndenumerate(table):
        ax.text(c, r, str(value), ha="center", va="center", fontsize=fontsize,
                color="white" if share[r, c] > 0.5 else "black")


def confusion_figure(predictions: pd.DataFrame, task: str, arch: str, imbalance: str):
    """Confusion matrices per condition on the test split, counts summed over seeds.

    Binary tasks: at the validation threshold; the 3-class task: the argmax class. Cells
    show counts, coloured by the share of their row (per-class recall).
    """
    chosen = _selection(predictions, task, arch, imbalance)
    conditions = _ordered(chosen["condition"], list(CONDITIONS))
    classes = list(TASKS[task].classes) if task in TASKS else sorted(chosen["label"].unique())
    fig, axes = plt.subplots(1, len(conditions), figsize=(2.7 * len(conditions) + 0.5, 3.0), squeeze=False)
    for ax, condition in zip(axes[0], conditions, strict=True):
        rows = chosen[chosen["condition"] == condition]
        _draw_confusion(ax, rows, classes, fontsize=8)
        ax.set_xticks(range(len(classes)), classes, fontsize=7, rotation=30)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_title(f"{_title(condition)}\n({rows['seed'].nunique()} seeds)", fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0][0].set_ylabel("true", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_figure(predictions: pd.DataFrame, task: str, arch: str, imbalance: str, n_bins: int = 10):
    """Reliability diagram of the COVID-19 probability per condition (test images of all seeds pooled).

    The legend gives each condition's expected calibration error (mean over seeds).
    """
    chosen = _selection(predictions, task, arch, imbalance)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], ":", color="black", lw=0.8)
    for condition in _ordered(chosen["condition"], list(CONDITIONS)):
        rows = chosen[chosen["condition"] == condition]
        positive = (rows["label"] == POSITIVE).astype(int).to_numpy()
        curve = reliability_curve(positive, rows["score"].to_numpy(), n_bins)
        curve = curve[curve["count"] > 0]
        ece = np.mean([expected_calibration_error((g["label"] == POSITIVE).astype(int), g["score"], n_bins)
                       for _, g in rows.groupby("seed")])
        ax.plot(curve["mean_predicted"], curve["fraction_positive"], "o-", ms=3,
                color=CONDITION_COLORS.get(condition, "#333333"), label=f"{_title(condition)} (ECE {ece:.2f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted COVID-19 probability", ylabel="observed COVID-19 fraction",
           title=f"calibration, {TASKS[task].title if task in TASKS else task}")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def control_figure(controls: pd.DataFrame, label_column: str, metrics: Sequence[str] = ("auc", "balanced_accuracy"),
                   chance: float = 0.5, title: str = ""):
    """Bars with 95 % intervals of ``metrics`` for each row of a control table (e.g. one per input mode)."""
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(controls), 3.4))
    width = 0.8 / len(metrics)
    x = np.arange(len(controls))
    for k, metric in enumerate(metrics):
        estimate = controls[metric].to_numpy(dtype=float)
        error = np.vstack([estimate - controls[f"{metric}_low"].to_numpy(dtype=float),
                           controls[f"{metric}_high"].to_numpy(dtype=float) - estimate])
        ax.bar(x - 0.4 + width * (k + 0.5), estimate, width * 0.92, yerr=np.nan_to_num(error), capsize=3,
               label=metric.replace("_", " "))
    ax.axhline(chance, ls=":", color="black", lw=0.8)
    ax.set_xticks(x, controls[label_column].astype(str))
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def grid_explorer(results: pd.DataFrame, predictions: pd.DataFrame):
    """Pick task, architecture, condition and imbalance: per-seed metrics, ROC curves and confusion matrix.

    Returns the widget (display it as the last expression of a cell).
    """
    import ipywidgets as widgets
    from IPython.display import display

    def options(column: str, order: Sequence[str] = ()) -> list[str]:
        return _ordered(results[column].astype(str), order)

    task = widgets.Dropdown(options=options("task", list(TASKS)), description="task")
    arch = widgets.Dropdown(options=options("arch"), description="architecture")
    condition = widgets.Dropdown(options=options("condition", list(CONDITIONS)), description="condition")
    imbalance = widgets.Dropdown(options=options("imbalance"), description="imbalance")
    out = widgets.Output()
    columns = ["seed", "n_train_covid_real", "n_synthetic", "auc", "sensitivity", "specificity", "ppv",
               "balanced_accuracy", "threshold", "best_epoch", "best_val_auc"]

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            keep = ((results["task"] == task.value) & (results["arch"] == arch.value)
                    & (results["condition"] == condition.value) & (results["imbalance"] == imbalance.value))
            rows = results[keep]
            if rows.empty:
                print("this combination was not run")
                return
            display(rows[[c for c in columns if c in rows.columns]].round(3).set_index("seed"))
            chosen = predictions[(predictions["condition"] == condition.value)]
            fig, (ax_roc, ax_cm) = plt.subplots(1, 2, figsize=(9, 3.8))
            selected = _selection(chosen, task.value, arch.value, imbalance.value)
            for seed, seed_rows in selected.groupby("seed"):
                positive = (seed_rows["label"] == POSITIVE).astype(int).to_numpy()
                curves = roc_pr_curves(positive, seed_rows["score"].to_numpy())
                ax_roc.plot(curves["roc"]["fpr"], curves["roc"]["tpr"], label=f"seed {seed}")
            ax_roc.plot([0, 1], [0, 1], ":", color="black", lw=0.8)
            ax_roc.set(xlabel="1 - specificity", ylabel="sensitivity", title="test ROC per seed")
            ax_roc.legend(fontsize=8)
            classes = list(TASKS[task.value].classes)
            _draw_confusion(ax_cm, selected, classes)
            ax_cm.set_xticks(range(len(classes)), classes)
            ax_cm.set_yticks(range(len(classes)), classes)
            ax_cm.set(xlabel="predicted", ylabel="true", title="confusion matrix (all seeds)")
            fig.tight_layout()
            plt.show()

    for control in (task, arch, condition, imbalance):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([task, arch]), widgets.HBox([condition, imbalance]), out])


#: Marker of each evaluation set in :func:`external_figure` (the internal test split first).
SET_MARKERS: tuple[str, ...] = ("o", "s", "^", "v", "D", "P")


def external_figure(table: pd.DataFrame, *, metrics: Sequence[str] = ("auc", "sensitivity")):
    """Internal test split vs every external cohort, per condition, with the shortcut floor.

    ``table``: :func:`cxrlib.evaluate.external.wide_table` output (one row per task, arch,
    condition, imbalance and ``evaluation_set``; ``floor_auc`` columns when a floor was
    given). One panel per metric (rows) and task (columns); within a panel a group per
    condition (and architecture / imbalance, when there are several), one marker per
    evaluation set: the seed-mean with its 95 % interval. On AUC panels, each set's floor
    (what image statistics reach on that set) is a dashed line in the set's colour with its
    interval shaded. A metric undefined on a set (AUC of a positives-only cohort) is left out.
    """
    rows = table.copy()
    for column in ("arch", "imbalance"):
        if column not in rows.columns:
            rows[column] = ""
    tasks = _ordered(rows["task"], list(TASKS))
    sets = list(dict.fromkeys(["internal", *rows["evaluation_set"].astype(str)]))
    sets = [s for s in sets if (rows["evaluation_set"].astype(str) == s).any()]
    colors = dict(zip(sets, ["#4d4d4d", "#CC79A7", "#0072B2", "#E69F00", "#009E73", "#D55E00"], strict=False))
    metrics = [m for m in metrics if m in rows.columns]
    fig, axes = plt.subplots(len(metrics), len(tasks), figsize=(1.2 + 4.8 * len(tasks), 0.8 + 3.2 * len(metrics)),
                             squeeze=False, sharey=True)
    for j, task in enumerate(tasks):
        panel = rows[rows["task"] == task]
        groups = list(dict.fromkeys(zip(panel["condition"], panel["arch"], panel["imbalance"], strict=True)))
        groups.sort(key=lambda g: (list(CONDITIONS).index(g[0]) if g[0] in CONDITIONS else len(CONDITIONS), g[1:]))
        several = len({g[1:] for g in groups}) > 1
        labels = [_title(g[0]) + (f"\n{g[1]} {g[2]}" if several else "") for g in groups]
        width = 0.7 / max(len(sets), 1)
        for i, metric in enumerate(metrics):
            ax = axes[i][j]
            for k, name in enumerate(sets):
                part = panel[panel["evaluation_set"].astype(str) == name].set_index(["condition", "arch", "imbalance"])
                part = part.reindex(groups)
                estimate = part[metric].to_numpy(dtype=float)
                if not np.isfinite(estimate).any():
                    continue
                x = np.arange(len(groups)) - 0.35 + width * (k + 0.5)
                error = np.vstack([estimate - part[f"{metric}_low"].to_numpy(dtype=float),
                                   part[f"{metric}_high"].to_numpy(dtype=float) - estimate])
                ax.errorbar(x, estimate, yerr=np.nan_to_num(np.clip(error, 0, None)), fmt=SET_MARKERS[k % 6],
                            color=colors.get(name, "#333333"), capsize=3, ms=6, label=name if j == 0 else None)
                floor_column = f"floor_{metric}"
                if floor_column in part.columns and np.isfinite(part[floor_column].to_numpy(dtype=float)).any():
                    floor = part[[floor_column, f"{floor_column}_low", f"{floor_column}_high"]].dropna().iloc[0]
                    ax.axhline(floor[floor_column], color=colors.get(name, "#333333"), ls="--", lw=1,
                               label=f"floor ({name})" if j == 0 else None)
                    ax.axhspan(floor[f"{floor_column}_low"], floor[f"{floor_column}_high"],
                               color=colors.get(name, "#333333"), alpha=0.08)
            if metric == "auc":
                ax.axhline(0.5, color="black", lw=0.6, ls=":")
            ax.set_xticks(np.arange(len(groups)), labels if i == len(metrics) - 1 else [""] * len(groups), fontsize=8)
            ax.set_ylim(-0.02, 1.05)
            ax.set_ylabel(metric if j == 0 else "")
            if i == 0:
                ax.set_title(TASKS[task].title if task in TASKS else task, fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="upper center", ncol=min(len(names), 4), fontsize=8,
                   bbox_to_anchor=(0.5, 1.0 + 0.04 * ((len(names) - 1) // 4 + 1)), frameon=False)
    fig.suptitle("Internal test split vs external cohorts (seed-mean, 95% CI); dashed: image-statistics floor",
                 fontsize=10, y=1.0 + 0.04 * ((len(names) - 1) // 4 + 2) if handles else 1.02)
    fig.tight_layout()
    return fig
