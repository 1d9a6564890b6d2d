"""Feature extraction (cache, bad files), 2-D maps, separation measures and the stage's choices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlib.data import manifest as mf
from cxrlib.data.classification import ClassificationDataset, make_label_map
from cxrlib.data.io import write_png
from cxrlib.explain import embed
from cxrlib.models.classifiers import build_classifier, penultimate_features
from cxrlib.stages import umap_gradcam as st
from cxrlib.train.classifier import ClassifierTrainConfig, ClassifierTrainResult

CLASSES = ["normal", "covid"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_images(folder, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for index in range(n):
        write_png(folder / f"img{index}.png", rng.integers(0, 256, (40, 40), dtype=np.uint8))
        rows.append({"image_id": f"i{index}", "path": f"img{index}.png", "label": CLASSES[index % 2],
                     "patient_id": f"p{index}", "origin": "real"})
    return mf.absolute_paths(pd.DataFrame(rows), folder)


def saved_result(folder, seed: int = 0, image_size: int = 32) -> ClassifierTrainResult:
    torch.manual_seed(seed)
    model = build_classifier("small_cnn", 2).eval()
    path = folder / f"model{seed}.pt"
    torch.save(model.state_dict(), path)
    config = ClassifierTrainConfig(arch="small_cnn", classes=CLASSES, image_size=image_size, progress=False)
    return ClassifierTrainResult(model=model, history=pd.DataFrame(), best_epoch=0, best_val_metric=float("nan"),
                                 threshold=0.5, thresholds={}, checkpoint_path=path, config=config,
                                 classes=CLASSES)


def test_features_match_the_model_and_are_cached(tmp_path):
    rows = write_images(tmp_path, 5)
    result = saved_result(tmp_path)
    cache = tmp_path / "cache"
    first = embed.extract_features(result, rows, cache_dir=cache, batch_size=2)
    assert first.values.shape == (5, 128) and first.values.dtype == np.float32
    assert first.image_ids == list(rows["image_id"]) and not first.skipped and not first.from_cache
    dataset = ClassificationDataset(rows, image_size=32, label_map=make_label_map(CLASSES))
    direct = penultimate_features(result.model, torch.stack([dataset[i][0] for i in range(5)])).numpy()
    assert np.allclose(first.values, direct, atol=1e-5)
    again = embed.extract_features(result, rows, cache_dir=cache)
    assert again.from_cache and np.array_equal(again.values, first.values)
    assert [p.name for p in cache.iterdir()] == [first.cache_path.name]  # no temporary file left


def test_cache_key_changes_with_checkpoint_rows_and_size(tmp_path):
    rows = write_images(tmp_path, 3)
    a, b = saved_result(tmp_path, seed=0), saved_result(tmp_path, seed=1)
    key = embed.feature_cache_key(a.checkpoint_path, rows, 32)
    assert key == embed.feature_cache_key(a.checkpoint_path, rows.copy(), 32)
    assert key != embed.feature_cache_key(b.checkpoint_path, rows, 32)
    assert key != embed.feature_cache_key(a.checkpoint_path, rows, 24)
    assert key != embed.feature_cache_key(a.checkpoint_path, rows.iloc[:2], 32)
    assert key != embed.feature_cache_key(a.checkpoint_path, rows, 32, {"input_mode": "lung_masked"})


def test_unreadable_images_are_listed_and_the_rest_go_on(tmp_path):
    rows = write_images(tmp_path, 4)
    (tmp_path / "img2.png").write_bytes(b"not a png")
    rows.loc[3, "path"] = "missing.png"
    with pytest.warns(UserWarning, match="2 of 4 image"):
        features = embed.extract_features(saved_result(tmp_path), rows)
    assert features.image_ids == ["i0", "i1"] and features.values.shape == (2, 128)
    assert set(features.skipped) == {"i2", "i3"}
    assert "img2.png" in features.skipped["i2"] and "missing.png" in features.skipped["i3"]


def test_analysis_groups_tell_real_from_synthetic_covid():
    frame = pd.DataFrame({"label": ["normal", "covid", "covid", "pneumonia", "covid"],
                          "origin": ["real", "real", "G_NC:ck:img1", "real", "G_PC:ck:img3"]})
    assert embed.analysis_groups(frame).tolist() == ["normal", "real covid", "synthetic covid", "pneumonia",
                                                     "synthetic covid"]
    assert embed.origin_kind(frame).tolist() == ["real", "real", "G_NC", "real", "G_PC"]


def blobs(n: int, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = np.concatenate([rng.normal(0, 1, (n, 8)), rng.normal(shift, 1, (n, 8))])
    return features, np.array(["real covid"] * n + ["synthetic covid"] * n)


def test_separation_is_high_for_apart_groups_and_chance_for_mixed_ones():
    apart = embed.separation_report(*blobs(40, 8.0), k=5)
    assert apart["silhouette"] > 0.7 and apart["knn_purity"] > 0.99
    assert apart["n"] == {"real covid": 40, "synthetic covid": 40}
    mixed = embed.separation_report(*blobs(40, 0.0), k=5)
    assert abs(mixed["silhouette"]) < 0.1
    chance = mixed["knn_purity_chance_per_group"]["real covid"]
    assert chance == pytest.approx(39 / 79)
    assert abs(mixed["knn_purity"] - chance) < 0.15


def test_knn_purity_excludes_the_point_itself():
    features = np.array([[0.0], [0.1], [10.0], [10.1]])
    assert embed.knn_purity(features, ["a", "a", "b", "b"], k=1, standardize=False).tolist() == [1, 1, 1, 1]
    assert embed.knn_purity(features, ["a", "b", "a", "b"], k=1, standardize=False).tolist() == [0, 0, 0, 0]


def test_detectability_is_perfect_when_apart_and_chance_when_not():
    features, groups = blobs(30, 6.0)
    synthetic = groups == "synthetic covid"
    patients = [f"p{i // 2}" for i in range(len(features))]
    apart = embed.synthetic_detectability(features, synthetic, patients, k=5, folds=5, seed=0)
    assert apart["balanced_accuracy"] > 0.95 and apart["n_folds"] == 5
    assert apart["n_real"] == 30 and apart["n_synthetic"] == 30 and apart["chance_accuracy"] == 0.5
    features, _ = blobs(30, 0.0, seed=1)
    mixed = embed.synthetic_detectability(features, synthetic, patients, k=5, folds=5, seed=0)
    assert 0.25 < mixed["balanced_accuracy"] < 0.75
    too_few = embed.synthetic_detectability(features[:4], [False, False, True, True], ["a", "a", "b", "b"])
    assert np.isnan(too_few["balanced_accuracy"]) and "folds" in too_few["reason"]


def test_pca_embedding_is_two_dimensional_and_seeded():
    features, _ = blobs(20, 3.0)
    first = embed.pca_embedding(features, seed=0)
    assert first.shape == (40, 2) and np.array_equal(first, embed.pca_embedding(features, seed=0))
    with pytest.raises(ValueError, match="at least 3"):
        embed.pca_embedding(features[:2])
    with pytest.raises(ValueError, match="NaN"):
        embed.pca_embedding(np.full((5, 3), np.nan))


@pytest.mark.slow
def test_umap_embedding_is_seeded_and_keeps_groups_apart():
    """umap-learn compiles its numba code on the first call of a process (~30 s)."""
    features, groups = blobs(30, 8.0)
    torch.set_num_threads(1)
    first = embed.umap_embedding(features, n_neighbors=10, seed=0)
    assert torch.get_num_threads() == 1, "UMAP must not change PyTorch's thread count"
    second = embed.umap_embedding(features, n_neighbors=10, seed=0)
    assert first.shape == (60, 2) and np.array_equal(first, second)
    assert embed.knn_purity(first, groups, k=5).mean() > 0.99


def test_choose_classifier_uses_validation_never_test(tmp_path):
    results = pd.DataFrame({
        "task": ["normal_vs_covid"] * 4, "arch": ["small_cnn"] * 4, "imbalance": ["1:20"] * 4,
        "condition": ["real", "real_gnc_gpc", "real_gnc_gpc", "real_gnc_gpc"], "seed": [0, 0, 1, 2],
        "best_val_auc": [0.9, 0.7, 0.8, 0.8], "auc": [0.9, 0.99, 0.5, 0.6],
        "cell_dir": ["a", "b", "c", "d"],
    })
    choice = st.choose_classifier(results, tmp_path)
    assert choice.row["seed"] == 1 and choice.cell_dir == tmp_path / "04_classifiers" / "c"
    assert "validation AUC (0.800)" in choice.reason
    fallback = st.choose_classifier(results[results["condition"] == "real"], tmp_path)
    assert fallback.row["condition"] == "real" and "fell back" in fallback.reason
    with pytest.raises(ValueError, match="none of the conditions"):
        st.choose_classifier(results, tmp_path, condition="synthetic_only", fallbacks=())
    with pytest.raises(FileNotFoundError, match="run notebook 04"):
        st.read_grid_results(tmp_path)


def test_embedding_rows_keep_every_real_row_and_sample_synthetic_ones():
    frame = pd.DataFrame({"image_id": [f"i{k}" for k in range(10)],
                          "label": ["normal", "covid"] + ["covid"] * 8,
                          "origin": ["real", "real"] + [f"G_NC:ck:i{k}" for k in range(8)]})
    rows = st.embedding_rows(frame, max_synthetic=3, seed=0)
    assert len(rows) == 5 and (rows["made_by"] == "real").sum() == 2
    assert rows["image_id"].tolist() == st.embedding_rows(frame, max_synthetic=3, seed=0)["image_id"].tolist()
    assert set(rows["group"]) == {"normal", "real covid", "synthetic covid"}


def test_masks_are_unions_of_columns_and_bad_files_are_listed(tmp_path):
    left = np.zeros((20, 20), dtype=bool)
    left[5:15, 2:8] = True
    write_png(tmp_path / "left.png", left)
    write_png(tmp_path / "right.png", left[:, ::-1])
    (tmp_path / "broken.png").write_bytes(b"no png")
    rows = pd.DataFrame({"image_id": ["a", "b", "c"], "mask_lung_left": ["left.png", "broken.png", "left.png"],
                         "mask_lung_right": ["right.png", "right.png", ""], "mask_pred_lung": ["x.png"] * 3})
    rows = mf.absolute_paths(rows, tmp_path)
    assert st.lung_mask_columns(rows)[0] == ("mask_pred_lung",)  # row c lacks a reference mask
    assert st.lung_mask_columns(rows.iloc[:2])[0] == st.REFERENCE_LUNG_COLUMNS
    with pytest.warns(UserWarning, match="b mask_lung_left.*broken.png"):
        masks = st.load_masks(rows, st.REFERENCE_LUNG_COLUMNS, 10)
    assert masks[0].shape == (10, 10) and masks[0].sum() == 2 * masks[2].sum()
    assert masks[1] is None
    assert np.array_equal(masks[0], masks[0][:, ::-1])


def test_saliency_images_one_sample_for_every_seed(tmp_path):
    """The COVID-19 test images a seed got right under any seed; 'all' takes every COVID-19 test image."""
    choices = []
    for seed, right in ((0, {"c1"}), (1, {"c2"})):
        cell = tmp_path / f"seed{seed}"
        cell.mkdir()
        pd.DataFrame({"image_id": ["c1", "c2", "c3", "n1"], "patient_id": ["p1", "p2", "p3", "p4"],
                      "label": ["covid", "covid", "covid", "normal"],
                      "pred": [("covid" if i in right else "normal") for i in ("c1", "c2", "c3")] + ["normal"]}
                     ).to_csv(cell / "predictions.csv", index=False)
        choices.append(st.ClassifierChoice(row={"seed": seed}, cell_dir=cell, reason=""))
    assert sorted(st.saliency_images(choices, "covid", only_correct=True, max_images=10)) == ["c1", "c2"]
    assert sorted(st.saliency_images(choices, "covid", only_correct=False, max_images=10)) == ["c1", "c2", "c3"]
    drawn = st.saliency_images(choices, "covid", only_correct=False, max_images=2, seed=3)
    assert len(drawn) == 2 and drawn == st.saliency_images(choices, "covid", only_correct=False, max_images=2, seed=3)
