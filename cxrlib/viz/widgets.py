"""ipywidgets explorers for JupyterLab (they need a live kernel; papermill just builds them)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import pandas as pd

from cxrlib.data import manifest as mf
from cxrlib.data.io import read_image
from cxrlib.viz.figures import row_masks, show_with_masks


def manifest_browser(df: pd.DataFrame, *,
                     kinds: Sequence[str] = ("lung_left", "lung_right", "heart", "lesion", "text"),
                     filters: Sequence[str] = ("label", "site", "split")):
    """Browse a manifest: filter by class / site / split, step through images with their masks.

    Returns the widget (display it as the last expression of a cell).
    """
    import ipywidgets as widgets

    filters = [f for f in filters if f in df.columns]
    dropdowns = {f: widgets.Dropdown(options=["(all)"] + sorted(df[f].astype(str).unique()),
                                     description=f) for f in filters}
    show_masks = widgets.ToggleButtons(options=["masks", "image only"], value="masks")
    index = widgets.IntSlider(min=0, max=max(len(df) - 1, 0), description="image")
    out = widgets.Output()

    def selection() -> pd.DataFrame:
        keep = pd.Series(True, index=df.index)
        for name, dd in dropdowns.items():
            if dd.value != "(all)":
                keep &= df[name].astype(str) == dd.value
        return df[keep]

    def redraw(*_):
        rows = selection()
        index.max = max(len(rows) - 1, 0)
        with out:
            out.clear_output(wait=True)
            if rows.empty:
                print("no image matches these filters")
                return
            row = rows.iloc[min(index.value, len(rows) - 1)]
            image = read_image(mf.resolve_path(df, row["path"]))
            masks = row_masks(row, kinds) if show_masks.value == "masks" else None
            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            show_with_masks(ax, image, masks, title=f"{row['image_id']} ({row['label']})")
            plt.show()
            meta = {k: row[k] for k in row.index if not str(k).startswith("mask") and k != "content_hash"}
            print(pd.Series(meta).to_string())

    for control in [*dropdowns.values(), show_masks, index]:
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox(list(dropdowns.values())), widgets.HBox([index, show_masks]), out])
