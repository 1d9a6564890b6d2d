"""Training-step cost of every loop in fp32 and in bf16 autocast on the CPU, beside the CPU's peaks.

For each loop, one optimisation step as its training loop takes it (forward under the
precision's autocast, the loss in float32, backward, optimizer step; the same calls as
``cxrlib/train/*.py``) on fixed random inputs, at the demo's sizes and at the CycleGAN
acceptance size:

- ``segmentation``: U-Net (base 8, depth 4), 128 px, batch 8 (notebook 02), Dice + CE, AdamW;
- ``cyclegan_demo``: U-Net generator ngf 16 depth 3, PatchGAN ndf 32, 48 px, batch 4 (notebook 03);
- ``cyclegan_resnet128``: ResNet generator 9 blocks, ngf 64, 70x70 PatchGAN ndf 64, 128 px,
  1 channel, batch 1, identity 0.5, pool 50: the reference implementation's ``resnet_9blocks``
  setting (:meth:`cxrlib.train.cyclegan.CycleGANTrainer.train_step`);
- ``classifier``: small_cnn, 48 px, batch 16 (notebook 04; the judges use it too), weighted CE, AdamW;
- ``diffusion``: diffusers UNet2DModel (16, 32, 64), 32 px, batch 16 (notebook 06), v-prediction
  MSE, AdamW, gradient clipping, EMA;
- ``text_segmenter``: U-Net base 4, depth 2, group norm, 64 px crops, batch 16 (notebook 06).

``--cases`` also offers ``cyclegan_demo96`` and ``diffusion64`` (the larger images a bf16 saving
could pay for) and ``classifier_resnet18`` (224 px, batch 16).

Every variant (``fp32``, ``bf16``, and with ``--channels-last`` also ``bf16_channels_last``: NHWC
tensors, which oneDNN's bf16 convolutions prefer) of every case is timed in interleaved
rounds (``--rounds`` rounds of ``--steps`` steps after ``--warmup`` untimed ones), so that load
on a shared machine hits all alike; reported: the median per-step wall time, its best round,
and the median per-step process CPU time (with one thread, the steadiest basis on a busy
machine). GFLOP per step are counted once with ``torch.utils.flop_counter.FlopCounterMode``
(matrix products and convolutions, forward and backward; the same count in either
precision); the achieved GFLOP per CPU-second is given as a share of the matching peak:
the fp32 and the bf16 matrix-product peaks (best GFLOP per CPU-second of ``--peak-size``
square ``torch.mm`` calls), measured in the same run. With ``--reference PATH`` (a local checkout of
junyanz/pytorch-CycleGAN-and-pix2pix, never part of this repository) the reference's
``optimize_parameters`` at the ``cyclegan_resnet128`` setting is timed in the same rounds
(through ``bench_cyclegan.build_reference``); it has no mixed precision, so it runs in fp32.

Usage::

    nice -n 10 python benchmarks/bench_precision.py                  # one thread, all default cases
    python benchmarks/bench_precision.py --cases cyclegan_resnet128 --reference /tmp/cyclegan_ref

Writes ``benchmarks/results/precision.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent

from _common import load_average, machine, write_result  # noqa: E402
from bench_cyclegan import build_reference  # noqa: E402

from cxrlib.config import cpu_description  # noqa: E402
from cxrlib.models.classifiers import build_classifier  # noqa: E402
from cxrlib.models.cyclegan import CycleGAN  # noqa: E402
from cxrlib.models.unet import UNet, UNetConfig  # noqa: E402
from cxrlib.train.classifier import train_step  # noqa: E402
from cxrlib.train.cyclegan import CycleGANTrainConfig, CycleGANTrainer  # noqa: E402
from cxrlib.train.engine import DistContext, Precision, cpu_has_native_bf16  # noqa: E402
from cxrlib.train.segmentation import segmentation_loss  # noqa: E402

DEFAULT_CASES = ("segmentation", "cyclegan_demo", "cyclegan_resnet128", "classifier", "diffusion", "text_segmenter")
EXTRA_CASES = ("cyclegan_demo96", "cyclegan_real", "cyclegan_real_blurred", "diffusion64", "classifier_resnet18")

Step = Callable[[], None]


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layout(tensor: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last) if channels_last else tensor


def _unet_step(config: UNetConfig, size: int, batch: int, precision: Precision, channels_last: bool) -> Step:
    """One step of the segmentation loop (and of the text segmenter's, with its U-Net)."""
    torch.manual_seed(0)
    model = UNet(config)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = precision.grad_scaler()
    images = _layout(torch.rand((batch, config.in_channels, size, size), generator=_generator()), channels_last)
    labels = torch.randint(0, config.num_classes, (batch, size, size), generator=_generator(1))
    model.train()

    def step() -> None:
        with precision.autocast():
            logits = model(images)
        loss, _ = segmentation_loss(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def _cyclegan_step(model_settings: dict[str, Any], size: int, batch: int, precision: Precision, channels_last: bool,
                   *, lambda_id: float = 1.0, pool_size: int = 50) -> Step:
    config = CycleGANTrainConfig(epochs=1, epochs_decay=0, batch_size=batch, image_size=size, pool_size=pool_size,
                                 lambda_id=lambda_id, model=model_settings, device="cpu", progress=False,
                                 precision=precision.name)
    torch.manual_seed(0)
    model = CycleGAN(config.model_config())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainer = CycleGANTrainer(model, config, DistContext())
    trainer.train()
    real_a = _layout(torch.rand((batch, 1, size, size), generator=_generator()) * 2 - 1, channels_last)
    real_b = _layout(torch.rand((batch, 1, size, size), generator=_generator(1)) * 2 - 1, channels_last)
    return lambda: trainer.train_step(real_a, real_b)


def _classifier_step(arch: str, size: int, batch: int, precision: Precision, channels_last: bool) -> Step:
    torch.manual_seed(0)
    model = build_classifier(arch, 2)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4)
    scaler = precision.grad_scaler()
    images = _layout(torch.rand((batch, 1, size, size), generator=_generator()), channels_last)
    labels = torch.randint(0, 2, (batch,), generator=_generator(1))
    weights = torch.tensor([0.6, 2.5])
    model.train()

    def step() -> None:
        train_step(model, images, labels, weights, optimizer, scaler, precision.autocast)

    return step


def _diffusion_step(size: int, channels: tuple[int, ...], batch: int, precision: Precision,
                    channels_last: bool) -> Step:
    from diffusers.training_utils import EMAModel

    from cxrlib.models.diffusion import DiffusionConfig, DiffusionModel, training_scheduler

    config = DiffusionConfig(image_size=size, block_out_channels=channels)
    torch.manual_seed(0)
    unet = DiffusionModel(config).unet
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    scaler = precision.grad_scaler()
    ema = EMAModel(unet.parameters(), decay=0.999)
    noiser = training_scheduler(config)
    images = _layout(torch.rand((batch, 1, size, size), generator=_generator()) * 2 - 1, channels_last)
    labels = torch.randint(0, config.null_class + 1, (batch,), generator=_generator(1))
    noise = torch.randn(images.shape, generator=_generator(2))
    timesteps = torch.randint(0, config.num_train_timesteps, (batch,), generator=_generator(3))
    noisy = _layout(noiser.add_noise(images, noise, timesteps), channels_last)
    target = noiser.get_velocity(images, noise, timesteps)
    unet.train()

    def step() -> None:
        with precision.autocast():
            prediction = unet(noisy, timesteps, class_labels=labels).sample
        loss = F.mse_loss(prediction.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        ema.step(unet.parameters())

    return step


#: case -> (description, builder(precision, channels_last) -> step, settings recorded in the JSON)
CASES: dict[str, tuple[str, Callable[[Precision, bool], Step], dict[str, Any]]] = {
    "segmentation": (
        "U-Net base 8 depth 4, 128 px, batch 8, Dice + CE, AdamW (notebook 02)",
        lambda p, cl: _unet_step(UNetConfig(base_channels=8, depth=4), 128, 8, p, cl),
        {"image_size": 128, "batch_size": 8}),
    "cyclegan_demo": (
        "CycleGAN, U-Net generator ngf 16 depth 3, PatchGAN ndf 32, 48 px, batch 4 (notebook 03)",
        lambda p, cl: _cyclegan_step({"generator": "unet", "ngf": 16, "ndf": 32, "unet_depth": 3}, 48, 4, p, cl),
        {"image_size": 48, "batch_size": 4}),
    "cyclegan_demo96": (
        "the demo CycleGAN at 96 px, batch 4",
        lambda p, cl: _cyclegan_step({"generator": "unet", "ngf": 16, "ndf": 32, "unet_depth": 3}, 96, 4, p, cl),
        {"image_size": 96, "batch_size": 4}),
    "cyclegan_real": (
        "the real-cpu CycleGAN: U-Net generator ngf 16 depth 5, PatchGAN ndf 32, 128 px, batch 4, identity 0.5",
        lambda p, cl: _cyclegan_step({"generator": "unet", "ngf": 16, "ndf": 32, "unet_depth": 5}, 128, 4, p, cl,
                                     lambda_id=0.5),
        {"image_size": 128, "batch_size": 4, "upsample": "transpose"}),
    "cyclegan_real_blurred": (
        "the real-cpu CycleGAN with upsample=blurred_transpose",
        lambda p, cl: _cyclegan_step({"generator": "unet", "ngf": 16, "ndf": 32, "unet_depth": 5,
                                      "upsample": "blurred_transpose"}, 128, 4, p, cl, lambda_id=0.5),
        {"image_size": 128, "batch_size": 4, "upsample": "blurred_transpose"}),
    "cyclegan_resnet128": (
        "CycleGAN, ResNet generator 9 blocks ngf 64, 70x70 PatchGAN ndf 64, 128 px, 1 channel, batch 1, "
        "identity 0.5, pool 50 (the reference's resnet_9blocks setting)",
        lambda p, cl: _cyclegan_step({"generator": "resnet", "ngf": 64, "ndf": 64, "n_blocks": 9}, 128, 1, p, cl,
                                     lambda_id=0.5, pool_size=50),
        {"image_size": 128, "batch_size": 1}),
    "classifier": (
        "small_cnn, 48 px, batch 16, weighted CE, AdamW (notebook 04, the judges)",
        lambda p, cl: _classifier_step("small_cnn", 48, 16, p, cl),
        {"image_size": 48, "batch_size": 16}),
    "classifier_resnet18": (
        "resnet18, 224 px, batch 16, weighted CE, AdamW",
        lambda p, cl: _classifier_step("resnet18", 224, 16, p, cl),
        {"image_size": 224, "batch_size": 16}),
    "diffusion": (
        "diffusers UNet2DModel (16, 32, 64), 32 px, batch 16, v-prediction MSE, AdamW, clipping, EMA (notebook 06)",
        lambda p, cl: _diffusion_step(32, (16, 32, 64), 16, p, cl),
        {"image_size": 32, "batch_size": 16}),
    "diffusion64": (
        "the demo denoiser at 64 px, batch 16",
        lambda p, cl: _diffusion_step(64, (16, 32, 64), 16, p, cl),
        {"image_size": 64, "batch_size": 16}),
    "text_segmenter": (
        "U-Net base 4 depth 2, group norm, 2 classes, 64 px crops, batch 16 (notebook 06)",
        lambda p, cl: _unet_step(UNetConfig(num_classes=2, base_channels=4, depth=2, norm="group"), 64, 16, p, cl),
        {"image_size": 64, "batch_size": 16}),
}


def matmul_peak(dtype: torch.dtype, size: int, repeats: int) -> dict[str, float]:
    """GFLOP per CPU-second and per wall-second of the best of ``repeats`` square ``torch.mm`` calls of
    side ``size`` in ``dtype`` (CPU time: what other processes on a shared machine barely change)."""
    a = torch.rand((size, size), generator=_generator()).to(dtype)
    b = torch.rand((size, size), generator=_generator(1)).to(dtype)
    torch.mm(a, b)  # first call: kernel selection, packing buffers
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    flop = 2 * size**3 / 1e9
    return {"gflop_per_cpu_s": round(flop / best_cpu, 1), "gflop_per_wall_s": round(flop / best_wall, 1)}


def count_gflop(step: Step) -> float:
    """Matrix-product and convolution GFLOP of one call of ``step`` (forward and backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / 1e9


def time_rounds(contenders: dict[str, Step], *, warmup: int, steps: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Per-step (wall, CPU) seconds of each contender in ``rounds`` interleaved rounds of ``steps`` steps."""
    for step in contenders.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step()
            times[name].append(((time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps))
    return times


def summarise(rounds: list[tuple[float, float]], gflop: float, peak: float | None) -> dict[str, Any]:
    """Median and best wall time, median CPU time per step (ms), GFLOP per CPU-second and its share of ``peak``."""
    wall = [w for w, _ in rounds]
    cpu = statistics.median(c for _, c in rounds)
    summary: dict[str, Any] = {
        "step_ms": round(1000 * statistics.median(wall), 2), "step_ms_best": round(1000 * min(wall), 2),
        "cpu_ms": round(1000 * cpu, 2), "step_ms_rounds": [round(1000 * w, 2) for w in wall],
        "cpu_ms_rounds": [round(1000 * c, 2) for _, c in rounds],
        "gflop_per_cpu_s": round(gflop / cpu, 2) if cpu > 0 else None,
    }
    if peak and cpu > 0:
        summary["share_of_peak"] = round(gflop / cpu / peak, 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(DEFAULT_CASES),
                        help=f"loops to time (default: {' '.join(DEFAULT_CASES)}; also {' '.join(EXTRA_CASES)})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant before timing")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (medians reported)")
    parser.add_argument("--channels-last", action="store_true",
                        help="also time bf16 with NHWC (channels-last) tensors and weights")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square matrices of the peak")
    parser.add_argument("--reference", type=Path, default=None,
                        help="local checkout of junyanz/pytorch-CycleGAN-and-pix2pix: time its optimize_parameters "
                             "beside cyclegan_resnet128")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "precision.json", help="JSON output file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cpu = cpu_description()
    native = cpu_has_native_bf16(cpu)
    if not native:
        print(f"note: {cpu['model']} has no native bf16 (no avx512_bf16 / amx_bf16 flag): bf16 is emulated here",
              flush=True)
    load_before = load_average()
    peak_runs = {name: matmul_peak(dtype, args.peak_size, 10)
                 for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    peaks = {name: run["gflop_per_cpu_s"] for name, run in peak_runs.items()}
    print(f"matrix-product peaks, {args.threads} thread(s), GFLOP per CPU-second: fp32 {peaks['fp32']}, "
          f"bf16 {peaks['bf16']}", flush=True)
    variants = [("fp32", "fp32", False), ("bf16", "bf16", False)]
    if args.channels_last:
        variants.append(("bf16_channels_last", "bf16", True))

    results = []
    for case in args.cases:
        description, build, settings = CASES[case]
        contenders = {name: build(Precision(dtype_name, "cpu", dtype_name, "benchmark"), channels_last)
                      for name, dtype_name, channels_last in variants}
        gflop = count_gflop(contenders["fp32"])
        if case == "cyclegan_resnet128" and args.reference is not None:
            contenders["reference_fp32"], _ = build_reference(args.reference, "resnet", 128, torch.device("cpu"),
                                                              ngf=64, ndf=64)
        times = time_rounds(contenders, warmup=args.warmup, steps=args.steps, rounds=args.rounds)
        row: dict[str, Any] = {"case": case, "description": description, **settings, "gflop_per_step": round(gflop, 3)}
        for name, rounds in times.items():
            row[name] = summarise(rounds, gflop, peaks["bf16" if name.startswith("bf16") else "fp32"])
        for name in list(times):
            if name.startswith("bf16"):
                row[f"{name}_cpu_time_vs_fp32"] = round(row[name]["cpu_ms"] / row["fp32"]["cpu_ms"], 3)
                row[f"{name}_wall_time_vs_fp32"] = round(row[name]["step_ms"] / row["fp32"]["step_ms"], 3)
        if "reference_fp32" in row:
            for name in [n for n, _, _ in variants]:
                row[f"{name}_cpu_time_vs_reference"] = round(row[name]["cpu_ms"] / row["reference_fp32"]["cpu_ms"], 3)
        results.append(row)
        shown = ", ".join(f"{name} {row[name]['cpu_ms']:.1f} ms CPU ({row[name]['step_ms']:.1f} wall)" for name in times)
        ratios = ", ".join(f"{key} {value}" for key, value in row.items() if key.endswith("_vs_fp32") or
                           key.endswith("_vs_reference"))
        print(f"{case}: {gflop:.2f} GFLOP/step; {shown}; {ratios}", flush=True)

    payload = {
        "benchmark": "one training step per loop, fp32 vs bf16 autocast on the CPU, interleaved rounds",
        "command": "python benchmarks/bench_precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(args.threads, load_before),
        "matmul_peak": {**peak_runs, "size": args.peak_size},
        "settings": {"warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                     "reference": str(args.reference) if args.reference else None},
        "results": results,
    }
    write_result(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
