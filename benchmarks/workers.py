"""Does the CPU worker pool of the sparse kernels hurt? Sparse cores vs SDPA with a competing process.

For each setting (torch threads, hopformer workers) the attention cores (forward+backward) are timed
quietly and then beside a busy-loop process spinning on one core (another user's job). Printed: the
time of each core, its ratio to SDPA, and its slowdown under the competitor next to SDPA's slowdown.
Target (issue 14): the sparse maps degrade no worse than SDPA, and threads = 1 costs nothing extra.
The pool is switched off by ``hopformer.set_num_workers(1)`` or ``HOPFORMER_NUM_WORKERS=1``
(then the blocks run in the calling thread with torch's intra-op threads).

    flock /tmp/hopformer-heavy.lock python benchmarks/workers.py
    python benchmarks/workers.py --length 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout first
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hopformer  # noqa: E402
from _common import BusyLoop, interleaved, machine_line  # noqa: E402
from hopformer.functional.separation import separated_attention  # noqa: E402

SETTINGS = [  # (label, torch threads, hopformer workers)
    ("1 thread", 1, None),
    ("2 threads, pool (default)", 2, None),
    ("2 threads, pool off (set_num_workers(1))", 2, 1),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_line())
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, args.length, 32, generator=gen).requires_grad_() for _ in range(3))
    cores: Dict[str, Callable] = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "sparsemax": lambda: separated_attention(q, k, v, separation="sparsemax"),
        "entmax15": lambda: separated_attention(q, k, v, separation="entmax15"),
    }

    def step(fn):
        return lambda: fn().sum().backward()

    runs = {name: step(fn) for name, fn in cores.items()}
    print(f"\n### B={args.batch} H={args.heads} L={args.length} d=32, forward+backward, repeats={args.repeats}")
    print("| setting | competitor | sdpa ms | sparsemax ms (x sdpa) | entmax15 ms (x sdpa) | slowdown sdpa / sparsemax / entmax15 |")
    print("|---|---|---|---|---|---|")
    device = torch.device("cpu")
    for label, threads, workers in SETTINGS:
        torch.set_num_threads(threads)
        hopformer.set_num_workers(workers)
        quiet = interleaved(runs, args.repeats, device)
        with BusyLoop():
            busy = interleaved(runs, args.repeats, device)
        for tag, med in (("none", quiet), ("busy loop", busy)):
            slow = " / ".join(f"{busy[n] / quiet[n]:.2f}" for n in cores) if tag != "none" else ""
            print(f"| {label} (workers={hopformer.get_num_workers()}) | {tag} | {med['sdpa'] * 1e3:.1f} | "
                  f"{med['sparsemax'] * 1e3:.1f} ({med['sparsemax'] / med['sdpa']:.2f}) | "
                  f"{med['entmax15'] * 1e3:.1f} ({med['entmax15'] / med['sdpa']:.2f}) | {slow} |", flush=True)
    hopformer.set_num_workers(None)


if __name__ == "__main__":
    main()
