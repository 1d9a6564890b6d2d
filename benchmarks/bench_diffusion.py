"""Diffusion model throughput: training iterations/s and DDIM sampling images/s per step count.

Training step = DDPM noising of a batch of random 1-channel images + class-conditional U-Net
forward (``diffusers.UNet2DModel``) + MSE + backward + AdamW + EMA update, as in
:func:`cxrlib.train.diffusion.train_diffusion`. Sampling = :meth:`DiffusionModel.sample`
with classifier-free guidance (two network passes per step) for each ``--ddim-steps`` value.
After ``--warmup`` steps, ``--steps`` training steps are timed in ``--repeats`` rounds (the
median round is reported, with the best / worst rounds and the 1-minute load average, since
a shared machine's load moves wall-clock numbers). The CPU is measured once per
``--cpu-threads`` value; the GPU (float32) when CUDA is there.

Usage::

    python benchmarks/bench_diffusion.py
    python benchmarks/bench_diffusion.py --size 32 --channels 16 32 64 --ddim-steps 10 20 50

Writes ``benchmarks/results/diffusion.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import load_average, sync

from cxrlib.models.diffusion import DiffusionConfig, DiffusionModel, training_scheduler

HERE = Path(__file__).resolve().parent


def bench_training(model: DiffusionModel, device: torch.device, batch: int, warmup: int, steps: int,
                   repeats: int) -> dict:
    from diffusers.training_utils import EMAModel

    config = model.config
    unet = model.unet.to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    ema = EMAModel(unet.parameters(), decay=0.999)
    ema.to(device)
    noiser = training_scheduler(config)
    images = torch.rand(batch, 1, config.image_size, config.image_size, device=device) * 2 - 1
    labels = torch.randint(0, config.null_class + 1, (batch,), device=device)

    def step() -> None:
        noise = torch.randn_like(images)
        t = torch.randint(0, config.num_train_timesteps, (batch,), device=device)
        loss = torch.nn.functional.mse_loss(unet(noiser.add_noise(images, noise, t), t, class_labels=labels).sample,
                                            noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.step(unet.parameters())

    for _ in range(warmup):
        step()
    rounds = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rounds.append(steps / (time.perf_counter() - started))
    return {"mode": "train", "iterations_per_s": round(statistics.median(rounds), 3),
            "images_per_s": round(statistics.median(rounds) * batch, 2),
            "iterations_per_s_best": round(max(rounds), 3), "iterations_per_s_worst": round(min(rounds), 3),
            "batch": batch, "steps_per_round": steps, "rounds": repeats}


def bench_sampling(model: DiffusionModel, device: torch.device, n_images: int, ddim_steps: int,
                   guidance: float) -> dict:
    model.to(device).eval()
    labels = ["covid"] * n_images
    model.sample(labels[:2], num_inference_steps=2, guidance_scale=guidance)  # warm-up
    sync(device)
    started = time.perf_counter()
    model.sample(labels, num_inference_steps=ddim_steps, guidance_scale=guidance, batch_size=n_images)
    sync(device)
    seconds = time.perf_counter() - started
    return {"mode": "sample", "ddim_steps": ddim_steps, "guidance_scale": guidance, "n_images": n_images,
            "images_per_s": round(n_images / seconds, 3), "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="image side (the default profile's 32)")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64], help="denoiser channels per level")
    parser.add_argument("--batch", type=int, default=16, help="training batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--n-samples", type=int, default=32, help="images per sampling measurement")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--cpu-threads", type=int, nargs="+", default=[1, 0], help="0: PyTorch's default")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--out", default=str(HERE / "results" / "diffusion.json"))
    args = parser.parse_args(argv)

    config = DiffusionConfig(image_size=args.size, block_out_channels=tuple(args.channels))
    results = []
    default_threads = torch.get_num_threads()
    runs = [("cpu", t) for t in args.cpu_threads] if "cpu" in args.devices else []
    if "cuda" in args.devices and torch.cuda.is_available():
        runs.append(("cuda", None))
    for device_name, threads in runs:
        torch.set_num_threads(threads or default_threads)
        device = torch.device(device_name)
        torch.manual_seed(0)
        model = DiffusionModel(config)
        extra = {"device": device_name, "cpu_threads": torch.get_num_threads() if device_name == "cpu" else None,
                 "load_average_1min": load_average(),
                 "parameters": sum(p.numel() for p in model.unet.parameters())}
        results.append({**bench_training(model, device, args.batch, args.warmup, args.steps, args.repeats), **extra})
        print(results[-1], flush=True)
        for ddim_steps in args.ddim_steps:
            results.append({**bench_sampling(model, device, args.n_samples, ddim_steps, args.guidance), **extra,
                            "load_average_1min": load_average()})
            print(results[-1], flush=True)
    payload = {"benchmark": "diffusion", "size": args.size, "channels": args.channels,
               "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
               "cpu_count": os.cpu_count(), "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
