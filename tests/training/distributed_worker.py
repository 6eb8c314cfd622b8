"""One rank of the distributed-training tests (tests/training/test_distributed.py), started by torchrun.

    python -m torch.distributed.run --nproc-per-node 2 --standalone -m tests.training.distributed_worker ROOT

Trains the tiny stage-2 configuration into ROOT/stage2 for one epoch and the tiny stage-3 one (from the assets
in ROOT/assets) into ROOT/stage3 under DDP and into ROOT/stage3-fsdp sharded with FSDP, for three steps; stops
each as an interruption would, then resumes from the checkpoint rank 0 wrote and finishes: every rank reads it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.training.test_distributed import stage2_config, stage2_data, stage3_assets, stage3_trainer
from training import distributed
from training.stage2.train import train


def stage2(out: str) -> None:
    cfg = stage2_config(Path(out))
    train(cfg, stage2_data(), stop_after=1)
    train(cfg, stage2_data())


def stage3(assets_dir: str, out: str, shard: str) -> None:
    assets = stage3_assets(Path(assets_dir))
    stage3_trainer(assets, Path(out), shard=shard).fit(max_steps=3)
    stage3_trainer(assets, Path(out), seed=123, shard=shard).fit()  # fresh weights: all from the checkpoint


def main(root: str) -> None:
    torch.set_num_threads(1)
    if not distributed.setup():
        raise SystemExit("distributed_worker.py must run under torchrun with more than one process")
    try:
        stage2(f"{root}/stage2")
        stage3(f"{root}/assets", f"{root}/stage3", "ddp")
        stage3(f"{root}/assets", f"{root}/stage3-fsdp", "fsdp")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
