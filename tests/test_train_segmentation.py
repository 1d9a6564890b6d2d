"""U-Net segmentation training: loss, resume after an interruption, inference, torchrun."""

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

from cxrlib.data.io import write_png
from cxrlib.data.manifest import absolute_paths
from cxrlib.models.unet import UNet
from cxrlib.settings import from_mapping
from cxrlib.train import segmentation as seg
from cxrlib.train.engine import load_checkpoint, lr_factor, read_checkpoint
from cxrlib.train.segmentation import (
    SegTrainConfig,
    load_segmenter,
    per_image_dice,
    predict_masks,
    segmentation_loss,
    train_segmentation,
)

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def write_tiny_cohort(folder: Path, n_images: int = 12, n_val: int = 4, seed: int = 0) -> pd.DataFrame:
    """``n_images`` 32x32 images with elliptic lungs (per-lung 0/255 PNG masks) and a manifest.

    Paths are absolute, under ``folder``; the last ``n_val`` rows are
    the ``val`` split.
    """
    rng = np.random.default_rng(seed)
    rows, yy, xx = [], *np.mgrid[0:SIZE, 0:SIZE]
    for index in range(n_images):
        cy, ry, rx = SIZE / 2 + rng.uniform(-2, 2), rng.uniform(9, 12), rng.uniform(4, 6)
        left = ((yy - cy) / ry) ** 2 + ((xx - (SIZE * 0.7 + rng.uniform(-1, 1))) / rx) ** 2 <= 1
        right = ((yy - cy) / ry) ** 2 + ((xx - (SIZE * 0.3 + rng.uniform(-1, 1))) / rx) ** 2 <= 1
        image = np.where(left | right, 60, 170) + rng.normal(0, 20, (SIZE, SIZE))
        image_id = f"img{index:02d}"
        paths = {"path": f"images/{image_id}.png", "mask_lung_left": f"masks/left/{image_id}.png",
                 "mask_lung_right": f"masks/right/{image_id}.png"}
        write_png(folder / paths["path"], np.clip(image, 0, 255).astype(np.uint8))
        write_png(folder / paths["mask_lung_left"], left)
        write_png(folder / paths["mask_lung_right"], right)
        rows.append({"image_id": image_id, **paths, "label": "normal", "patient_id": f"p{index:02d}",
                     "source": "tiny", "view": "PA", "split": "val" if index >= n_images - n_val else "train",
                     "mask_path": "", "origin": "real", "mask_heart": ""})
    return absolute_paths(pd.DataFrame(rows), folder)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    folder = tmp_path_factory.mktemp("tiny_cohort")
    manifest = write_tiny_cohort(folder)
    return manifest[manifest["split"] == "train"], manifest[manifest["split"] == "val"], folder


def tiny_config(**changes) -> SegTrainConfig:
    settings = dict(epochs=2, batch_size=4, lr=3e-3, image_size=SIZE, unet={"depth": 2, "base_channels": 4},
                    seed=3, device="cpu", progress=False)
    return SegTrainConfig(**{**settings, **changes})


class _Interrupt(Exception):
    pass


def _stop_after_first_epoch(record: dict) -> None:
    if record["epoch"] == 1:
        raise _Interrupt


# --------------------------------------------------------------------------- loss and config


def test_loss_is_small_for_confident_correct_logits_and_has_gradients():
    labels = torch.randint(0, 3, (2, 8, 8))
    perfect = 20.0 * torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    loss, parts = segmentation_loss(perfect, labels)
    assert loss.item() < 1e-3 and set(parts) == {"ce", "dice_loss"}
    logits = torch.zeros(2, 3, 8, 8, requires_grad=True)
    loss, _ = segmentation_loss(logits, labels, dice_weight=1.0, ce_weight=0.0)
    loss.backward()
    assert loss.item() > 0.3 and logits.grad.abs().sum() > 0


def test_per_image_dice_counts_absent_classes_as_perfect():
    truth = torch.zeros(2, 4, 4, dtype=torch.long)
    truth[0, :2] = 1
    pred = truth.clone()
    pred[0, 0] = 0  # half of class 1 missed in image 0
    scores = per_image_dice(pred, truth, num_classes=3)
    assert scores.shape == (2, 2)
    assert scores[0, 0].item() == pytest.approx(2 * 4 / (4 + 8))
    assert scores[0, 1].item() == 1.0 and scores[1].tolist() == [1.0, 1.0]


def test_validation_dice_leaves_out_classes_the_reference_lacks():
    """An image without class 2 in its reference does not score class 2 at all: a network that
    predicts nothing of it is not rewarded with a perfect score (the model selection's trap)."""
    from torch.utils.data import DataLoader, TensorDataset

    from cxrlib.train.engine import DistContext

    truth = torch.zeros(3, 4, 4, dtype=torch.long)
    truth[:, :2] = 1                 # class 1 in every image
    truth[2, 2:, :2] = 2             # class 2 only in image 2
    pred = truth.clone()
    pred[0, 0] = 0                   # image 0: half of class 1 missed (Dice 2/3)
    pred[2, 2:, :2] = 0              # image 2: class 2 missed (Dice 0)

    class Fixed(torch.nn.Module):
        def forward(self, x):
            index = x[:, 0, 0, 0].long()
            return torch.nn.functional.one_hot(pred[index], 3).permute(0, 3, 1, 2).float() * 10

    loader = DataLoader(TensorDataset(torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 4, 4).clone(), truth),
                        batch_size=2)
    metrics = seg.evaluate_dice(Fixed(), loader, DistContext(), 3)
    # per image, over the classes present: 2/3, 1, mean(1, 0) = 0.5
    assert metrics["val_dice"] == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    assert metrics["val_dice_lung_left"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert metrics["val_dice_lung_right"] == 0.0  # only image 2 holds class 2, and it was missed
    empty = DataLoader(TensorDataset(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)))
    nothing = seg.evaluate_dice(Fixed(), empty, DistContext(), 3)
    assert nothing["val_dice"] == 0.0 and np.isnan(nothing["val_dice_lung_left"])


PARTIAL = {4: [0, 3]}  # "background or class 3"


def test_partial_labels_without_partial_pixels_change_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    labels = torch.randint(0, 4, (2, 8, 8))
    plain, _ = segmentation_loss(logits, labels)
    partial, _ = segmentation_loss(logits, labels, partial_labels=PARTIAL)
    assert partial.item() == pytest.approx(plain.item(), rel=1e-5)


def test_a_partial_pixel_is_indifferent_between_its_classes():
    labels = torch.full((1, 4, 4), 4, dtype=torch.long)  # background or class 3, everywhere
    labels[0, 0, 0] = 1
    def loss_with(mass_on_3: float) -> float:
        logits = torch.full((1, 4, 4, 4), -20.0)
        logits[0, 1, 0, 0] = 20.0
        rest = torch.ones(4, 4, dtype=torch.bool)
        rest[0, 0] = False
        logits[0, 0][rest] = float(np.log(1.0 - mass_on_3))
        logits[0, 3][rest] = float(np.log(mass_on_3))
        return segmentation_loss(logits, labels, partial_labels=PARTIAL)[0].item()
    assert loss_with(0.01) == pytest.approx(loss_with(0.99), abs=1e-4)
    # the same probabilities are wrong for class 3 when the labels say background
    exact = labels.clone()
    exact[exact == 4] = 0
    logits = torch.full((1, 4, 4, 4), -20.0)
    logits[0, 1, 0, 0] = 20.0
    logits[0, 3] = 0.0
    logits[0, 3, 0, 0] = -20.0
    assert segmentation_loss(logits, exact)[0].item() > 10 * segmentation_loss(logits, labels, partial_labels=PARTIAL)[0].item()


def test_a_partial_pixel_still_counts_against_the_other_classes():
    labels = torch.full((1, 4, 4), 4, dtype=torch.long)
    logits = torch.full((1, 4, 4, 4), -20.0)
    logits[:, 1] = 20.0  # everything called class 1, which "background or class 3" excludes
    loss, parts = segmentation_loss(logits, labels, partial_labels=PARTIAL)
    assert parts["ce"].item() > 30 and parts["dice_loss"].item() > 0.3
    logits.requires_grad_(True)
    segmentation_loss(logits, labels, partial_labels=PARTIAL)[0].backward()
    assert torch.isfinite(logits.grad).all()


def test_per_image_dice_leaves_partial_pixels_out_of_their_classes():
    truth = torch.full((1, 4, 4), 4, dtype=torch.long)
    truth[0, :2] = 1
    pred = truth.clone()
    pred[0, 2:] = 3  # class 3 predicted where the source did not say
    scores = per_image_dice(pred, truth, num_classes=4, partial_labels=PARTIAL)
    assert scores[0].tolist() == [1.0, 1.0, 1.0]
    pred[0, 2:] = 2  # class 2 there is wrong: the partial label excludes it
    assert per_image_dice(pred, truth, num_classes=4, partial_labels=PARTIAL)[0, 1].item() == 0.0


def test_partial_labels_are_checked():
    with pytest.raises(ValueError, match="is a class of its own"):
        SegTrainConfig(include_heart=True, partial_labels={3: [0, 1]})
    with pytest.raises(ValueError, match="two or more of the classes"):
        SegTrainConfig(include_heart=True, partial_labels={4: [0, 7]})
    assert SegTrainConfig(include_heart=True, partial_labels={"4": [3, 0]}).partial_labels == {4: [0, 3]}
    with pytest.raises(ValueError, match=r"label values \[5\]"):
        segmentation_loss(torch.zeros(1, 4, 2, 2), torch.full((1, 2, 2), 5), partial_labels=PARTIAL)


def test_config_resolves_unet_and_rejects_contradictions():
    resolved = SegTrainConfig(include_heart=True, unet={"depth": 3}).resolved()
    assert resolved.unet["num_classes"] == 4 and resolved.unet["depth"] == 3
    assert set(resolved.unet) >= {"in_channels", "base_channels", "norm", "dropout", "upsample"}
    with pytest.raises(ValueError, match="num_classes"):
        SegTrainConfig(unet={"num_classes": 5})
    with pytest.raises(ValueError, match="unknown UNetConfig"):
        SegTrainConfig(unet={"width": 3})
    with pytest.raises(ValueError, match="schedule"):
        SegTrainConfig(schedule="linear")
    assert from_mapping(SegTrainConfig, {"epochs": 3, "runtime": {}}, strict=False).epochs == 3


def test_schedules_start_at_full_rate_and_decay():
    cosine = lr_factor("cosine", 4)
    assert cosine(0) == 1.0 and cosine(1) > cosine(2) > cosine(3) > 0
    step = lr_factor("step", 4)
    assert [step(e) for e in range(4)] == pytest.approx([1.0, 1.0, 0.1, 0.01])


def test_every_command_line_option_has_help():
    parser = seg.build_parser()
    for action in parser._actions:
        assert action.help, f"option {action.option_strings} has no help text"
    args = parser.parse_args(["--manifest", "m.csv", "--run-dir", "r", "--epochs", "3", "--no-amp"])
    assert args.epochs == 3 and args.amp is False


# --------------------------------------------------------------------------- training and resume


def test_interrupted_run_resumes_to_the_same_weights(cohort, tmp_path):
    train_df, val_df, root = cohort
    config = tiny_config()

    straight = train_segmentation(train_df, val_df, tmp_path / "straight", config)
    assert straight.history["epoch"].tolist() == [1, 2]
    assert (tmp_path / "straight" / "config.json").is_file()

    interrupted = tmp_path / "interrupted"
    with pytest.raises(_Interrupt):
        train_segmentation(train_df, val_df, interrupted, config, on_epoch_end=_stop_after_first_epoch)
    saved = read_checkpoint(interrupted / "last.pt")
    assert saved["epoch"] == 1

    # The optimizer comes back exactly as it was saved.
    model = UNet(config.unet_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    load_checkpoint(interrupted / "last.pt", model=model, optimizer=optimizer)
    restored = optimizer.state_dict()
    assert restored["param_groups"] == saved["optimizer"]["param_groups"]
    for key, state in saved["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(restored["state"][key][name], value), (key, name)

    epochs_run: list[int] = []
    resumed = train_segmentation(train_df, val_df, interrupted, config,
                                 on_epoch_end=lambda record: epochs_run.append(record["epoch"]))
    assert epochs_run == [2]
    assert resumed.history["epoch"].tolist() == [1, 2]
    assert len(pd.read_json(interrupted / "history.jsonl", lines=True)) == 2

    final_straight = read_checkpoint(tmp_path / "straight" / "last.pt")
    final_resumed = read_checkpoint(interrupted / "last.pt")
    assert final_resumed["epoch"] == 2 and final_resumed["step"] == final_straight["step"]
    for name, value in final_straight["model"].items():
        assert torch.equal(final_resumed["model"][name], value), name
    for key, state in final_straight["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(final_resumed["optimizer"]["state"][key][name], value), (key, name)
    assert final_resumed["scheduler"] == final_straight["scheduler"]
    assert resumed.best_val_dice == pytest.approx(straight.best_val_dice)
    assert resumed.best_epoch == straight.best_epoch
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name

    # A finished run only loads: no epoch runs again.
    again: list[int] = []
    loaded = train_segmentation(train_df, val_df, interrupted, config,
                                on_epoch_end=lambda record: again.append(record["epoch"]))
    assert again == [] and loaded.history["epoch"].tolist() == [1, 2]
    assert loaded.best_epoch == straight.best_epoch


def test_training_learns_and_the_segmenter_reloads(cohort, tmp_path):
    train_df, val_df, root = cohort
    # Group norm: BatchNorm's running statistics need more steps than a quick test affords.
    config = tiny_config(epochs=8, batch_size=2, lr=1e-2, augment=False,
                         unet={"depth": 2, "base_channels": 8, "norm": "group"})
    result = train_segmentation(train_df, val_df, tmp_path / "run", config)
    history = result.history
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert result.best_val_dice == pytest.approx(history["val_dice"].max())
    assert result.best_val_dice > 0.7
    assert result.checkpoint_path == tmp_path / "run" / "best.pt"
    assert torch.load(result.checkpoint_path, weights_only=True)["epoch"] == result.best_epoch

    model = load_segmenter(tmp_path / "run")
    for name, value in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert not model.training

    from cxrlib.data.datasets import SegmentationDataset

    dataset = SegmentationDataset(val_df, size=SIZE)
    from_dataset = predict_masks(model, dataset, batch_size=3)
    images = np.stack([dataset.pair(i)[0] for i in range(len(dataset))])  # uint8 (N, H, W)
    from_array = predict_masks(model, images, batch_size=2, device="cpu")
    assert from_dataset.dtype == np.uint8 and from_dataset.shape == (len(val_df), SIZE, SIZE)
    assert np.array_equal(from_dataset, from_array)
    assert set(np.unique(from_dataset)) <= {0, 1, 2}
    raw = predict_masks(model, images, postprocess=False)
    assert raw.shape == from_array.shape


def test_resume_with_other_model_settings_is_refused(cohort, tmp_path):
    train_df, val_df, root = cohort
    with pytest.raises(_Interrupt):
        train_segmentation(train_df, val_df, tmp_path, tiny_config(),
                           on_epoch_end=_stop_after_first_epoch)
    with pytest.raises(ValueError, match="last.pt.*other model settings"):
        train_segmentation(train_df, val_df, tmp_path, tiny_config(unet={"depth": 2, "base_channels": 8}))
    # resume=False starts over in the same folder.
    fresh = train_segmentation(train_df, val_df, tmp_path, tiny_config(epochs=1), resume=False)
    assert fresh.history["epoch"].tolist() == [1]


def test_command_line_trains_from_a_manifest_file(cohort, tmp_path):
    from cxrlib.data.manifest import write_manifest

    train_df, val_df, root = cohort
    manifest = pd.concat([train_df, val_df])
    manifest_path = write_manifest(manifest, root / "manifest.csv")
    code = seg.main(["--manifest", str(manifest_path), "--run-dir", str(tmp_path / "cli"), "--epochs", "1",
                     "--image-size", str(SIZE), "--depth", "2", "--base-channels", "4", "--device", "cpu",
                     "--no-progress"])
    assert code == 0
    assert {"last.pt", "best.pt", "config.json", "history.jsonl"} <= {p.name for p in (tmp_path / "cli").iterdir()}


# --------------------------------------------------------------------------- torchrun


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this PyTorch build has no torch.distributed with the Gloo backend")
def test_two_process_ddp_training_keeps_ranks_in_sync(cohort, tmp_path):
    train_df, val_df, root = cohort
    manifest_path = tmp_path / "manifest.csv"
    pd.concat([train_df, val_df]).to_csv(manifest_path, index=False)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(ROOT / "tests" / "ddp_worker.py"), "--manifest", str(manifest_path), "--root", str(root),
               "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "weights")]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    initial = torch.load(tmp_path / "weights" / "initial.pt", weights_only=True)
    rank0 = torch.load(tmp_path / "weights" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "weights" / "rank1.pt", weights_only=True)
    for name, value in rank0.items():
        assert torch.equal(rank1[name], value), f"ranks disagree on {name}"
    assert any(not torch.equal(initial[name], rank0[name]) for name in rank0)
    # Only rank 0 wrote the run folder, and its checkpoint holds what every rank holds.
    history = pd.read_json(tmp_path / "run" / "history.jsonl", lines=True)
    assert history["epoch"].tolist() == [1, 2]
    best = read_checkpoint(tmp_path / "run" / "best.pt")
    assert best["extra"]["run"]["world_size"] == 2
    for name, value in best["model"].items():
        assert torch.equal(rank0[name], value), name
