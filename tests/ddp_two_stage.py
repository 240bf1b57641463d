"""Two-stage U-Hop training under DDP on CPU (gloo); run by tests/test_ddp.py as a subprocess.

    python tests/ddp_two_stage.py --devices 2 --out DIR   # writes DIR/rank0.pt and DIR/rank1.pt
    python tests/ddp_two_stage.py --devices 1 --out DIR   # the same global batch in one process

Deterministic: digits in a fixed order (no shuffling, no augmentation, no dropout), so the two-process
run sees, per step, exactly the images of the one-process run split over the ranks.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, DistributedSampler

from hopformer.data import DigitsDataModule
from hopformer.training import ClassificationModule, UHopSeparation

GLOBAL_BATCH = 16


class OrderedDigits(DigitsDataModule):
    """Digits in a fixed order; under DDP rank r takes items r, r + world, ... (no shuffling).

    Lightning's automatic DistributedSampler always shuffles training data, so the trainer runs with
    ``use_distributed_sampler=False`` and this module shards the data itself.
    """

    def train_dataloader(self):
        loader = super().train_dataloader()
        if not (dist.is_available() and dist.is_initialized()):
            return loader
        sampler = DistributedSampler(self.train_set, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=False)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    # qkv_bias=False: the key bias has an exactly-zero gradient under softmax (a per-query shift), so Adam
    # turns its float round-off into lr-sized steps that differ between 1 and 2 processes.
    model = ClassificationModule("hopfield_vit_nano_patch2_8", lr=3e-3,
                                 backbone_kwargs={"attention": "kernelized", "qkv_bias": False})
    data = OrderedDigits(batch_size=GLOBAL_BATCH // args.devices, train_subset=64, shuffle=False, seed=0)
    strategy = DDPStrategy(process_group_backend="gloo") if args.devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=args.epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
        callbacks=[UHopSeparation(steps=2, lr=0.1, momentum=0.9)],
    )
    trainer.fit(model, datamodule=data)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, args.out / f"rank{trainer.global_rank}.pt")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # avoids rare aborts at exit under gloo


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
