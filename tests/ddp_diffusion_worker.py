"""One rank of the two-process DDP check in ``test_diffusion.py`` (run by torchrun).

Trains a tiny diffusion model through the real :func:`train_diffusion` on the Gloo backend
with a time budget that only rank 0 has run out of after the first epoch (rank 1 is given
an hour): the ranks must agree to stop together, or rank 1 would wait for ever in the next
epoch's gradient all-reduce. Each rank saves its final denoiser weights to
``<out>/rank<RANK>.pt`` and a line about how training ended to ``<out>/rank<RANK>.txt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cxrlib.models.diffusion import DiffusionConfig
from cxrlib.train.diffusion import DiffusionTrainConfig, train_diffusion
from cxrlib.train.engine import cleanup_distributed, init_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, required=True, help="training run folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the per-rank results")
    args = parser.parse_args()

    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    assert ctx.world_size == 2 and ctx.backend == "gloo", ctx
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 16), dtype=np.uint8)
    labels = ["normal", "pneumonia", "covid", "normal"] * 2
    config = DiffusionTrainConfig(
        model=DiffusionConfig(image_size=16, block_out_channels=(8, 16), norm_num_groups=4, num_train_timesteps=50),
        epochs=4, batch_size=2, seed=3, device="cpu", progress=False,
        max_train_seconds=1e-3 if ctx.rank == 0 else 3600.0)
    result = train_diffusion(images, labels, args.run_dir, config, ctx=ctx)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.unet.state_dict(), args.out / f"rank{ctx.rank}.pt")
    (args.out / f"rank{ctx.rank}.txt").write_text(f"{result.epochs_done} {result.steps} {result.stopped_by_budget}\n")
    cleanup_distributed()


if __name__ == "__main__":
    main()
