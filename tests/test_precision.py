"""The precision policy: how ``precision`` resolves per device, that every training config carries
it and records what ran, and that bf16 autocast changes speed, not results.

The equivalence tests train the same small fixed problem in fp32 and in bf16 and compare the
quality each reaches, within the tolerances stated below. They need a CPU with native bf16
(``avx512_bf16`` or ``amx_bf16``): elsewhere PyTorch emulates bf16, slower than fp32, and
they are skipped with that reason.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from cxrlib.config import cpu_description
from cxrlib.evaluate.classification import binary_metrics
from cxrlib.models.cyclegan import CycleGAN, CycleGANConfig, build_generator, count_parameters
from cxrlib.settings import add_arguments, from_arguments
from cxrlib.textclean import TextSegConfig
from cxrlib.train.classifier import ClassifierTrainConfig, predict_proba, train_classifier
from cxrlib.train.cyclegan import CycleGANTrainConfig, CycleGANTrainer, train_cyclegan, translate
from cxrlib.train.diffusion import DiffusionTrainConfig
from cxrlib.train.engine import (
    PRECISIONS,
    DistContext,
    Precision,
    as_precision,
    cpu_has_native_bf16,
    read_checkpoint,
    resolve_precision,
)
from cxrlib.train.segmentation import SegTrainConfig, predict_masks, train_segmentation

pytestmark = pytest.mark.usefixtures("one_thread")

WITH_BF16 = {"avx512_bf16": True, "amx_bf16": False}
WITH_AMX_ONLY = {"avx512_bf16": False, "amx_bf16": True}
WITHOUT_BF16 = {"avx512_bf16": False, "amx_bf16": False}

NATIVE_BF16 = cpu_has_native_bf16()
needs_native_bf16 = pytest.mark.skipif(
    not NATIVE_BF16,
    reason=f"this CPU ({cpu_description()['model']}) has no native bf16 (no avx512_bf16 / amx_bf16 flag): "
           "bf16 would be emulated, so the fp32-vs-bf16 training equivalence is not tested here",
)

# Tolerances of the equivalence tests: |quality(bf16) - quality(fp32)| at most this, and both
# at least the floor (so that two failed trainings cannot agree by accident).
# Measured on the problems below over training seeds 0-3 (segmentation), 0-1 (classifier) and 0-2
# (CycleGAN): Dice 0.94-0.96 with |bf16 - fp32| <= 0.002 (seed to seed: 0.015); AUC 0.94-0.97 with
# |bf16 - fp32| <= 0.015; cycle error 0.095-0.125 with a relative bf16 - fp32 difference <= 8 %,
# oracle rate 1.0 in both, translated disc levels within 0.07.
DICE_TOLERANCE, DICE_FLOOR = 0.02, 0.9
AUC_TOLERANCE, AUC_FLOOR = 0.03, 0.9
CYCLE_TOLERANCE = 0.2  # relative difference of the mean cycle-reconstruction error
ORACLE_TOLERANCE, ORACLE_FLOOR = 0.125, 0.9  # 2 of the 16 held-out images
LEVEL_TOLERANCE = 0.15  # mean grey level (in [-1, 1]) of the translated discs


# --------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("flags, expected", [(WITH_BF16, "bf16"), (WITH_AMX_ONLY, "bf16"), (WITHOUT_BF16, "fp32")])
def test_auto_on_a_cpu_follows_its_bf16_flags(flags, expected):
    precision = resolve_precision("auto", "cpu", cpu=flags)
    assert precision.name == expected and precision.device_type == "cpu" and precision.requested == "auto"
    assert ("native bf16" in precision.reason) and (("no" in precision.reason) == (expected == "fp32"))
    assert not precision.scales_gradients


def test_auto_on_cuda_takes_bf16_where_supported_else_fp16_with_scaling():
    # torch.device("cuda") needs no GPU; the GPU's bf16 support is given instead of detected.
    bf16 = resolve_precision("auto", "cuda", cuda_bf16=True)
    fp16 = resolve_precision("auto", "cuda:0", cuda_bf16=False)
    assert (bf16.name, bf16.dtype, bf16.scales_gradients) == ("bf16", torch.bfloat16, False)
    assert (fp16.name, fp16.dtype, fp16.scales_gradients) == ("fp16", torch.float16, True)
    assert fp16.device_type == "cuda" and "no bf16" in fp16.reason
    assert resolve_precision("fp16", "cuda", cuda_bf16=True).name == "fp16"
    with pytest.raises(ValueError, match="no bf16 support"):
        resolve_precision("bf16", "cuda", cuda_bf16=False)


def test_fp16_on_the_cpu_is_refused_with_the_alternative():
    with pytest.raises(ValueError, match="'fp16' is for CUDA.*use 'bf16'"):
        resolve_precision("fp16", "cpu", cpu=WITH_BF16)


def test_bf16_on_a_cpu_without_native_bf16_runs_emulated_with_a_warning():
    with pytest.warns(UserWarning, match="emulates"):
        precision = resolve_precision("bf16", "cpu", cpu=WITHOUT_BF16)
    assert precision.name == "bf16" and "emulated" in precision.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", "cpu", cpu=WITH_BF16).name == "bf16"


def test_fp32_is_fp32_except_the_former_cuda_amp_switch():
    assert resolve_precision("fp32", "cpu", amp=True).name == "fp32"
    assert resolve_precision("fp32", "cuda", amp=False, cuda_bf16=True).name == "fp32"
    legacy = resolve_precision("fp32", "cuda", amp=True, cuda_bf16=True)
    assert legacy.name == "fp16" and legacy.scales_gradients and "amp" in legacy.reason
    assert resolve_precision("auto", "cuda", amp=False, cuda_bf16=True).name == "bf16"  # amp only qualifies fp32


def test_other_devices_and_unknown_names():
    assert resolve_precision("auto", "mps").name == "fp32"
    with pytest.raises(ValueError, match="CPU and CUDA only"):
        resolve_precision("bf16", "mps")
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        resolve_precision("float16", "cpu")
    assert resolve_precision(" BF16 ", "cpu", cpu=WITH_BF16).name == "bf16"


def test_cpu_detection_reads_the_flags_of_this_machine():
    description = cpu_description()
    assert cpu_has_native_bf16() == bool(description["avx512_bf16"] or description["amx_bf16"])
    assert cpu_has_native_bf16(WITH_AMX_ONLY) and not cpu_has_native_bf16(WITHOUT_BF16)


def test_autocast_and_scaler_of_a_resolved_precision():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with Precision("bf16", "cpu").autocast():
        assert (a @ b).dtype == torch.bfloat16
    with Precision("fp32", "cpu").autocast():
        assert (a @ b).dtype == torch.float32
    scaler = Precision("bf16", "cpu").grad_scaler()
    loss = torch.tensor(3.0, requires_grad=True)
    assert not scaler.is_enabled() and scaler.scale(loss) is loss
    record = resolve_precision("auto", "cpu", cpu=WITHOUT_BF16).record()
    assert record["precision"] == "fp32" and record["precision_requested"] == "auto"
    json.dumps(record)  # plain data for checkpoints and metrics.json


def test_as_precision_keeps_a_resolved_one_and_resolves_names():
    resolved = Precision("bf16", "cpu", "auto", "test")
    assert as_precision(resolved, "cpu") is resolved
    assert as_precision("fp32", torch.device("cpu")).name == "fp32"
    assert as_precision(Precision("fp16", "cuda"), "cuda", amp=False).name == "fp16"
    with pytest.raises(ValueError, match="is for CUDA"):
        as_precision(Precision("fp16", "cuda"), "cpu")  # a CUDA choice does not carry over to the CPU


# --------------------------------------------------------------------------- configs


TRAIN_CONFIGS = [SegTrainConfig, CycleGANTrainConfig, ClassifierTrainConfig, DiffusionTrainConfig, TextSegConfig]


@pytest.mark.parametrize("config_class", TRAIN_CONFIGS, ids=lambda cls: cls.__name__)
def test_every_training_config_has_a_precision_field_defaulting_to_fp32(config_class):
    field = {f.name: f for f in dataclasses.fields(config_class)}["precision"]
    assert field.default == "fp32" and field.metadata["help"] and tuple(field.metadata["choices"]) == PRECISIONS
    assert config_class(precision="auto").precision == "auto"
    with pytest.raises(ValueError, match="precision"):
        config_class(precision="half")


def test_precision_is_a_command_line_option():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser, SegTrainConfig, exclude=("unet", "partial_labels"))
    assert from_arguments(SegTrainConfig, parser.parse_args(["--precision", "auto"])).precision == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp8"])


# --------------------------------------------------------------------------- small fixed problems


class _Pairs(Dataset):
    """``(image float32 (1, S, S), target)`` items from two aligned tensors; ``labels`` for classifiers."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.targets = images, targets
        self.labels = targets.numpy() if targets.ndim == 1 else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


def lung_problem(n: int, seed: int, size: int = 32) -> _Pairs:
    """Two dark elliptic lungs (labels 1, 2) on a bright, noisy background, jittered in place and size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels = [], []
    for _ in range(n):
        cy, ry, rx = size / 2 + rng.uniform(-2, 2), size * rng.uniform(0.3, 0.4), size * rng.uniform(0.12, 0.17)
        label = np.zeros((size, size), np.int64)
        for value, cx in ((1, size * 0.7), (2, size * 0.3)):
            label[((yy - cy) / ry) ** 2 + ((xx - cx - rng.uniform(-1, 1)) / rx) ** 2 <= 1] = value
        image = np.where(label > 0, 0.35, 0.55) + rng.normal(0, 0.15, (size, size))
        images.append(np.clip(image, 0, 1))
        labels.append(label)
    return _Pairs(torch.tensor(np.stack(images)[:, None], dtype=torch.float32), torch.from_numpy(np.stack(labels)))


def blob_problem(n: int, seed: int, size: int = 32) -> _Pairs:
    """Noisy grey images; the positive half (label 1) carries a faint bright blob somewhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels = [], []
    for index in range(n):
        image = 0.45 + rng.normal(0, 0.08, (size, size))
        positive = index % 2
        if positive:
            cy, cx = rng.uniform(8, size - 8, 2)
            image += 0.06 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
        images.append(np.clip(image, 0, 1))
        labels.append(positive)
    return _Pairs(torch.tensor(np.stack(images)[:, None], dtype=torch.float32), torch.tensor(labels))


def disc_domain(n: int, level: float, seed: int, size: int = 32) -> torch.Tensor:
    """``(n, 1, S, S)`` float32 in [-1, 1]: a disc of grey ``level`` (in [-1, 1]) on mid grey, noisy."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = []
    for _ in range(n):
        cy, cx, radius = *rng.uniform(11, size - 11, 2), rng.uniform(6, 9)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        images.append(np.clip(np.where(disc, level, 0.0) + rng.normal(0, 0.05, (size, size)), -1, 1))
    return torch.tensor(np.stack(images)[:, None], dtype=torch.float32)


class _Images(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def segmentation_dice(precision: str, run_dir) -> tuple[float, str]:
    config = SegTrainConfig(epochs=8, batch_size=8, lr=1e-2, image_size=32, augment=False, seed=0, device="cpu",
                            progress=False, precision=precision, unet={"base_channels": 8, "depth": 2})
    result = train_segmentation(lung_problem(64, seed=1), lung_problem(12, seed=2), run_dir, config)
    return result.best_val_dice, result.precision


def classifier_auc(precision: str, run_dir) -> tuple[float, str]:
    config = ClassifierTrainConfig(arch="small_cnn", classes=["negative", "positive"], image_size=32, augment="none",
                                   epochs=6, batch_size=16, lr=3e-3, patience=None, imbalance="none", seed=0,
                                   device="cpu", progress=False, precision=precision)
    result = train_classifier(blob_problem(64, seed=3), blob_problem(32, seed=4), run_dir, config)
    test = blob_problem(64, seed=5)
    prob = predict_proba(result, test, precision=result.config.precision)[:, 1]
    return binary_metrics(test.targets.numpy(), np.stack([1 - prob, prob], axis=1), 0.5)["auc_roc"], result.config.precision


def cyclegan_scores(precision: str, run_dir) -> tuple[float, float, float, str]:
    """Dark discs (A) to bright discs (B): the mean |G_BA(G_AB(A)) - A| in [-1, 1] units, the oracle rate
    (share of held-out G_AB(A) whose disc reads as bright), the mean grey level of those discs, the precision."""
    domain_a, domain_b = disc_domain(12, -0.8, seed=6), disc_domain(12, 0.8, seed=7)
    config = CycleGANTrainConfig(epochs=3, epochs_decay=0, batch_size=2, image_size=32, pool_size=4, lr=1e-3,
                                 model={"generator": "resnet", "ngf": 8, "ndf": 8, "n_blocks": 2}, seed=0,
                                 device="cpu", progress=False, sample_every=0, precision=precision)
    result = train_cyclegan(_Images(domain_a), _Images(domain_b), run_dir, config)
    held_out = disc_domain(16, -0.8, seed=8)
    fake_b = torch.from_numpy(translate(result.G_AB, held_out, precision=result.precision)).float() / 127.5 - 1
    back = torch.from_numpy(translate(result.G_BA, fake_b, precision=result.precision)).float() / 127.5 - 1
    cycle_error = float((back - held_out[:, 0]).abs().mean())
    disc = held_out[:, 0] < -0.4  # where the dark disc of each source image is
    disc_means = (fake_b * disc).sum(dim=(1, 2)) / disc.sum(dim=(1, 2))
    oracle_rate = float((disc_means > 0.0).float().mean())  # a bright disc: reads as domain B
    return cycle_error, oracle_rate, float(disc_means.mean()), result.precision


@needs_native_bf16
def test_bf16_segmentation_reaches_the_fp32_dice(tmp_path):
    dice_fp32, ran_fp32 = segmentation_dice("fp32", tmp_path / "fp32")
    dice_bf16, ran_bf16 = segmentation_dice("bf16", tmp_path / "bf16")
    print(f"segmentation val Dice: fp32 {dice_fp32:.4f}, bf16 {dice_bf16:.4f} (tolerance {DICE_TOLERANCE})")
    assert (ran_fp32, ran_bf16) == ("fp32", "bf16")
    assert min(dice_fp32, dice_bf16) >= DICE_FLOOR
    assert abs(dice_bf16 - dice_fp32) <= DICE_TOLERANCE


@needs_native_bf16
def test_bf16_classifier_reaches_the_fp32_auc(tmp_path):
    auc_fp32, _ = classifier_auc("fp32", tmp_path / "fp32")
    auc_bf16, ran = classifier_auc("bf16", tmp_path / "bf16")
    print(f"classifier test AUC: fp32 {auc_fp32:.4f}, bf16 {auc_bf16:.4f} (tolerance {AUC_TOLERANCE})")
    assert ran == "bf16" and min(auc_fp32, auc_bf16) >= AUC_FLOOR
    assert abs(auc_bf16 - auc_fp32) <= AUC_TOLERANCE


@needs_native_bf16
def test_bf16_cyclegan_translates_and_reconstructs_like_fp32(tmp_path):
    cycle_fp32, oracle_fp32, level_fp32, _ = cyclegan_scores("fp32", tmp_path / "fp32")
    cycle_bf16, oracle_bf16, level_bf16, ran = cyclegan_scores("bf16", tmp_path / "bf16")
    print(f"cyclegan cycle error: fp32 {cycle_fp32:.4f}, bf16 {cycle_bf16:.4f}; oracle rate: fp32 {oracle_fp32:.3f}, "
          f"bf16 {oracle_bf16:.3f}; disc level: fp32 {level_fp32:.3f}, bf16 {level_bf16:.3f}")
    assert ran == "bf16"
    assert abs(cycle_bf16 - cycle_fp32) <= CYCLE_TOLERANCE * cycle_fp32
    assert min(oracle_fp32, oracle_bf16) >= ORACLE_FLOOR
    assert abs(oracle_bf16 - oracle_fp32) <= ORACLE_TOLERANCE
    assert abs(level_bf16 - level_fp32) <= LEVEL_TOLERANCE


# --------------------------------------------------------------------------- what is recorded


def test_checkpoint_and_config_json_record_the_resolved_precision(tmp_path):
    expected = "bf16" if NATIVE_BF16 else "fp32"
    config = SegTrainConfig(epochs=1, batch_size=4, image_size=32, augment=False, device="cpu", progress=False,
                            precision="auto", unet={"base_channels": 4, "depth": 2}, max_steps_per_epoch=2)
    result = train_segmentation(lung_problem(8, seed=1), lung_problem(4, seed=2), tmp_path / "run", config)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    run = read_checkpoint(tmp_path / "run" / "last.pt")["extra"]["run"]
    assert saved["precision"] == expected == result.precision
    assert run["precision"] == expected and run["precision_requested"] == "auto" and run["precision_reason"]
    # Resuming on the same machine with "auto" again is the same run: nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_segmentation(lung_problem(8, seed=1), lung_problem(4, seed=2), tmp_path / "run", config)
    masks = predict_masks(result.model, lung_problem(2, seed=9).images, precision="auto")
    assert masks.shape == (2, 32, 32) and masks.dtype == np.uint8


def test_trainer_resolves_the_config_precision_and_keeps_optimizer_state_float32():
    config = CycleGANTrainConfig(epochs=1, epochs_decay=0, batch_size=1, image_size=32, pool_size=2,
                                 model={"generator": "resnet", "ngf": 4, "ndf": 4, "n_blocks": 1}, device="cpu",
                                 progress=False, precision="auto")
    torch.manual_seed(0)
    model = CycleGAN(config.model_config())
    trainer = CycleGANTrainer(model, config, DistContext())
    assert trainer.precision.name == ("bf16" if NATIVE_BF16 else "fp32")
    terms = trainer.train_step(disc_domain(1, -0.8, seed=1), disc_domain(1, 0.8, seed=2))
    assert terms.dtype == torch.float32 and torch.isfinite(terms).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    states = [s for s in trainer.optimizer_G.state.values()] + [s for s in trainer.optimizer_D.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)


# --------------------------------------------------------------------------- resize-convolution generators


@pytest.mark.parametrize("upsample", ["resize_conv", "blurred_transpose"])
@pytest.mark.parametrize("generator, extra", [("resnet", {"n_blocks": 2}), ("unet", {"unet_depth": 3})])
def test_checkerboard_free_generators_build_keep_shapes_and_train(generator, extra, upsample):
    from cxrlib.models.cyclegan import BlurredConvTranspose2d

    cfg = CycleGANConfig(generator=generator, ngf=8, ndf=8, image_size=32, upsample=upsample, **extra)
    net = build_generator(cfg)
    n_up = 2 if generator == "resnet" else 3
    if upsample == "resize_conv":
        assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())
        assert sum(isinstance(m, torch.nn.Upsample) for m in net.modules()) == n_up
    else:
        ups = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
        assert len(ups) == n_up and all(isinstance(m, BlurredConvTranspose2d) for m in ups)
        assert all(m.weight.shape[-2:] == (3, 3) and m.blurred_weight().shape[-2:] == (4, 4) for m in ups)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    y = net(x)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    with pytest.raises(ValueError, match="upsample"):
        CycleGANConfig(upsample="pixel_shuffle")

    config = CycleGANTrainConfig(epochs=1, epochs_decay=0, batch_size=1, image_size=32, pool_size=2,
                                 model=dataclasses.asdict(cfg) | {"image_size": 32}, device="cpu", progress=False)
    torch.manual_seed(0)
    model = CycleGAN(config.model_config())
    before = {name: p.detach().clone() for name, p in model.G_AB.named_parameters()}
    terms = CycleGANTrainer(model, config, DistContext()).train_step(x[:1], x[1:2])
    assert torch.isfinite(terms).all()
    assert all(not torch.equal(before[name], p) for name, p in model.G_AB.named_parameters())


def test_resize_conv_has_no_checkerboard_at_initialisation():
    """A constant input gives a constant output away from the borders: every output pixel has the
    same number of kernel taps. A stride-2 3x3 transposed convolution does not (its checkerboard)."""
    torch.manual_seed(0)
    from cxrlib.models.cyclegan import upsampling_layer

    x = torch.ones(1, 4, 8, 8)
    for kind, checkerboard in (("transpose", True), ("resize_conv", False), ("blurred_transpose", False)):
        layer = upsampling_layer(kind, 4, 1, kernel_size=3, bias=False)
        torch.nn.init.constant_(next(layer.parameters()), 1.0)
        inner = layer(x)[0, 0, 2:-2, 2:-2]
        assert inner.shape == (12, 12)
        assert (inner.std() > 1e-3) == checkerboard


def test_blurred_transpose_is_a_box_filtered_transposed_convolution_and_a_resize_convolution():
    """Its output is the plain 3x3 layer's output filtered by the 2x2 box (whose response at the
    Nyquist frequency is zero), and, away from the borders, a quarter of a nearest resize + 3x3
    convolution with the flipped kernel."""
    from cxrlib.models.cyclegan import upsampling_layer

    torch.manual_seed(0)
    layer = upsampling_layer("blurred_transpose", 4, 2, kernel_size=4, bias=False)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        y = layer(x)
        assert y.shape == (2, 2, 16, 16)
        full = torch.nn.functional.conv_transpose2d(x, layer.weight, stride=2)  # (N, out, 17, 17)
        boxed = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(full, (1, 1, 1, 1)), 2, stride=1)
        assert torch.allclose(boxed[..., 1:17, 1:17], y, atol=1e-6)
        resized = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        conv = torch.nn.functional.conv2d(resized, layer.weight.flip(-1, -2).transpose(0, 1), padding=1) / 4
        assert torch.allclose(conv[..., 1:-1, 1:-1], y[..., 1:-1, 1:-1], atol=1e-6)


def test_default_generators_are_unchanged_by_the_option():
    """``upsample="transpose"`` (the default) draws the same network from the same seed as before."""
    cfg = CycleGANConfig(generator="resnet", ngf=64)
    assert cfg.upsample == "transpose"
    net = build_generator(cfg)
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules()) == 2
    assert count_parameters(net) == 11_360_385  # resnet_9blocks without the biases instance norm cancels
