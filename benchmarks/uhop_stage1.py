"""Time U-Hop stage I (Algorithm 1, lines 1-4): 500 memories of d = 3072 (CIFAR-sized), 100 SGD steps.

Compares the exact memory-space SGD used by ``UHopRetriever`` (O(M^3) per step) with plain
``torch.optim.SGD`` on the full 3072 x 3072 ``W`` (O(M d^2) per step; timed on a few steps and
extrapolated). Uses CIFAR-10 images from ../shared/data when present, else uniform random images.

    OMP_NUM_THREADS=2 python benchmarks/uhop_stage1.py [--memories 500] [--steps 100] [--dense-steps 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hopformer.retrieval import UHopRetriever, fit_feature_map_dense, load_images

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memories", type=int, default=500)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--dense-steps", type=int, default=5, help="steps of the dense reference (0 skips it)")
    p.add_argument("--lr", type=float, default=0.01)
    args = p.parse_args()
    if CIFAR.is_dir():
        xi, source = load_images("folder", CIFAR, n=args.memories, seed=0).images, "CIFAR-10 train images"
    else:
        xi, source = torch.rand(args.memories, 3072, generator=torch.Generator().manual_seed(0)), "random images"
    m, d = xi.shape
    print(f"stage I: M = {m} memories of d = {d} ({source}), {args.steps} SGD steps, lr {args.lr}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    start = time.perf_counter()
    r = UHopRetriever(d, kernel_steps=args.steps, lr=args.lr).fit(xi)
    fast = time.perf_counter() - start
    print(f"  memory-space SGD (UHopRetriever.fit, incl. forming W and row normalisation): {fast:.2f} s; "
          f"separation loss {r.losses_[0].item():.3f} -> {r.separation_loss().item():.3f}")
    if args.dense_steps:
        start = time.perf_counter()
        fit_feature_map_dense(xi, torch.eye(d), steps=args.dense_steps, lr=args.lr)
        per_step = (time.perf_counter() - start) / args.dense_steps
        print(f"  dense torch.optim.SGD on W: {per_step:.2f} s/step -> {per_step * args.steps:.1f} s for "
              f"{args.steps} steps (extrapolated from {args.dense_steps})")


if __name__ == "__main__":
    main()
