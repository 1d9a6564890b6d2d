"""Classifier training: learning under imbalance, early stopping, best-epoch choice, resume,
balanced sampling, input modes, patch voting, reloading, the command line and torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cxrlib.data.classification import (
    BalancedClassSampler,
    ClassificationDataset,
    make_label_map,
)
from cxrlib.data.io import read_image, write_png
from cxrlib.data.manifest import absolute_paths
from cxrlib.data.masks import LungPatchSampler
from cxrlib.evaluate.classification import binary_metrics
from cxrlib.train import classifier as clf
from cxrlib.train.classifier import (
    ClassifierTrainConfig,
    load_classifier,
    predict_patches,
    predict_proba,
    train_classifier,
)
from cxrlib.train.engine import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32
CLASSES = ["Normal", "COVID-19"]
LABEL_MAP = make_label_map(CLASSES)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_blob_cohort(folder: Path, n_pos: int, n_neg: int, split: str, seed: int) -> pd.DataFrame:
    """32x32 images with two dark elliptic lungs; COVID-19 ones carry a bright blob in a lung.

    Writes images, per-lung reference masks and a predicted union mask (``mask_pred_lung``)
    as PNGs under ``folder``; returns the manifest rows (absolute paths).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    rows = []
    for index in range(n_pos + n_neg):
        positive = index < n_pos
        centre_y = SIZE / 2 + rng.uniform(-1, 1)
        left = ((yy - centre_y) / (SIZE * 0.35)) ** 2 + ((xx - SIZE * 0.7) / (SIZE * 0.15)) ** 2 <= 1
        right = ((yy - centre_y) / (SIZE * 0.35)) ** 2 + ((xx - SIZE * 0.3) / (SIZE * 0.15)) ** 2 <= 1
        image = np.where(left | right, 60.0, 160.0) + rng.normal(0, 12, (SIZE, SIZE))
        if positive:
            lung = left if rng.random() < 0.5 else right
            blob_y, blob_x = np.argwhere(lung)[rng.integers(0, lung.sum())]
            image += 120 * np.exp(-((yy - blob_y) ** 2 + (xx - blob_x) ** 2) / (2 * (SIZE / 12) ** 2))
        image_id = f"{split}{index:03d}"
        paths = {"path": f"images/{image_id}.png", "mask_lung_left": f"masks/left/{image_id}.png",
                 "mask_lung_right": f"masks/right/{image_id}.png", "mask_pred_lung": f"masks/pred/{image_id}.png"}
        write_png(folder / paths["path"], np.clip(image, 0, 255).astype(np.uint8))
        write_png(folder / paths["mask_lung_left"], left)
        write_png(folder / paths["mask_lung_right"], right)
        write_png(folder / paths["mask_pred_lung"], left | right)
        rows.append({"image_id": image_id, **paths, "label": CLASSES[int(positive)], "patient_id": f"p{image_id}",
                     "source": "blob", "view": "PA", "split": split, "mask_path": "", "origin": "real",
                     "mask_heart": ""})
    return absolute_paths(pd.DataFrame(rows), folder)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """Train: 10 COVID-19 / 50 Normal (1:5); val: 6 / 30."""
    folder = tmp_path_factory.mktemp("blob_cohort")
    return (write_blob_cohort(folder, 10, 50, "train", seed=0),
            write_blob_cohort(folder, 6, 30, "val", seed=1), folder)


def tiny_config(**changes) -> ClassifierTrainConfig:
    settings = dict(arch="small_cnn", classes=CLASSES, image_size=SIZE, epochs=4, batch_size=8, lr=3e-3,
                    patience=None, seed=0, device="cpu", progress=False, patch_source_size=SIZE,
                    patch_size=512, eval_patches=4)
    return ClassifierTrainConfig(**{**settings, **changes})


class _Interrupt(Exception):
    pass


def _stop_after_first_epoch(record):
    if record["epoch"] == 1:
        raise _Interrupt


# --------------------------------------------------------------------------- training


def test_small_cnn_learns_the_imbalanced_task_and_reloads(cohort, tmp_path):
    train_df, val_df, root = cohort
    result = train_classifier(train_df, val_df, tmp_path / "run", tiny_config(epochs=5))
    history = result.history
    assert result.best_val_metric > 0.9
    assert result.best_val_metric == pytest.approx(history["val_auc"].max())
    # best.pt is the first epoch with the best validation AUC, and the returned model holds it.
    assert result.best_epoch == int(history.loc[history["val_auc"].idxmax(), "epoch"])
    best = read_checkpoint(result.checkpoint_path)
    assert result.checkpoint_path == tmp_path / "run" / "best.pt" and best["epoch"] == result.best_epoch
    for name, value in best["model"].items():
        assert torch.equal(result.model.state_dict()[name], value), name
    # Thresholds come from that epoch's validation predictions; Youden is the default.
    assert best["extra"]["thresholds"] == result.thresholds
    assert result.threshold == result.thresholds["youden"]
    val_prob = predict_proba(result, val_df)
    assert val_prob.shape == (len(val_df), 2) and np.allclose(val_prob.sum(axis=1), 1)
    y_val = val_df["label"].map(LABEL_MAP).to_numpy()
    assert binary_metrics(y_val, val_prob, result.thresholds["spec95"])["specificity"] >= 0.95

    loaded = load_classifier(tmp_path / "run")
    assert loaded.threshold == result.threshold and loaded.classes == CLASSES and not loaded.model.training
    assert np.array_equal(predict_proba(loaded, val_df), val_prob)
    assert list(loaded.history["epoch"]) == list(history["epoch"])
    config_json = pd.read_json(tmp_path / "run" / "config.json", typ="series")
    assert config_json["classes"] == CLASSES and config_json["imbalance"] == "weighted_loss"


def test_early_stopping_stops_patience_epochs_after_the_best(cohort, tmp_path):
    train_df, val_df, root = cohort
    # Validation loss improves for some epochs, then the tiny task is learnt and it stalls.
    config = tiny_config(epochs=30, patience=3, select_metric="loss", lr=1e-3, schedule="constant")
    result = train_classifier(train_df, val_df, tmp_path / "run", config)
    history = result.history
    epochs = history["epoch"].tolist()
    assert 1 < result.best_epoch and len(epochs) < 30
    assert epochs[-1] == result.best_epoch + 3
    assert result.best_val_metric == pytest.approx(history["val_loss"].min())
    assert result.best_epoch == int(history.loc[history["val_loss"].idxmin(), "epoch"])
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    assert last["extra"]["stopped_early"] and last["epoch"] == epochs[-1]
    # Calling again only loads the stopped run.
    again: list[int] = []
    loaded = train_classifier(train_df, val_df, tmp_path / "run", config,
                              on_epoch_end=lambda record: again.append(record["epoch"]))
    assert again == [] and loaded.best_epoch == result.best_epoch


def test_interrupted_run_resumes_to_the_same_weights(cohort, tmp_path):
    train_df, val_df, root = cohort
    config = tiny_config(epochs=3, imbalance="balanced_sampler", augment="heavy", dropout=0.2)
    straight = train_classifier(train_df, val_df, tmp_path / "straight", config)

    interrupted = tmp_path / "interrupted"
    with pytest.raises(_Interrupt):
        train_classifier(train_df, val_df, interrupted, config, on_epoch_end=_stop_after_first_epoch)
    assert read_checkpoint(interrupted / "last.pt")["epoch"] == 1
    epochs_run: list[int] = []
    resumed = train_classifier(train_df, val_df, interrupted, config,
                               on_epoch_end=lambda record: epochs_run.append(record["epoch"]))
    assert epochs_run == [2, 3]
    assert resumed.history["epoch"].tolist() == [1, 2, 3]
    final_straight = read_checkpoint(tmp_path / "straight" / "last.pt")
    final_resumed = read_checkpoint(interrupted / "last.pt")
    assert final_resumed["step"] == final_straight["step"]
    for name, value in final_straight["model"].items():
        assert torch.equal(final_resumed["model"][name], value), name
    assert resumed.best_epoch == straight.best_epoch and resumed.thresholds == straight.thresholds
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_resume_with_another_architecture_is_refused(cohort, tmp_path):
    train_df, val_df, root = cohort
    with pytest.raises(_Interrupt):
        train_classifier(train_df, val_df, tmp_path, tiny_config(), on_epoch_end=_stop_after_first_epoch)
    with pytest.raises(ValueError, match="other model settings"):
        train_classifier(train_df, val_df, tmp_path, tiny_config(arch="squeezenet1_1"))


def test_balanced_sampler_balances_batches_and_shards_one_draw():
    labels = np.array([1] * 10 + [0] * 90)
    sampler = BalancedClassSampler(labels, seed=3)
    sampler.set_epoch(1)
    drawn = list(sampler)
    assert len(drawn) == 100 and 0.35 < labels[drawn].mean() < 0.65
    many = BalancedClassSampler(labels, seed=3, num_samples=4000)
    assert labels[list(many)].mean() == pytest.approx(0.5, abs=0.04)
    # Two DDP ranks split the same balanced draw between them, without overlap.
    ranks = [BalancedClassSampler(labels, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for rank_sampler in ranks:
        rank_sampler.set_epoch(1)
    shards = [list(rank_sampler) for rank_sampler in ranks]
    assert len(shards[0]) == len(shards[1]) == 50
    assert sorted(shards[0] + shards[1]) == sorted(drawn)
    sampler.set_epoch(2)
    assert list(sampler) != drawn


def test_training_with_the_balanced_sampler_sees_both_classes_equally(cohort, tmp_path):
    train_df, val_df, root = cohort
    result = train_classifier(train_df, val_df, tmp_path, tiny_config(epochs=2, imbalance="balanced_sampler"))
    fractions = np.array(result.history["train_class_fraction"].tolist())
    assert np.all(np.abs(fractions - 0.5) < 0.2)  # the raw training data is 5:1


def test_multiclass_training_has_no_threshold(cohort, tmp_path):
    train_df, val_df, root = cohort
    relabel = {"Normal": "Normal", "COVID-19": "COVID-19"}
    train3 = train_df.assign(label=[relabel[x] if i % 3 else "Pneumonia" for i, x in enumerate(train_df["label"])])
    val3 = val_df.assign(label=[relabel[x] if i % 3 else "Pneumonia" for i, x in enumerate(val_df["label"])])
    config = tiny_config(epochs=1, classes=["Normal", "Pneumonia", "COVID-19"])
    result = train_classifier(train3, val3, tmp_path, config)
    assert result.threshold is None and result.thresholds == {}
    assert predict_proba(result, val3).shape == (len(val3), 3)
    assert np.isfinite(result.history["val_auc"]).all()


# --------------------------------------------------------------------------- input modes


def test_input_modes_give_the_right_pixels_and_shapes(cohort):
    train_df, _, root = cohort
    rows = train_df.iloc[:4]
    lungs = np.stack([read_image(root / p) > 0 for p in rows["mask_pred_lung"]])
    images = {}
    for mode in ("whole", "lung_masked", "lung_crop", "lungs_removed"):
        dataset = ClassificationDataset(rows, image_size=SIZE, label_map=LABEL_MAP, input_mode=mode)
        image, label = dataset[0]
        assert image.shape == (1, SIZE, SIZE) and image.dtype == torch.float32
        assert 0 <= float(image.min()) and float(image.max()) <= 1 and label == 1
        images[mode] = np.stack([dataset[i][0][0].numpy() for i in range(len(dataset))])
    assert np.all(images["lung_masked"][~lungs] == 0) and np.all(images["lung_masked"][lungs] == images["whole"][lungs])
    assert np.all(images["lungs_removed"][lungs] == 0)
    assert not np.array_equal(images["lung_crop"], images["whole"])
    # The reference masks give the same as the predicted ones here.
    reference = ClassificationDataset(rows, image_size=SIZE, label_map=LABEL_MAP,
                                      input_mode="lung_masked", mask_column="ground_truth")
    assert np.array_equal(reference[0][0][0].numpy(), images["lung_masked"][0])
    # Ready-made images from the segmentation stage are read as they are.
    ready = rows.assign(path_lung_masked=rows["path"].iloc[::-1].tolist())
    precomputed = ClassificationDataset(ready, image_size=SIZE, label_map=LABEL_MAP,
                                        input_mode="lung_masked")
    assert np.array_equal(precomputed[0][0][0].numpy(), images["whole"][-1])
    with pytest.raises(ValueError, match="needs lung masks"):
        ClassificationDataset(rows.drop(columns=["mask_pred_lung"]), image_size=SIZE,
                              label_map=LABEL_MAP, input_mode="lung_crop")


def test_patch_mode_draws_lung_centred_patches(cohort):
    train_df, _, root = cohort
    rows = train_df.iloc[:3]
    sampler = LungPatchSampler(patch_size=256, reference_size=1024)  # 16 px of a 64 px image
    dataset = ClassificationDataset(rows, image_size=24, label_map=LABEL_MAP, input_mode="patch",
                                    patch_sampler=sampler, source_size=64, augment="light", seed=1)
    image, label = dataset[0]
    assert image.shape == (1, 24, 24) and label == 1
    dataset.set_epoch(1)
    first = dataset[0][0]
    dataset.set_epoch(2)
    assert not torch.equal(first, dataset[0][0])  # a new random patch each epoch
    patches, centres = dataset.patches(1, k=7)
    assert patches.shape == (7, 1, 24, 24) and centres.shape == (7, 2)
    _, lung = dataset.stored(1)
    assert lung.shape == (64, 64) and lung[centres[:, 0], centres[:, 1]].all()
    again, same_centres = dataset.patches(1, k=7)
    assert torch.equal(again, patches) and np.array_equal(same_centres, centres)


class _MeanBrightness(nn.Module):
    """Logits ``[0, 20 * (mean - 0.45)]``: bright patches vote for class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))
        self.num_classes = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.scale * (x.mean(dim=(1, 2, 3)) - 0.45)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_predict_patches_aggregates_k_patches_per_image(cohort):
    train_df, _, root = cohort
    rows = train_df.iloc[[0, 1, 20, 21]]
    dataset = ClassificationDataset(rows, image_size=SIZE, label_map=LABEL_MAP, input_mode="patch",
                                    patch_sampler=LungPatchSampler(512, reference_size=1024), source_size=SIZE)
    model = _MeanBrightness()
    result = predict_patches(model, dataset, k=5, batch_size=7)
    assert result.proba.shape == (4, 2) and result.votes.shape == (4, 2) and result.centres.shape == (4, 5, 2)
    for index in range(4):
        patches, centres = dataset.patches(index, 5)
        with torch.no_grad():
            prob = model(patches).softmax(dim=1).double().numpy()
        assert np.allclose(result.proba[index], prob.mean(axis=0))
        assert np.allclose(result.votes[index], np.bincount(prob.argmax(axis=1), minlength=2) / 5)
        assert np.array_equal(result.centres[index], centres)
    for votes, proba, majority in zip(result.votes, result.proba, result.majority, strict=True):
        tied = np.flatnonzero(votes == votes.max())
        assert majority == tied[np.argmax(proba[tied])]  # most votes; a tie goes to the higher mean probability
    assert set(result.majority.tolist()) == {0, 1}  # bright-blob images vote differently from the others
    assert np.allclose(predict_proba(model, dataset, config=tiny_config(eval_patches=5)), result.proba)


def test_patch_mode_trains_end_to_end(cohort, tmp_path):
    train_df, val_df, root = cohort
    result = train_classifier(train_df, val_df, tmp_path, tiny_config(epochs=1, input_mode="patch"))
    assert result.history["epoch"].tolist() == [1]
    patch_result = predict_patches(result, val_df.iloc[:3], k=3)
    assert patch_result.proba.shape == (3, 2)


# --------------------------------------------------------------------------- command line and torchrun


def test_every_command_line_option_has_help():
    for action in clf.build_parser()._actions:
        assert action.help, action.dest


def test_command_line_trains_from_a_manifest_file(cohort, tmp_path):
    from cxrlib.data.manifest import write_manifest

    train_df, val_df, root = cohort
    manifest_path = write_manifest(pd.concat([train_df, val_df]), root / "manifest.csv", labels=CLASSES)
    code = clf.main(["--manifest", str(manifest_path), "--run-dir", str(tmp_path / "cli"), "--arch", "small_cnn",
                     "--classes", *CLASSES, "--epochs", "1", "--image-size", str(SIZE), "--device", "cpu",
                     "--imbalance", "balanced_sampler", "--no-progress"])
    assert code == 0
    assert {"last.pt", "best.pt", "config.json", "history.jsonl"} <= {p.name for p in (tmp_path / "cli").iterdir()}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this PyTorch build has no torch.distributed with the Gloo backend")
def test_two_process_ddp_training_with_the_balanced_sampler(cohort, tmp_path):
    train_df, val_df, root = cohort
    manifest_path = tmp_path / "manifest.csv"
    pd.concat([train_df, val_df]).to_csv(manifest_path, index=False)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "cxrlib.train.classifier", "--manifest", str(manifest_path), "--root", str(root),
               "--run-dir", str(tmp_path / "run"), "--arch", "small_cnn", "--classes", *CLASSES,
               "--epochs", "2", "--batch-size", "4", "--image-size", str(SIZE), "--device", "cpu",
               "--imbalance", "balanced_sampler", "--no-progress"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    history = pd.read_json(tmp_path / "run" / "history.jsonl", lines=True)
    assert history["epoch"].tolist() == [1, 2]
    # Both ranks together trained on one balanced epoch of the 60 training images.
    fractions = np.array(history["train_class_fraction"].tolist())
    assert np.all(np.abs(fractions - 0.5) < 0.2)
    checkpoint = read_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["extra"]["run"]["world_size"] == 2
    assert set(checkpoint["extra"]["thresholds"]) == {"youden", "spec95"}
    # Validation saw every image once: its AUC equals the one-process evaluation of the saved model.
    loaded = load_classifier(tmp_path / "run" / "last.pt")
    prob = predict_proba(loaded, val_df)
    y_val = val_df["label"].map(LABEL_MAP).to_numpy()
    assert history["val_auc"].iloc[-1] == pytest.approx(binary_metrics(y_val, prob, 0.5)["auc_roc"], abs=1e-6)
