"""Diffusion model, training loop, sampling rows and the real_diffusion grid condition (tiny sizes)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlib.data import manifest as mf
from cxrlib.models.diffusion import (
    DiffusionConfig,
    DiffusionModel,
    SampleSpec,
    sample_per_class,
    sampling_scheduler,
    to_model_range,
    x0_error_gain,
)
from cxrlib.train.diffusion import DiffusionTrainConfig, load_diffusion, train_diffusion

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(image_size=16, block_out_channels=(8, 16), norm_num_groups=4, num_train_timesteps=50)


def _images(n: int = 12, size: int = 16, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    labels = ["normal", "pneumonia", "covid"] * (n // 3)
    # a bright disc whose size depends on the class: something class-specific to learn
    yy, xx = np.mgrid[:size, :size]
    images = []
    for i, label in enumerate(labels):
        radius = {"normal": 3, "pneumonia": 5, "covid": 7}[label]
        disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < radius**2
        images.append(np.clip(disc * 200 + rng.normal(30, 5, (size, size)), 0, 255).astype(np.uint8))
        del i
    return np.stack(images), labels


def _config(**overrides) -> DiffusionTrainConfig:
    settings = dict(model=DiffusionConfig(**TINY), epochs=2, max_steps_per_epoch=2, batch_size=4, device="cpu",
                    progress=False)
    settings.update(overrides)
    return DiffusionTrainConfig(**settings)


def test_config_checks_and_class_index():
    config = DiffusionConfig(**TINY)
    assert config.null_class == 3
    assert config.class_index(["covid", "normal", None, 1]).tolist() == [2, 0, 3, 1]
    with pytest.raises(ValueError, match="unknown class 'flu'"):
        config.class_index(["flu"])
    with pytest.raises(ValueError, match="norm_num_groups"):
        DiffusionConfig(image_size=16, block_out_channels=(6, 16), norm_num_groups=4)
    with pytest.raises(ValueError, match="not divisible"):
        DiffusionConfig(image_size=18, block_out_channels=(8, 16, 16), norm_num_groups=4)
    latent = DiffusionConfig(image_size=32, latent=True, vae_block_out_channels=(8, 8, 8), norm_num_groups=4,
                             block_out_channels=(8, 16))
    assert latent.sample_size == 8 and latent.sample_channels == 4


def test_v_prediction_keeps_the_first_sampling_step_bounded():
    """Sampling starts at the last training step, where the cosine schedule leaves ~1e-9 of the signal:
    an epsilon model's image estimate there multiplies its error by ~2e4, v prediction's does not."""
    assert DiffusionConfig().prediction_type == "v_prediction"
    errors = {}
    for kind in ("epsilon", "v_prediction"):
        config = DiffusionConfig(**TINY | {"num_train_timesteps": 1000}, prediction_type=kind)
        scheduler = sampling_scheduler(config)
        assert scheduler.config.prediction_type == kind
        scheduler.set_timesteps(10)
        first = int(scheduler.timesteps[0])
        assert first == 999
        generator = torch.Generator().manual_seed(0)
        clean = torch.rand((2, 1, 16, 16), generator=generator) * 2 - 1
        noise = torch.randn((2, 1, 16, 16), generator=generator)
        alpha = scheduler.alphas_cumprod[first]
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        target = noise if kind == "epsilon" else alpha.sqrt() * noise - (1 - alpha).sqrt() * clean
        scheduler.config.clip_sample = False  # measure the raw estimate
        estimate = scheduler.step(target + 0.01, first, noisy).pred_original_sample
        errors[kind] = float((estimate - clean).abs().max())
        assert errors[kind] == pytest.approx(0.01 * x0_error_gain(config, first), rel=0.05)
    assert errors["epsilon"] > 100.0 > 1.0 > errors["v_prediction"]
    assert x0_error_gain(DiffusionConfig(**TINY, prediction_type="epsilon"), 0) < 0.1
    with pytest.raises(ValueError, match="outside 0..49"):
        x0_error_gain(DiffusionConfig(**TINY), 50)


def test_v_prediction_model_trains_and_samples_images_in_range(tmp_path):
    images, labels = _images(n=12)
    result = train_diffusion(images, labels, tmp_path, _config())
    assert result.model.config.prediction_type == "v_prediction"
    reloaded = DiffusionModel.from_pretrained(result.model_dir)
    assert reloaded.config.prediction_type == "v_prediction"
    assert reloaded.sample(["covid", "normal"], num_inference_steps=3).shape == (2, 16, 16)


def test_command_line_chooses_the_prediction_type():
    from cxrlib.train.diffusion import build_parser

    assert build_parser().parse_args(["m.csv", "out"]).prediction_type == "v_prediction"
    assert build_parser().parse_args(["m.csv", "out", "--prediction-type", "epsilon"]).prediction_type == "epsilon"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["m.csv", "out", "--prediction-type", "sample"])


def test_model_range_round_trip():
    images = np.array([[[0, 128, 255]]], dtype=np.uint8)
    tensor = to_model_range(images)
    assert tensor.shape == (1, 1, 1, 3)
    assert tensor.min() == -1.0 and tensor.max() == 1.0
    from cxrlib.models.diffusion import to_uint8

    assert np.array_equal(to_uint8(tensor), images)


def test_guidance_mixes_conditional_and_unconditional_predictions():
    torch.manual_seed(0)
    model = DiffusionModel(DiffusionConfig(**TINY)).eval()
    x = torch.randn(2, 1, 16, 16)
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        cond = model.predict(x, 10, labels, 1.0)
        uncond = model.predict(x, 10, labels, 0.0)
        guided = model.predict(x, 10, labels, 3.0)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cond, uncond)  # the class embedding changes the prediction


def test_sampling_is_seeded_and_shaped():
    torch.manual_seed(0)
    model = DiffusionModel(DiffusionConfig(**TINY))
    first = model.sample(["covid", "normal", "covid"], num_inference_steps=2, guidance_scale=2.0, seed=5)
    again = model.sample(["covid", "normal", "covid"], num_inference_steps=2, guidance_scale=2.0, seed=5)
    other = model.sample(["covid", "normal", "covid"], num_inference_steps=2, guidance_scale=2.0, seed=6)
    assert first.shape == (3, 16, 16) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    images, labels = sample_per_class(model, SampleSpec(per_class={"normal": 2, "covid": 1}, num_inference_steps=2))
    assert images.shape == (3, 16, 16) and labels == ["normal", "normal", "covid"]
    # a class's images do not depend on how many of another class are drawn
    more, _ = sample_per_class(model, SampleSpec(per_class={"normal": 1, "covid": 1}, num_inference_steps=2))
    assert np.array_equal(more[1], images[2])


def test_inpaint_keeps_known_pixels_and_changes_masked_ones():
    torch.manual_seed(0)
    model = DiffusionModel(DiffusionConfig(**TINY))
    images = np.full((2, 16, 16), 90, np.uint8)
    masks = np.zeros((2, 16, 16), bool)
    masks[:, 4:8, 4:8] = True
    filled = model.inpaint(images, masks, num_inference_steps=2, resample=2, seed=0)
    assert filled.shape == images.shape and filled.dtype == np.uint8
    assert np.array_equal(filled[~masks], images[~masks])
    assert not np.array_equal(filled[masks], images[masks])
    with pytest.raises(ValueError, match="image_size"):
        model.inpaint(np.zeros((1, 8, 8), np.uint8), np.zeros((1, 8, 8), bool))


def test_training_learns_checkpoints_and_resumes(tmp_path):
    images, labels = _images()
    run = tmp_path / "run"
    result = train_diffusion(images, labels, run, _config(epochs=1, max_steps_per_epoch=3))
    assert (run / "last.pt").is_file() and (run / "config.json").is_file()
    assert (run / "model" / "unet").is_dir() and (run / "model" / "cxrlib_diffusion.json").is_file()
    assert len(result.history) == 1 and result.steps == 3
    assert result.checkpoint_name == "last_step3"
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["config"]["model"]["image_size"] == 16 and "ema" in checkpoint["state"]

    # resuming for one more epoch continues at epoch 2 and gives what an uninterrupted 2-epoch run gives
    resumed = train_diffusion(images, labels, run, _config(epochs=2, max_steps_per_epoch=3))
    straight = train_diffusion(images, labels, tmp_path / "straight", _config(epochs=2, max_steps_per_epoch=3))
    assert resumed.history["epoch"].tolist() == [1, 2] and resumed.steps == 6
    for a, b in zip(resumed.model.unet.parameters(), straight.model.unet.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # the model folder loads back with from_pretrained and samples the same images
    loaded = load_diffusion(run)
    a = loaded.sample(["covid"], num_inference_steps=2, seed=1)
    b = resumed.model.sample(["covid"], num_inference_steps=2, seed=1)
    assert np.array_equal(a, b)


def test_time_budget_stops_at_an_epoch_boundary_and_holds_over_resumes(tmp_path):
    images, labels = _images()
    run = tmp_path / "run"
    # a budget shorter than one epoch: the first epoch runs (nothing to estimate from yet), no second starts
    with pytest.warns(UserWarning, match="time budget of 0 s reached after epoch 1 of 4"):
        result = train_diffusion(images, labels, run, _config(epochs=4, max_steps_per_epoch=2, max_train_seconds=1e-3))
    assert result.stopped_by_budget and result.epochs_done == 1 and result.steps == 2
    assert result.history["epoch"].tolist() == [1] and result.train_seconds > 1e-3
    assert result.history["train_seconds"].iloc[-1] == pytest.approx(result.train_seconds, abs=1e-3)
    assert (run / "model" / "unet").is_dir()  # the budget-stopped model is saved like a finished one
    # resuming with the same budget trains nothing more: the clock is stored in the checkpoint
    with pytest.warns(UserWarning, match="budget"):
        again = train_diffusion(images, labels, run, _config(epochs=4, max_steps_per_epoch=2, max_train_seconds=1e-3))
    assert again.stopped_by_budget and again.epochs_done == 1 and again.steps == 2
    # without a budget the same run continues to its last epoch
    finished = train_diffusion(images, labels, run, _config(epochs=4, max_steps_per_epoch=2))
    assert not finished.stopped_by_budget and finished.epochs_done == 4 and finished.steps == 8
    assert finished.train_seconds > result.train_seconds
    # a generous budget changes nothing
    roomy = train_diffusion(images, labels, tmp_path / "roomy", _config(epochs=2, max_steps_per_epoch=2,
                                                                         max_train_seconds=3600))
    assert not roomy.stopped_by_budget and roomy.epochs_done == 2


def test_training_refuses_other_model_settings_and_bad_images(tmp_path):
    images, labels = _images()
    train_diffusion(images, labels, tmp_path, _config(epochs=1, max_steps_per_epoch=1))
    other = _config(model=DiffusionConfig(**{**TINY, "block_out_channels": (8, 8)}))
    with pytest.raises(ValueError, match="other model settings"):
        train_diffusion(images, labels, tmp_path, other)
    with pytest.raises(ValueError, match=r"\(N, 16, 16\)"):
        train_diffusion(images[:, :8, :8], labels, tmp_path / "x", _config())
    with pytest.raises(ValueError, match="unknown class"):
        train_diffusion(images, ["flu"] * len(images), tmp_path / "y", _config())


def test_training_reduces_the_loss(tmp_path):
    images, labels = _images(n=24)
    config = _config(epochs=6, max_steps_per_epoch=6, lr=3e-3)
    history = train_diffusion(images, labels, tmp_path, config).history
    assert history["train_loss"].iloc[-2:].mean() < history["train_loss"].iloc[:2].mean()


def test_latent_variant_trains_autoencoder_and_samples(tmp_path):
    images, labels = _images(n=6, size=16)
    model = DiffusionConfig(image_size=16, latent=True, vae_block_out_channels=(4, 4), latent_channels=2,
                            block_out_channels=(4, 8), norm_num_groups=4, num_train_timesteps=20)
    result = train_diffusion(images, labels, tmp_path, _config(model=model, epochs=1, max_steps_per_epoch=1,
                                                                vae_epochs=1))
    assert (tmp_path / "vae" / "last.pt").is_file() and (tmp_path / "model" / "vae").is_dir()
    assert result.model.config.vae_scaling_factor != 1.0  # measured on the training latents
    samples = result.model.sample(["normal", "covid"], num_inference_steps=2)
    assert samples.shape == (2, 16, 16)
    reloaded = load_diffusion(tmp_path)
    assert reloaded.config.latent and reloaded.config.vae_scaling_factor == pytest.approx(
        result.model.config.vae_scaling_factor)


def test_from_pretrained_offline_message(tmp_path):
    with pytest.raises(OSError, match="local_files_only=True: nothing is downloaded"):
        DiffusionModel.from_pretrained("nobody-here/no-such-model-xyz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiffusionModel.from_pretrained(tmp_path / "missing")


def test_bare_diffusers_unet_folder_loads_as_unconditional(tmp_path):
    from diffusers import UNet2DModel

    UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4, add_attention=False).save_pretrained(tmp_path / "bare")
    model = DiffusionModel.from_pretrained(tmp_path / "bare")
    assert not model.conditional
    assert model.config.prediction_type == "epsilon"  # diffusers' assumption without a scheduler config
    from diffusers import DDIMScheduler

    DDIMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "bare" / "scheduler")
    assert DiffusionModel.from_pretrained(tmp_path / "bare").config.prediction_type == "v_prediction"
    assert model.sample(None, n=2, num_inference_steps=2).shape == (2, 16, 16)


# ----------------------------------------------------------------------------- manifest rows and the grid


def _phantom_like_manifest(tmp_path) -> pd.DataFrame:
    from cxrlib.data.io import write_png

    rows = []
    rng = np.random.default_rng(0)
    for p in range(36):
        label = ("normal", "pneumonia", "covid")[p % 3]
        split = ("train", "train", "train", "val", "test")[p % 5]
        path = write_png(tmp_path / "images" / f"p{p}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
        rows.append({"image_id": f"p{p}", "path": path.relative_to(tmp_path).as_posix(), "label": label,
                     "patient_id": f"pat{p}", "source": "phantom", "view": "PA", "split": split,
                     "mask_path": "", "origin": "real", "site": f"s{p % 2}"})
    return mf.absolute_paths(pd.DataFrame(rows), tmp_path)


def test_sample_rows_are_train_only_and_pass_the_leakage_check(tmp_path):
    from cxrlib.stages.diffusion_reader_study import DIFFUSION, add_diffusion_rows, diffusion_rows

    manifest = _phantom_like_manifest(tmp_path)
    images = np.zeros((4, 16, 16), np.uint8)
    rows = diffusion_rows(manifest, images, ["covid", "covid", "normal", "pneumonia"], "last_step40",
                          tmp_path / "synthetic")
    assert rows["split"].eq("train").all() and rows["source"].eq("synthetic").all()
    assert rows["origin"].map(lambda o: mf.parse_origin(o)).tolist()[0] == (DIFFUSION, "last_step40", "")
    assert rows["label"].tolist() == ["covid", "covid", "normal", "pneumonia"]
    assert all((tmp_path / p).is_file() for p in rows["path"])
    combined = add_diffusion_rows(manifest, rows)
    assert mf.check_leakage(combined).ok
    # a diffusion row moved to test is reported
    leaked = combined.copy()
    leaked.loc[leaked["image_id"] == rows["image_id"].iloc[0], "split"] = "test"
    assert not mf.check_leakage(leaked, raise_on_leak=False).ok


def test_real_diffusion_condition_uses_only_train_diffusion_covid_rows(tmp_path):
    from cxrlib.stages import classifiers as ex
    from cxrlib.stages.diffusion_reader_study import add_diffusion_rows, diffusion_rows

    manifest = _phantom_like_manifest(tmp_path)
    assert "real_diffusion" in ex.available_conditions(manifest, ["real_diffusion"])
    rows = diffusion_rows(manifest, np.zeros((5, 16, 16), np.uint8), ["covid"] * 4 + ["normal"], "ck",
                          tmp_path / "synthetic")
    combined = add_diffusion_rows(manifest, rows)
    assert "real_diffusion" not in ex.available_conditions(combined, ["real_diffusion"])
    train, info = ex.training_rows(combined, "normal_vs_covid", "real_diffusion", None, seed=0)
    synthetic = train[train["origin"] != "real"]
    assert len(synthetic) == 4 and synthetic["label"].eq("covid").all()  # the normal sample stays out
    assert info["n_synthetic"] == 4 and info["n_synthetic_diffusion"] == 4
    # a G_NC row without a source image is still refused
    bad = combined.copy()
    bad.loc[len(bad)] = {**bad.iloc[0].to_dict(), "image_id": "x", "origin": "G_NC:ck", "label": "covid"}
    with pytest.raises(ValueError, match="name no real source image"):
        ex.synthetic_rows(bad, ["G_NC"])


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this PyTorch build has no torch.distributed with the Gloo backend")
def test_two_process_ddp_ranks_stop_together_when_one_runs_out_of_time(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(root / "tests" / "ddp_diffusion_worker.py"),
               "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # 8 images / 2 ranks / batch 2 = 2 steps per epoch; both ranks stopped after epoch 1
    assert (tmp_path / "out" / "rank0.txt").read_text().split() == ["1", "2", "True"]
    assert (tmp_path / "out" / "rank1.txt").read_text().split() == ["1", "2", "True"]
    rank0 = torch.load(tmp_path / "out" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "out" / "rank1.pt", weights_only=True)
    for name, value in rank0.items():
        assert torch.equal(rank1[name], value), f"ranks disagree on {name}"
