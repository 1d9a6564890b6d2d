"""One rank of the two-process DDP check in ``test_cyclegan.py`` (run by torchrun).

Trains a tiny CycleGAN through the real :func:`train_cyclegan` on the Gloo backend and
saves this rank's final weights of all four networks to ``<out>/rank<RANK>.pt`` (rank 0
also writes the initial weights to ``<out>/initial.pt``) so that the test can compare the
ranks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from cxrlib.config import seed_everything
from cxrlib.data.manifest import absolute_paths
from cxrlib.models.cyclegan import CycleGAN
from cxrlib.train.cyclegan import CycleGANTrainConfig, domain_rows, train_cyclegan
from cxrlib.train.engine import cleanup_distributed, init_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, required=True, help="manifest CSV with Dark / Bright train rows")
    parser.add_argument("--root", type=Path, required=True, help="folder the manifest paths start from")
    parser.add_argument("--run-dir", type=Path, required=True, help="training run folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the per-rank weights")
    args = parser.parse_args()

    torch.set_num_threads(1)
    config = CycleGANTrainConfig(epochs=1, epochs_decay=1, batch_size=2, image_size=32, pool_size=3,
                                 model={"ngf": 4, "ndf": 4, "unet_depth": 3}, seed=5, device="cpu",
                                 progress=False, sample_every=0)
    ctx = init_distributed(config.device)
    assert ctx.world_size == 2 and ctx.backend == "gloo", ctx
    manifest = absolute_paths(pd.read_csv(args.manifest, dtype=str, keep_default_na=False), args.root)
    dark, bright = domain_rows(manifest, "Dark"), domain_rows(manifest, "Bright")

    if ctx.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        seed_everything(config.seed)  # the same draw train_cyclegan makes for its weights
        torch.save(CycleGAN(config.model_config()).state_dict(), args.out / "initial.pt")
    result = train_cyclegan(dark, bright, args.run_dir, config, ctx=ctx)
    torch.distributed.barrier()  # rank 0 has created the output folder
    torch.save(result.model.state_dict(), args.out / f"rank{ctx.rank}.pt")
    cleanup_distributed()


if __name__ == "__main__":
    main()
