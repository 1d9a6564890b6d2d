"""CycleGAN networks and training: shapes, PatchGAN field, pool, schedule, learning, resume, DDP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlib.data import manifest as mf
from cxrlib.data.io import write_png
from cxrlib.models.cyclegan import (
    CycleGAN,
    CycleGANConfig,
    PatchDiscriminator,
    ResNetGenerator,
    UNetGenerator,
    build_discriminator,
    build_generator,
    count_parameters,
    patchgan_receptive_field,
)
from cxrlib.settings import from_mapping
from cxrlib.train import cyclegan as cg
from cxrlib.train.cyclegan import (
    LOSS_TERMS,
    CycleGANTrainConfig,
    CycleGANTrainer,
    DomainImageDataset,
    ImagePool,
    UnpairedImageDataset,
    load_generator,
    lr_factor,
    train_cyclegan,
    translate,
)
from cxrlib.train.engine import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def disc_images(count: int, disc_level: int, seed: int) -> np.ndarray:
    """``count`` 32x32 uint8 images: a disc of grey ``disc_level`` on a mid-grey noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images = []
    for _ in range(count):
        cy, cx, radius = rng.uniform(11, 21), rng.uniform(11, 21), rng.uniform(5, 9)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        images.append(np.clip(np.where(disc, disc_level, 128) + rng.normal(0, 6, (SIZE, SIZE)), 0, 255))
    return np.stack(images).astype(np.uint8)


@pytest.fixture(scope="module")
def domains() -> tuple[DomainImageDataset, DomainImageDataset]:
    """Dark discs (domain A, 8 images) and bright discs (domain B, 6 images)."""
    return DomainImageDataset(disc_images(8, 30, seed=1)), DomainImageDataset(disc_images(6, 230, seed=2))


def tiny_config(**changes) -> CycleGANTrainConfig:
    settings = dict(epochs=1, epochs_decay=1, batch_size=2, image_size=SIZE, pool_size=3,
                    model={"ngf": 8, "ndf": 8, "unet_depth": 3}, seed=3, device="cpu", progress=False,
                    max_steps_per_epoch=3, sample_every=0)
    return CycleGANTrainConfig(**{**settings, **changes})


class _Interrupt(Exception):
    pass


def _stop_after_first_epoch(record: dict) -> None:
    if record["epoch"] == 1:
        raise _Interrupt


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize("generator, size, extra", [
    ("unet", 32, {"unet_depth": 3}), ("unet", 64, {"unet_depth": 6}), ("unet", 48, {"unet_depth": 4}),
    ("resnet", 32, {"n_blocks": 2}), ("resnet", 44, {"n_blocks": 1}),
])
def test_generators_keep_shape_and_range(generator, size, extra):
    torch.manual_seed(0)
    cfg = CycleGANConfig(generator=generator, ngf=4, image_size=size, **extra)
    net = build_generator(cfg)
    images = torch.rand(2, 1, size, size) * 2 - 1
    out = net(images)
    assert out.shape == (2, 1, size, size) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert isinstance(net, UNetGenerator if generator == "unet" else ResNetGenerator)


def test_unet_depth_bounds_the_image_size():
    with pytest.raises(ValueError, match="multiple of 16"):
        CycleGANConfig(unet_depth=4, image_size=40)
    net = UNetGenerator(ngf=4, depth=3)
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.zeros(1, 1, 36, 36))
    with pytest.raises(ValueError, match="smallest input"):
        CycleGANConfig(generator="resnet", image_size=16)
    with pytest.raises(ValueError, match="norm"):
        CycleGANConfig(norm="batch")


def test_patchgan_sees_70x70_patches():
    assert patchgan_receptive_field(3) == 70
    assert [patchgan_receptive_field(n) for n in (1, 2)] == [16, 34]
    disc = build_discriminator(CycleGANConfig(image_size=128))
    assert disc(torch.zeros(1, 1, 128, 128)).shape == (1, 1, 14, 14)
    assert disc(torch.zeros(1, 1, 256, 256)).shape == (1, 1, 30, 30)
    assert disc.receptive_field == 70

    # Impulse response: which input pixels can move one output score? (No normalisation,
    # which would couple every pixel of the image.)
    torch.manual_seed(0)
    plain = build_discriminator(CycleGANConfig(image_size=128, norm="none"))
    image = torch.randn(1, 1, 128, 128, requires_grad=True)
    plain(image)[0, 0, 7, 7].backward()
    rows, cols = np.nonzero(image.grad[0, 0].numpy())
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70
    assert 0 < rows.min() and rows.max() < 127  # the field lies inside the image


def test_parameter_counts_match_the_documented_sizes():
    unet = build_generator(CycleGANConfig())
    resnet = build_generator(CycleGANConfig(generator="resnet", ngf=64))
    unet_128 = build_generator(CycleGANConfig(ngf=64, unet_depth=7, image_size=128))
    disc = build_discriminator(CycleGANConfig())
    assert count_parameters(unet) == pytest.approx(1.54e6, rel=0.01)
    assert count_parameters(resnet) == pytest.approx(11.36e6, rel=0.01)
    assert count_parameters(unet_128) == pytest.approx(41.8e6, rel=0.01)
    assert count_parameters(disc) == pytest.approx(2.76e6, rel=0.01)


def test_weights_start_from_a_narrow_normal_and_models_are_seeded():
    torch.manual_seed(0)
    first = CycleGAN(CycleGANConfig(ngf=8, ndf=8, image_size=64))
    torch.manual_seed(0)
    second = CycleGAN(CycleGANConfig(ngf=8, ndf=8, image_size=64))
    for name, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], value), name
    weights = torch.cat([m.weight.flatten() for m in first.modules() if isinstance(m, torch.nn.Conv2d)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert not torch.equal(first.G_AB.down[0][0].weight, first.G_BA.down[0][0].weight)


def test_stacking_images_in_one_pass_equals_separate_passes():
    # The training step relies on this: instance norm is per image.
    torch.manual_seed(0)
    gen = build_generator(CycleGANConfig(ngf=4, unet_depth=3, image_size=SIZE))
    disc: PatchDiscriminator = build_discriminator(CycleGANConfig(ndf=4, image_size=SIZE))
    a, b = torch.rand(2, 1, SIZE, SIZE), torch.rand(2, 1, SIZE, SIZE)
    torch.testing.assert_close(gen(torch.cat([a, b]))[:2], gen(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(disc(torch.cat([a, b]))[2:], disc(b), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- pool and schedule


def _constant_batch(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()


def test_image_pool_fills_then_mixes_old_and_new_images():
    torch.manual_seed(0)
    pool = ImagePool(4)
    first = _constant_batch([1, 2, 3])
    assert torch.equal(pool.query(first), first) and len(pool) == 3  # filling: inputs come back
    second = _constant_batch([4, 5])
    returned = pool.query(second)
    assert returned[0, 0, 0, 0] == 4 and len(pool) == 4  # the last free slot took image 4
    assert returned.shape == second.shape

    old, new = 0, 0
    for batch in range(100):
        values = [10.0 + 2 * batch, 11.0 + 2 * batch]
        out = pool.query(_constant_batch(values))[:, 0, 0, 0].tolist()
        assert len(pool) == 4 and pool.images.shape[0] == 4  # bounded
        for value, given in zip(out, values, strict=True):
            if value == given:
                new += 1
            else:
                old += 1
                assert value < given  # an earlier image
    assert 70 < old < 130 and old + new == 200  # about half come from the pool

    state = pool.state_dict()
    copy = ImagePool(4)
    copy.load_state_dict(state)
    assert torch.equal(copy.images, pool.images) and len(copy) == 4
    with pytest.raises(ValueError, match="size"):
        ImagePool(3).load_state_dict(state)
    assert torch.equal(ImagePool(0).query(first), first)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_learning_rate_is_constant_then_falls_linearly_to_zero():
    factors = [lr_factor(e, epochs=3, epochs_decay=4) for e in range(7)]
    assert factors == pytest.approx([1, 1, 1, 0.8, 0.6, 0.4, 0.2])
    assert lr_factor(7, 3, 4) == 0.0 and lr_factor(20, 3, 4) == 0.0
    # The reference's rule at its defaults (100 + 100 epochs): 1 - k / 101 in decay epoch k.
    assert lr_factor(99, 100, 100) == 1.0 and lr_factor(100, 100, 100) == pytest.approx(1 - 1 / 101)
    assert lr_factor(199, 100, 100) == pytest.approx(1 / 101)

    torch.manual_seed(0)
    config = tiny_config(epochs=2, epochs_decay=2, lr=1e-3)
    trainer = CycleGANTrainer(CycleGAN(config.model_config()), config)
    rates = []
    for _ in range(4):
        rates.append((trainer.lr, trainer.optimizer_D.param_groups[0]["lr"]))
        trainer.end_epoch()
    assert [g for g, _ in rates] == pytest.approx([1e-3, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    assert [d for _, d in rates] == [g for g, _ in rates]
    assert trainer.optimizer_G.param_groups[0]["betas"] == (0.5, 0.999)


# --------------------------------------------------------------------------- data


def test_unpaired_dataset_pairs_by_fresh_seeded_permutations(domains):
    domain_a, domain_b = domains
    pairs = UnpairedImageDataset(domain_a, domain_b, seed=7, hflip=False)
    assert len(pairs) == 8
    image_a, image_b = pairs[0]
    assert image_a.shape == (1, SIZE, SIZE) and image_a.dtype == torch.float32
    assert -1.0 <= image_a.min() and image_a.max() <= 1.0
    pairs.set_epoch(1)
    order_1 = (pairs.order_a.copy(), pairs.order_b.copy())
    assert sorted(order_1[0]) == list(range(8))  # every A image once
    assert np.bincount(order_1[1], minlength=6).min() >= 1  # every B image at least once
    pairs.set_epoch(2)
    assert not np.array_equal(pairs.order_a, order_1[0])
    again = UnpairedImageDataset(domain_a, domain_b, seed=7, hflip=False)
    again.set_epoch(1)
    assert np.array_equal(again.order_a, order_1[0]) and np.array_equal(again.order_b, order_1[1])
    first_a = again[0][0]
    assert torch.equal(first_a, domain_a[int(order_1[0][0])])

    flipping = UnpairedImageDataset(domain_a, domain_b, seed=7, hflip=True)
    flipping.set_epoch(1)
    index = int(np.argmax(flipping.flip_a))
    assert flipping.flip_a[index]
    assert torch.equal(flipping[index][0], domain_a[int(flipping.order_a[index])].flip(-1))


def test_domain_dataset_reads_a_manifest_once(tmp_path, monkeypatch):
    images = disc_images(3, 40, seed=4)
    rows = []
    for index, image in enumerate(images):
        big = np.kron(image, np.ones((2, 2), dtype=np.uint8))  # 64x64 on disk, resized to 32
        write_png(tmp_path / f"img{index}.png", big)
        rows.append({"image_id": f"img{index}", "path": f"img{index}.png"})
    manifest = mf.absolute_paths(pd.DataFrame(rows), tmp_path)
    dataset = DomainImageDataset(manifest, image_size=SIZE)
    assert dataset.images.shape == (3, SIZE, SIZE) and dataset.images.dtype == torch.uint8
    assert dataset.image_ids == ["img0", "img1", "img2"]
    assert np.abs(dataset.images.numpy().astype(int) - images.astype(int)).mean() < 8

    import cxrlib.data.io as io_module

    def no_reading(*args, **kwargs):
        raise AssertionError("an epoch must not read files")

    monkeypatch.setattr(io_module, "read_image", no_reading)
    pairs = UnpairedImageDataset(dataset, dataset)
    for epoch in range(2):
        pairs.set_epoch(epoch)
        _ = [pairs[i] for i in range(len(pairs))]
    with pytest.raises(ValueError, match="uint8"):
        DomainImageDataset(np.zeros((2, 8, 8), dtype=np.float32))


# --------------------------------------------------------------------------- training


def test_config_resolves_model_and_rejects_contradictions():
    resolved = CycleGANTrainConfig(image_size=64, model={"generator": "resnet"}).resolved()
    assert resolved.model["image_size"] == 64 and resolved.model["generator"] == "resnet"
    assert set(resolved.model) >= {"ngf", "ndf", "n_blocks", "unet_depth", "n_layers_d", "norm"}
    assert resolved.total_epochs == 100 and resolved.batch_size == 16 and resolved.lambda_id == 1.0
    with pytest.raises(ValueError, match="image_size"):
        CycleGANTrainConfig(image_size=64, model={"image_size": 128})
    with pytest.raises(ValueError, match="unknown CycleGANConfig"):
        CycleGANTrainConfig(model={"gf": 32})
    with pytest.raises(ValueError, match="multiple"):
        CycleGANTrainConfig(image_size=100)
    assert from_mapping(CycleGANTrainConfig, {"epochs": 3, "runtime": {}}, strict=False).epochs == 3


def test_training_step_returns_device_tensors_and_updates_all_networks(domains):
    torch.manual_seed(0)
    config = tiny_config()
    model = CycleGAN(config.model_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = CycleGANTrainer(model, config)
    real_a = torch.stack([domains[0][i] for i in range(2)])
    real_b = torch.stack([domains[1][i] for i in range(2)])
    terms = trainer.train_step(real_a, real_b)
    assert terms.shape == (len(LOSS_TERMS),) and not terms.requires_grad
    assert torch.isfinite(terms).all()
    loss_g, adv_ab, adv_ba, cycle_a, cycle_b, idt_a, idt_b = terms[:7].tolist()
    assert loss_g == pytest.approx(adv_ab + adv_ba + 10 * (cycle_a + cycle_b) + 10 * (idt_a + idt_b), rel=1e-5)
    for net in ("G_AB", "G_BA", "D_A", "D_B"):
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.startswith(net)), net
    assert all(p.requires_grad for p in model.parameters())  # discriminators unfrozen again
    assert len(trainer.pool_A) == 2 and len(trainer.pool_B) == 2

    no_identity = CycleGANTrainer(CycleGAN(config.model_config()), replace(config, lambda_id=0.0))
    terms = no_identity.train_step(real_a, real_b)
    assert terms[5].item() == 0.0 and terms[6].item() == 0.0


def test_training_on_discs_reduces_the_cycle_loss(domains, tmp_path):
    config = tiny_config(epochs=6, epochs_decay=0, lr=1e-3, max_steps_per_epoch=None, sample_every=3,
                         n_samples=2)
    result = train_cyclegan(*domains, tmp_path / "run", config)
    history = result.history
    assert history["epoch"].tolist() == list(range(1, 7))
    assert set(LOSS_TERMS) <= set(history.columns)
    cycle = history["cycle_A"] + history["cycle_B"]
    assert cycle.iloc[-1] < 0.8 * cycle.iloc[0]
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["epoch_003.png", "epoch_006.png"]
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "epoch_006.png"))
    assert grid.shape == (6 * SIZE + 5 * 2, 2 * SIZE + 2) and grid.dtype == np.uint8
    assert not result.G_AB.training and result.checkpoint_path == tmp_path / "run" / "last.pt"

    # translate(): uint8 in, uint8 out, the same from an array, a tensor and a dataset.
    images = domains[0].images.numpy()
    from_array = translate(result.G_AB, images, batch_size=3)
    assert from_array.dtype == np.uint8 and from_array.shape == images.shape
    assert np.array_equal(translate(result.G_AB, torch.from_numpy(images[:, None]), batch_size=8), from_array)
    assert np.array_equal(translate(result.G_AB, domains[0], batch_size=5, device="cpu"), from_array)
    assert translate(result.G_BA, images[:0]).shape == (0, 0, 0)

    # load_generator() rebuilds the same network from the run folder, without touching the RNG.
    state = torch.get_rng_state()
    reloaded = load_generator(tmp_path / "run", "G_AB")
    assert torch.equal(torch.get_rng_state(), state)
    assert not reloaded.training
    assert np.array_equal(translate(reloaded, images), from_array)
    with pytest.raises(ValueError, match="which"):
        load_generator(tmp_path / "run", "D_A")


def test_interrupted_run_resumes_to_the_same_weights(domains, tmp_path):
    config = tiny_config(epochs=1, epochs_decay=1, max_steps_per_epoch=None)
    straight = train_cyclegan(*domains, tmp_path / "straight", config)
    assert straight.history["epoch"].tolist() == [1, 2]
    assert (tmp_path / "straight" / "config.json").is_file()

    interrupted = tmp_path / "interrupted"
    with pytest.raises(_Interrupt):
        train_cyclegan(*domains, interrupted, config, on_epoch_end=_stop_after_first_epoch)
    assert read_checkpoint(interrupted / "last.pt")["epoch"] == 1
    epochs_run: list[int] = []
    resumed = train_cyclegan(*domains, interrupted, config,
                             on_epoch_end=lambda record: epochs_run.append(record["epoch"]))
    assert epochs_run == [2]
    assert resumed.history["epoch"].tolist() == [1, 2]
    pd.testing.assert_frame_equal(resumed.history.drop(columns="time_s"), straight.history.drop(columns="time_s"))

    final_straight = read_checkpoint(tmp_path / "straight" / "last.pt")
    final_resumed = read_checkpoint(interrupted / "last.pt")
    assert final_resumed["step"] == final_straight["step"] == 8
    for name, value in final_straight["model"].items():
        assert torch.equal(final_resumed["model"][name], value), name
    for which in ("optimizer_G", "optimizer_D"):
        for key, state in final_straight["state"][which]["state"].items():
            for name, value in state.items():
                assert torch.equal(final_resumed["state"][which]["state"][key][name], value), (which, key, name)
    for which in ("scheduler_G", "scheduler_D"):
        assert final_resumed["state"][which] == final_straight["state"][which]
    for which in ("pool_A", "pool_B"):
        assert final_resumed["state"][which]["count"] == 3
        assert torch.equal(final_resumed["state"][which]["images"], final_straight["state"][which]["images"])

    # A finished run only loads: no epoch runs again, and the weights are the trained ones.
    again: list[int] = []
    loaded = train_cyclegan(*domains, interrupted, config, on_epoch_end=lambda record: again.append(record["epoch"]))
    assert again == []
    for name, value in straight.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name


def test_resume_with_other_model_settings_is_refused(domains, tmp_path):
    with pytest.raises(_Interrupt):
        train_cyclegan(*domains, tmp_path, tiny_config(), on_epoch_end=_stop_after_first_epoch)
    with pytest.raises(ValueError, match="last.pt.*other model settings"):
        train_cyclegan(*domains, tmp_path, tiny_config(model={"ngf": 4, "ndf": 8, "unet_depth": 3}))
    fresh = train_cyclegan(*domains, tmp_path, tiny_config(epochs=1, epochs_decay=0), resume=False)
    assert fresh.history["epoch"].tolist() == [1]


# --------------------------------------------------------------------------- command line and torchrun


def write_disc_cohort(folder: Path) -> Path:
    """Dark- and bright-disc PNGs with a manifest (train split) in ``folder``; returns its path."""
    rows = []
    for label, level, seed in (("Dark", 30, 1), ("Bright", 230, 2)):
        for index, image in enumerate(disc_images(4, level, seed)):
            image_id = f"{label.lower()}{index}"
            write_png(folder / "images" / f"{image_id}.png", image)
            rows.append({"image_id": image_id, "path": f"images/{image_id}.png", "label": label,
                         "patient_id": image_id, "source": "discs", "view": "PA", "split": "train",
                         "mask_path": "", "origin": "real"})
    from cxrlib.data.manifest import write_manifest

    return write_manifest(pd.DataFrame(rows), folder / "manifest.csv", labels=["Dark", "Bright"])


def test_every_command_line_option_has_help():
    parser = cg.build_parser()
    for action in parser._actions:
        assert action.help, f"option {action.option_strings} has no help text"
    args = parser.parse_args(["--manifest", "m.csv", "--domain-a", "Normal", "--domain-b", "COVID-19",
                              "--run-dir", "r", "--epochs", "3", "--no-amp"])
    assert args.epochs == 3 and args.amp is False and args.domain_b == "COVID-19"


def test_command_line_trains_from_a_manifest_file(tmp_path):
    manifest_path = write_disc_cohort(tmp_path / "cohort")
    code = cg.main(["--manifest", str(manifest_path), "--domain-a", "Dark", "--domain-b", "Bright",
                    "--run-dir", str(tmp_path / "cli"), "--epochs", "1", "--epochs-decay", "0",
                    "--image-size", str(SIZE), "--unet-depth", "3", "--ngf", "4", "--ndf", "4", "--batch-size", "2",
                    "--device", "cpu", "--no-progress"])
    assert code == 0
    assert {"last.pt", "config.json", "history.jsonl", "samples"} <= {p.name for p in (tmp_path / "cli").iterdir()}
    saved = read_checkpoint(tmp_path / "cli" / "last.pt")
    assert saved["config"]["model"]["ngf"] == 4 and saved["step"] == 2
    with pytest.raises(SystemExit):
        cg.main(["--manifest", str(manifest_path), "--domain-a", "Dark", "--domain-b", "COVID-19",
                 "--run-dir", str(tmp_path / "none")])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this PyTorch build has no torch.distributed with the Gloo backend")
def test_two_process_ddp_training_keeps_ranks_in_sync(tmp_path):
    manifest_path = write_disc_cohort(tmp_path / "cohort")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(ROOT / "tests" / "ddp_cyclegan_worker.py"), "--manifest", str(manifest_path),
               "--root", str(tmp_path / "cohort"), "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "weights")]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    initial = torch.load(tmp_path / "weights" / "initial.pt", weights_only=True)
    rank0 = torch.load(tmp_path / "weights" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "weights" / "rank1.pt", weights_only=True)
    for name, value in rank0.items():
        assert torch.equal(rank1[name], value), f"ranks disagree on {name}"
    for net in ("G_AB", "G_BA", "D_A", "D_B"):
        assert any(not torch.equal(initial[k], rank0[k]) for k in rank0 if k.startswith(net)), f"{net} did not train"
    history = pd.read_json(tmp_path / "run" / "history.jsonl", lines=True)
    assert history["epoch"].tolist() == [1, 2]
    saved = read_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["extra"]["run"]["world_size"] == 2 and saved["step"] == 2  # 4 pairs / 2 ranks / batch 2, twice
    for name, value in saved["model"].items():
        assert torch.equal(rank0[name], value), name
