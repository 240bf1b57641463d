"""Time per frame of the temporal-kernel sequence memory's solvers as the sequence grows.

Synthetic correlated frames (a random walk with scene cuts), so it runs anywhere:

    OMP_NUM_THREADS=1 python benchmarks/sequence_memory.py --frames 250 500 1000 2000 --dim 3072

Prints one row per N: milliseconds per frame for the batched CCCP solver, the sequential CCCP
solver and scipy's L-BFGS-B (faithful, full kernel), and the largest difference between the fast
and the faithful states. The faithful cost grows like O(N^2 d) in total (O(N d) per frame); the
CCCP solvers' like O(N w d) (constant per frame).
"""

from __future__ import annotations

import argparse
import time

import torch

from hopformer.layers import TemporalSequenceMemory


def frames(n: int, dim: int, scene: int = 200, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randn(n, dim, generator=gen, dtype=torch.float64) * 0.05
    cuts = torch.zeros(n, dim, dtype=torch.float64)
    cuts[::scene] = torch.randn(len(range(0, n, scene)), dim, generator=gen, dtype=torch.float64)
    return (steps + cuts).cumsum(0)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--lbfgs-max", type=int, default=2000, help="largest N timed with L-BFGS-B")
    parser.add_argument("--device", default="cpu", help="device of the CCCP solvers (L-BFGS-B runs on the CPU)")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'N':>6} {'cccp-batched':>13} {'cccp-seq':>9} {'lbfgs-b':>9}  (ms/frame)  max|fast-lbfgs|")
    for n in args.frames:
        memory = TemporalSequenceMemory().store(frames(n, args.dim)).to(args.device)
        row = {"frames": n}
        results = {}
        for name, solver, batched in (("cccp-batched", "cccp", True), ("cccp-seq", "cccp", False),
                                      ("lbfgs-b", "lbfgs", True)):
            if solver == "lbfgs" and n > args.lbfgs_max:
                row[name] = float("nan")
                continue
            memory.batched = batched
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = memory.retrieve(solver=solver).states.cpu()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            row[name] = 1e3 * (time.perf_counter() - start) / n
        diff = (results["cccp-batched"] - results["lbfgs-b"]).abs().max().item() if "lbfgs-b" in results else float("nan")
        row["max_abs_diff"] = diff
        rows.append(row)
        print(f"{n:>6} {row['cccp-batched']:>13.3f} {row['cccp-seq']:>9.3f} {row['lbfgs-b']:>9.3f}  {diff:.2e}")
    return rows


if __name__ == "__main__":
    main()
