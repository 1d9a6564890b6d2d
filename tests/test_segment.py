"""Notebook 02's library: patient-level row selection, inference on a manifest, test metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cxrlib.data import manifest as mf
from cxrlib.data.io import read_image, read_mask, write_png
from cxrlib.data.masks import LUNG_LEFT, LUNG_RIGHT
from cxrlib.models.unet import UNet
from cxrlib.stages import lung_segmentation as segment

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def lungs(size: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Elliptic (left, right) lung masks of a ``size`` x ``size`` image; left = image right."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    left = ((yy - 0.5) / 0.32) ** 2 + ((xx - 0.7 - shift) / 0.14) ** 2 <= 1
    right = ((yy - 0.5) / 0.32) ** 2 + ((xx - 0.3 - shift) / 0.14) ** 2 <= 1
    return left, right


class OracleNet(nn.Module):
    """Predicts lungs where the image is dark (a stand-in for a trained U-Net)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        dark = (x < 0.4).float()
        on_right = (torch.arange(width, device=x.device) >= width / 2).float().view(1, 1, 1, width)
        background = 1.0 - dark
        return torch.cat([background, dark * on_right, dark * (1 - on_right)], dim=1) * 10 + self.anchor


def write_cohort(folder: Path, n_patients: int = 6, images_per_patient: int = 2, *, per_kind: bool = True,
                 image_size: int = SIZE, mask_size: int = SIZE, split: bool = True) -> pd.DataFrame:
    """Images with dark lungs and their masks (per lung, or one union mask at another size)."""
    rng = np.random.default_rng(0)
    rows = []
    splits = ["train", "train", "train", "val", "test", "test"]
    for patient in range(n_patients):
        for study in range(images_per_patient):
            image_id = f"p{patient}_s{study}"
            left, right = lungs(image_size, shift=rng.uniform(-0.03, 0.03))
            image = np.where(left | right, 50, 200) + rng.normal(0, 8, left.shape)
            row = {"image_id": image_id, "path": f"images/{image_id}.png", "label": ["normal", "covid"][patient % 2],
                   "patient_id": f"p{patient}", "source": "test", "view": "PA",
                   "split": splits[patient % len(splits)] if split else "", "mask_path": "", "origin": "real"}
            write_png(folder / row["path"], np.clip(image, 0, 255).astype(np.uint8))
            mask_left, mask_right = lungs(mask_size)
            if per_kind:
                row["mask_lung_left"] = f"masks/left/{image_id}.png"
                row["mask_lung_right"] = f"masks/right/{image_id}.png"
                write_png(folder / row["mask_lung_left"], mask_left)
                write_png(folder / row["mask_lung_right"], mask_right)
            else:
                row["mask_path"] = f"masks/{image_id}.png"
                write_png(folder / row["mask_path"], mask_left | mask_right)
            rows.append(row)
    return mf.absolute_paths(pd.DataFrame(rows), folder)


# ----------------------------------------------------------------------------- label-map files


def test_label_map_png_round_trip_and_reads_as_union_mask(tmp_path):
    labels = np.zeros((8, 10), dtype=np.uint8)
    labels[1:4, 6:9], labels[1:4, 1:4], labels[6, 5] = LUNG_LEFT, LUNG_RIGHT, 3  # 3: heart
    path = segment.write_label_map(tmp_path / "m.png", labels)
    expected = np.where(labels == 3, 0, labels)
    assert np.array_equal(segment.read_label_map(path), expected)
    assert np.array_equal(read_mask(path), expected > 0)  # any lung is foreground
    assert set(np.unique(read_image(path))) == {0, 128, 255}


def test_file_stems_are_safe_and_distinct():
    assert segment.file_stem("Viral Pneumonia-12") == "Viral Pneumonia-12"
    unsafe = [segment.file_stem(i) for i in ("a/b", "a:b", "a_b", "../x")]
    assert all("/" not in s and ":" not in s and not s.startswith(".") for s in unsafe)
    assert len(set(unsafe)) == len(unsafe)


# ----------------------------------------------------------------------------- row selection


def test_split_manifest_keeps_splits_and_caps_patients(tmp_path):
    manifest = write_cohort(tmp_path, n_patients=12)
    rows = segment.segmentation_splits(manifest)
    assert len(rows) == len(manifest) and rows["path"].tolist() == manifest["path"].tolist()
    capped = segment.segmentation_splits(manifest, n_train_patients=3, n_test_patients=2, seed=1)
    patients = capped.groupby("split")["patient_id"].nunique()
    assert patients["train"] + patients["val"] == 3 and patients["test"] == 2
    assert (capped.groupby("patient_id")["split"].nunique() == 1).all()
    merged = capped.merge(manifest[["image_id", "split"]], on="image_id", suffixes=("", "_before"))
    assert (merged["split"] == merged["split_before"]).all()  # splits are never reassigned


def test_unsplit_manifest_draws_test_then_training_patients(tmp_path):
    manifest = write_cohort(tmp_path, n_patients=20, images_per_patient=1, per_kind=False, split=False)
    rows = segment.segmentation_splits(manifest, n_train_patients=10, n_test_patients=5, val_fraction=0.2, seed=3)
    patients = rows.groupby("split")["patient_id"].nunique().to_dict()
    assert patients == {"train": 8, "val": 2, "test": 5}
    mf.check_leakage(rows)
    again = segment.segmentation_splits(manifest, n_train_patients=10, n_test_patients=5, val_fraction=0.2, seed=3)
    assert rows["split"].tolist() == again["split"].tolist()
    # the test patients do not depend on how many training patients are asked for
    more = segment.segmentation_splits(manifest, n_train_patients=15, n_test_patients=5, val_fraction=0.2, seed=3)
    assert set(more.loc[more["split"] == "test", "image_id"]) == set(rows.loc[rows["split"] == "test", "image_id"])


def test_duplicate_images_keep_their_patients_together(tmp_path):
    manifest = write_cohort(tmp_path, n_patients=10, images_per_patient=1, per_kind=False, split=False)
    manifest["content_hash"] = [f"h{i}" for i in range(10)]
    manifest.loc[manifest["patient_id"].isin(["p1", "p2"]), "content_hash"] = "same"
    for seed in range(5):
        rows = segment.segmentation_splits(manifest, n_test_patients=3, seed=seed)
        assert rows.loc[rows["patient_id"].isin(["p1", "p2"]), "split"].nunique() == 1
        mf.check_leakage(rows)


def test_selection_errors(tmp_path):
    manifest = write_cohort(tmp_path, n_patients=6, images_per_patient=1, per_kind=False, split=False)
    with pytest.raises(ValueError, match="n_test_patients"):
        segment.segmentation_splits(manifest)
    with pytest.raises(ValueError, match="only 6 are available"):
        segment.segmentation_splits(manifest, n_test_patients=7)
    no_masks = manifest.assign(mask_path="")
    with pytest.raises(ValueError, match="lung mask"):
        segment.segmentation_splits(no_masks, n_test_patients=2)


# ----------------------------------------------------------------------------- prediction


def test_predictions_come_back_on_each_requested_grid():
    model = UNet(depth=2, base_channels=4).eval()
    images = [np.zeros((30, 30), np.uint8), np.full((40, 24), 200, np.uint8)]
    maps = segment.predict_label_maps(model, images, input_size=16, batch_size=1, postprocess=False)
    assert [m.shape for m in maps] == [(30, 30), (40, 24)] and all(m.dtype == np.uint8 for m in maps)
    maps = segment.predict_label_maps(model, images, input_size=16, output_shapes=[(8, 8), (12, 10)])
    assert [m.shape for m in maps] == [(8, 8), (12, 10)]
    assert all(set(np.unique(m)) <= {0, 1, 2} for m in maps)
    with pytest.raises(ValueError, match="output shapes"):
        segment.predict_label_maps(model, images, input_size=16, output_shapes=[(8, 8)])


def test_logits_are_resized_before_the_argmax():
    left, right = lungs(64)
    image = np.where(left | right, 40, 210).astype(np.uint8)
    (labels,) = segment.predict_label_maps(OracleNet(), [image], input_size=16, postprocess=False)
    truth = np.where(left, LUNG_LEFT, np.where(right, LUNG_RIGHT, 0))
    agreement = (labels == truth).mean()
    assert labels.shape == (64, 64) and agreement > 0.93


# ----------------------------------------------------------------------------- segmenting a manifest


def test_segment_manifest_writes_masks_and_image_variants(tmp_path):
    manifest = write_cohort(tmp_path / "data", n_patients=3, image_size=40)
    out = tmp_path / "run" / "02_segmentation"
    result = segment.segment_manifest(OracleNet(), manifest, out, input_size=20, batch_size=4)
    assert len(result) == len(manifest) and result["path"].tolist() == manifest["path"].tolist()
    mf.validate(result, check_files=True)  # old paths kept, new ones exist
    row = result.iloc[0]
    assert row["mask_pred_lung"] == str(out.resolve() / "masks" / f"{row['image_id']}.png")
    labels = segment.read_label_map(row["mask_pred_lung"])
    image = read_image(mf.resolve_path(result, row["path"]))
    crop = read_image(row["path_lung_crop"])
    masked = read_image(row["path_lung_masked"])
    assert labels.shape == image.shape == crop.shape == masked.shape == (40, 40)
    assert set(np.unique(labels)) == {0, 1, 2}
    assert np.all(masked[labels == 0] == 0) and np.array_equal(masked[labels > 0], image[labels > 0])
    assert 0.1 < float(row["pred_lung_fraction"]) < 0.5

    written = mf.write_manifest(result, out / "manifest.csv")
    assert "masks/p0_s0.png" in written.read_text()  # relative on disk
    with pytest.raises(mf.ManifestError, match="outside the allowed folders"):
        mf.read_manifest(written)  # the images lie outside the run folder: allowed only when asked
    back = mf.read_manifest(written, allowed_roots=[tmp_path / "data"])
    mf.validate(back, check_files=True)
    # written elsewhere, every path column (path_*, mask_*) is rebased and still points at the files
    elsewhere = mf.write_manifest(back, tmp_path / "elsewhere" / "manifest.csv")
    assert ",../run/02_segmentation/lung_crop/" in elsewhere.read_text()
    moved = mf.read_manifest(elsewhere, allowed_roots=[tmp_path])
    mf.validate(moved, check_files=True)
    pd.testing.assert_frame_equal(moved, back)


def test_failed_segmentation_keeps_whole_image_crop(tmp_path):
    class Nothing(OracleNet):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 3, *x.shape[-2:], device=x.device)
            out[:, 0] = 1.0
            return out + self.anchor

    manifest = write_cohort(tmp_path / "data", n_patients=1, images_per_patient=1)
    result = segment.segment_manifest(Nothing(), manifest, tmp_path / "out", input_size=16)
    row = result.iloc[0]
    assert float(row["pred_lung_fraction"]) == 0.0
    original = read_image(mf.resolve_path(result, row["path"]))
    assert np.array_equal(read_image(row["path_lung_crop"]), original)
    assert read_image(row["path_lung_masked"]).max() == 0


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_at_mask_resolution_with_and_without_postprocessing(tmp_path):
    # images 36x36, union masks 32x32: as in the COVID-19 Radiography Database (299 vs 256)
    manifest = write_cohort(tmp_path, n_patients=12, per_kind=False, image_size=36, mask_size=32)
    evaluation = segment.evaluate_segmentation(OracleNet(), manifest, input_size=18, n_boot=200)
    test_rows = manifest[manifest["split"] == "test"]
    assert evaluation.n_images == len(test_rows)
    assert all(t.shape == (32, 32) for t in evaluation.truth)
    assert all(p.shape == (32, 32) for p in evaluation.pred["raw"] + evaluation.pred["post"])
    assert all(i.shape == (32, 32) for i in evaluation.images)
    table = evaluation.per_image["post"]
    assert list(table.columns[:3]) == ["image_id", "patient_id", "label"]
    assert table["dice_lungs"].min() > 0.85

    metrics = evaluation.metrics()
    for key in ("dice_mean", "dice_ci95", "iou_mean", "hd95_mean", "n_test", "dice_left_mean",
                "dice_right_ci95", "n_test_patients", "without_postprocessing"):
        assert key in metrics
    low, high = metrics["dice_ci95"]
    assert low <= metrics["dice_mean"] <= high and metrics["n_test"] == len(test_rows)
    assert metrics["n_test_patients"] == test_rows["patient_id"].nunique()
    assert math.isclose(metrics["dice_mean"], table["dice_lungs"].mean())
    shown = evaluation.table()
    assert shown.shape == (9, 2) and "[" in shown.iloc[0, 0]
    assert set(evaluation.by_label().index) <= {"normal", "covid"}
    ranked = evaluation.ranked()
    assert ranked["dice_lungs"].is_monotonic_increasing


def test_postprocessing_removes_islands_in_the_evaluation(tmp_path):
    class Speckled(OracleNet):
        def forward(self, x):
            logits = super().forward(x)
            logits[:, 1, :6, :6] = 100.0  # a stray "left lung" blob in the corner
            return logits

    manifest = write_cohort(tmp_path, n_patients=6)
    evaluation = segment.evaluate_segmentation(Speckled(), manifest, input_size=SIZE, n_boot=100)
    raw, post = evaluation.summary["raw"], evaluation.summary["post"]
    assert post["hd95_left_mean"] < raw["hd95_left_mean"]
    assert post["dice_left_mean"] >= raw["dice_left_mean"]
    metrics = evaluation.metrics()
    assert metrics["hd95_left_mean"] == post["hd95_left_mean"]
    assert metrics["without_postprocessing"]["hd95_left_mean"] == raw["hd95_left_mean"]


def test_error_categories():
    truth = np.array([[0, 1, 1, 2, 0]], dtype=np.uint8)
    pred = np.array([[1, 1, 0, 1, 0]], dtype=np.uint8)
    assert segment.error_categories(truth, pred).tolist() == [[2, 1, 3, 4, 0]]
    with pytest.raises(ValueError, match="differ in shape"):
        segment.error_categories(truth, pred[:, :3])


def test_segmentation_figures_and_viewer_build(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxrlib.data.masks import LungPatchSampler
    from cxrlib.viz import segmentation as segviz

    manifest = write_cohort(tmp_path / "data", n_patients=6)
    evaluation = segment.evaluate_segmentation(OracleNet(), manifest, input_size=16, n_boot=50)
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.5], "val_dice": [0.8, 0.9],
                            "val_dice_lung_left": [0.8, 0.9], "val_dice_lung_right": [0.8, 0.9]})
    segmented = segment.segment_manifest(OracleNet(), manifest, tmp_path / "out", input_size=16)
    image = read_image(mf.resolve_path(segmented, segmented.iloc[0]["path"]))
    lung_mask = read_mask(tmp_path / "out" / segmented.iloc[0]["mask_pred_lung"])
    figures = [segviz.learning_curves(history), segviz.best_worst_gallery(evaluation, k=2),
               segviz.predictions_by_class(segmented, n_per_class=1),
               segviz.patch_sampler_figure(image, lung_mask, LungPatchSampler(patch_size=256), k=4),
               segviz.case_figure(evaluation, 0)]
    assert all(fig.axes for fig in figures)
    plt.close("all")
    viewer = segviz.segmentation_viewer(evaluation)
    assert viewer.children
    plt.close("all")
