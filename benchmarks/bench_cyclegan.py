"""CycleGAN training throughput: optimisation steps per second, optionally beside the reference.

Times :meth:`cxrlib.train.cyclegan.CycleGANTrainer.train_step` (both generators, then both
discriminators, image pools, identity loss on) on fixed random 1-channel images, for the
U-Net and the ResNet generator at each image size, on the CPU and, when present, on CUDA
(float16 autocast + channels-last, and float32). The U-Net goes down to a 1x1 bottleneck
(depth 7 at 128, 8 at 256: the reference's ``unet_128`` / ``unet_256``), the ResNet has 9
blocks (``resnet_9blocks``); ``--ngf`` / ``--ndf`` default to the reference's 64.

``--reference PATH`` points at a local checkout of junyanz/pytorch-CycleGAN-and-pix2pix
(never part of this repository). Its ``CycleGANModel.optimize_parameters`` is then timed at
the same settings (``input_nc=output_nc=1``, instance norm, LSGAN, pool 50, batch 1, no
dropout), alternating rounds with ours so that a change in machine load hits both alike.
The reference has no mixed precision, so on CUDA it is compared with our float32 step.

Usage::

    python benchmarks/bench_cyclegan.py --threads 2 --sizes 128 256
    python benchmarks/bench_cyclegan.py --threads 2 --sizes 128 --reference /tmp/cyclegan_ref

Writes ``benchmarks/results/cyclegan.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import time
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent

from _common import load_average, machine, sync, write_result  # noqa: E402

from cxrlib.models.cyclegan import CycleGAN, count_parameters  # noqa: E402
from cxrlib.train.cyclegan import CycleGANTrainConfig, CycleGANTrainer  # noqa: E402
from cxrlib.train.engine import DistContext  # noqa: E402


def _inputs(size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    real_a = torch.rand((1, 1, size, size), generator=generator) * 2 - 1
    real_b = torch.rand((1, 1, size, size), generator=generator) * 2 - 1
    return real_a.to(device), real_b.to(device)


def _unet_depth(size: int) -> int:
    return int(math.log2(size))


def build_ours(generator: str, size: int, device: torch.device, *, ngf: int, ndf: int, amp: bool,
               channels_last: bool) -> tuple[Callable[[], None], int]:
    """A function that runs one of our training steps, and the parameter count of one generator."""
    config = CycleGANTrainConfig(
        epochs=1, epochs_decay=0, batch_size=1, image_size=size, pool_size=50, lambda_id=0.5,
        model={"generator": generator, "ngf": ngf, "ndf": ndf, "n_blocks": 9, "unet_depth": _unet_depth(size)},
        device=str(device), amp=amp, channels_last=channels_last, progress=False,
    )
    torch.manual_seed(0)
    model = CycleGAN(config.model_config()).to(device)
    use_channels_last = channels_last and device.type == "cuda"
    if use_channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainer = CycleGANTrainer(model, config, DistContext(device=device))
    trainer.train()
    real_a, real_b = _inputs(size, device)
    if use_channels_last:
        real_a = real_a.contiguous(memory_format=torch.channels_last)
        real_b = real_b.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        trainer.train_step(real_a, real_b)

    return step, count_parameters(model.G_AB)


def build_reference(reference: Path, generator: str, size: int, device: torch.device, *, ngf: int, ndf: int
                    ) -> tuple[Callable[[], None], int]:
    """A function that runs one reference ``optimize_parameters`` call, and its generator's size."""
    if str(reference) not in sys.path:
        sys.path.insert(0, str(reference))
    from models.cycle_gan_model import CycleGANModel  # the reference checkout's package

    net_g = "resnet_9blocks" if generator == "resnet" else f"unet_{size}"
    if generator == "unet" and size not in (128, 256):
        raise ValueError(f"the reference U-Net exists for 128 and 256 only, not {size}")
    options = Namespace(
        gpu_ids=[device.index or 0] if device.type == "cuda" else [], isTrain=True,
        checkpoints_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "cyclegan_ref_bench"), name="bench",
        preprocess="resize_and_crop", input_nc=1, output_nc=1, ngf=ngf, ndf=ndf, netG=net_g, netD="basic",
        n_layers_D=3, norm="instance", no_dropout=True, init_type="normal", init_gain=0.02,
        lambda_identity=0.5, lambda_A=10.0, lambda_B=10.0, pool_size=50, gan_mode="lsgan", lr=2e-4,
        beta1=0.5, direction="AtoB", continue_train=False, verbose=False, device=device,
    )
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints while building networks
        model = CycleGANModel(options)
    real_a, real_b = _inputs(size, device)
    model.set_input({"A": real_a, "B": real_b, "A_paths": ["a"], "B_paths": ["b"]})

    def step() -> None:
        model.optimize_parameters()

    return step, count_parameters(model.netG_A)


def time_steps(step: Callable[[], None], device: torch.device, count: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per step over ``count`` steps."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        step()
    sync(device)
    return (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count


def measure(contenders: dict[str, Callable[[], None]], device: torch.device, *, warmup: int, steps: int,
            rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Per-step (wall, CPU) seconds of each contender: ``rounds`` alternating rounds of ``steps`` steps."""
    for step in contenders.values():
        for _ in range(warmup):
            step()
    sync(device)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            times[name].append(time_steps(step, device, steps))
    return times


def _summary(rounds: list[tuple[float, float]], device: torch.device) -> dict[str, Any]:
    """Median and best round of wall-clock time, and (CPU only) the median process CPU time.

    Other processes on a shared machine only ever add wall-clock time, so the best round is
    the least disturbed one. With one thread, CPU time barely depends on them at all and is
    the steadiest basis for comparing two implementations on a busy machine.
    """
    wall = [w for w, _ in rounds]
    median, best = statistics.median(wall), min(wall)
    summary = {"step_ms": round(1000 * median, 2), "it_per_s": round(1.0 / median, 3),
               "step_ms_best": round(1000 * best, 2), "it_per_s_best": round(1.0 / best, 3),
               "step_ms_rounds": [round(1000 * w, 2) for w in wall]}
    if device.type == "cpu":
        summary["cpu_ms"] = round(1000 * statistics.median(c for _, c in rounds), 2)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for torch (torch.set_num_threads); default: torch's current setting")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="image sides to time")
    parser.add_argument("--generators", nargs="+", choices=("unet", "resnet"), default=["unet", "resnet"],
                        help="generator architectures to time")
    parser.add_argument("--ngf", type=int, default=64, help="generator channels of the first level")
    parser.add_argument("--ndf", type=int, default=64, help="discriminator channels of the first layer")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="devices to time (default: cpu, and cuda when available)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported; alternated "
                        "between ours and the reference)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="local checkout of junyanz/pytorch-CycleGAN-and-pix2pix to time side by side")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cyclegan.json", help="JSON output file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    results = []
    load_before = load_average()
    for device_name in devices:
        device = torch.device(device_name)
        for size in args.sizes:
            for generator in args.generators:
                contenders: dict[str, Callable[[], None]] = {}
                params: dict[str, int] = {}
                if device.type == "cuda":
                    contenders["ours_amp_channels_last"], params["ours"] = build_ours(
                        generator, size, device, ngf=args.ngf, ndf=args.ndf, amp=True, channels_last=True)
                    contenders["ours_fp32"], _ = build_ours(generator, size, device, ngf=args.ngf, ndf=args.ndf,
                                                            amp=False, channels_last=False)
                else:
                    contenders["ours"], params["ours"] = build_ours(generator, size, device, ngf=args.ngf,
                                                                    ndf=args.ndf, amp=False, channels_last=False)
                if args.reference is not None:
                    contenders["reference"], params["reference"] = build_reference(
                        args.reference, generator, size, device, ngf=args.ngf, ndf=args.ndf)
                times = measure(contenders, device, warmup=args.warmup, steps=args.steps, rounds=args.rounds)
                row = {"device": device_name, "image_size": size, "generator": generator,
                       "unet_depth": _unet_depth(size) if generator == "unet" else None,
                       "ngf": args.ngf, "ndf": args.ndf, "batch_size": 1,
                       "threads": args.threads if device.type == "cpu" else None,
                       "generator_parameters": params,
                       **{name: _summary(rounds, device) for name, rounds in times.items()}}
                if "reference" in times:
                    ours_key = "ours" if "ours" in times else "ours_fp32"
                    for basis, value in (("", "step_ms"), ("_best", "step_ms_best"), ("_cpu", "cpu_ms")):
                        if value in row[ours_key]:
                            row[f"speedup_vs_reference{basis}"] = round(row["reference"][value] / row[ours_key][value], 3)
                results.append(row)
                shown = ", ".join(f"{name} {row[name]['it_per_s']:.3f} it/s (best round {row[name]['it_per_s_best']:.3f}"
                                  + (f", CPU {row[name]['cpu_ms']:.0f} ms/step)" if "cpu_ms" in row[name] else ")")
                                  for name in times)
                print(f"{device_name} {size}x{size} {generator}: {shown}", flush=True)
    payload = {
        "benchmark": "cyclegan training step (G_AB + G_BA update, then D_A + D_B update), batch 1",
        "machine": machine(args.threads, load_before),
        "settings": {"warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                     "reference": str(args.reference) if args.reference else None},
        "results": results,
    }
    write_result(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
