"""Forward+backward time of the attention core `Sep(q k^T / sqrt(d)) v` per separation map.

Prints, per shape, the median time of each core and its ratio to the fused softmax core
(`torch.nn.functional.scaled_dot_product_attention`) measured in the same run (round-robin
over the cores, so load changes hit all of them alike). "explicit softmax" is the same core
written with matmuls and `torch.softmax`, the floor for any core that materialises the scores;
"ours <map>" are `separate`-style maps on materialised scores, "ours fused <map>" is
`separated_attention` (block-wise, thresholds saved, scores never materialised).

    flock /tmp/hopformer-heavy.lock python benchmarks/separation.py            # both shapes
    python benchmarks/separation.py --shapes 16,8,256,32 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from hopformer.functional.separation import entmax, entmax15, separated_attention, softmax, sparsemax


def _cores() -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    import entmax as pkg

    return {
        "explicit softmax (torch)": lambda s: torch.softmax(s, dim=-1),
        "ours softmax": lambda s: softmax(s, dim=-1),
        "ours sparsemax": lambda s: sparsemax(s, dim=-1),
        "ours entmax15": lambda s: entmax15(s, dim=-1),
        "ours entmax alpha=1.3": lambda s: entmax(s, 1.3, dim=-1),
        "ours entmax alpha=1.3 (tensor, per head)": None,  # filled in per shape
        "entmax pkg sparsemax": lambda s: pkg.sparsemax(s, dim=-1),
        "entmax pkg entmax15": lambda s: pkg.entmax15(s, dim=-1),
        "entmax pkg entmax_bisect alpha=1.3": lambda s: pkg.entmax_bisect(s, 1.3, dim=-1),
    }


def _step(q, k, v, sep: Callable) -> None:
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    (sep(scores) @ v).sum().backward()


def _sdpa(q, k, v) -> None:
    F.scaled_dot_product_attention(q, k, v).sum().backward()


def _time(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench(shape: List[int], repeats: int, device: torch.device, skip: List[str]) -> None:
    b, h, length, d = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=gen).to(device).requires_grad_() for _ in range(3))
    alpha = torch.full((h, 1, 1), 1.3, device=device)
    cores = {name: fn for name, fn in _cores().items() if not any(s in name for s in skip)}
    if "ours entmax alpha=1.3 (tensor, per head)" in cores:
        cores["ours entmax alpha=1.3 (tensor, per head)"] = lambda s: entmax(s, alpha, dim=-1)
    runs: Dict[str, Callable[[], None]] = {"sdpa softmax (reference)": lambda: _sdpa(q, k, v)}
    runs.update({name: (lambda fn=fn: _step(q, k, v, fn)) for name, fn in cores.items()})
    fused = {"sparsemax": "sparsemax", "entmax15": "entmax15", "entmax alpha=1.3": 1.3, "entmax alpha=1.3 (tensor)": alpha}
    for name, sep in fused.items():
        if not any(s in "ours fused " + name for s in skip):
            runs["ours fused " + name] = lambda sep=sep: separated_attention(q, k, v, separation=sep).sum().backward()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for name, fn in runs.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            q.grad = k.grad = v.grad = None
            times[name].append(_time(fn, device))
    ref = statistics.median(times["sdpa softmax (reference)"])
    print(f"\nshape B={b} H={h} L={length} d={d}  device={device}  threads={torch.get_num_threads()}  "
          f"repeats={repeats}")
    print(f"{'core':45s} {'median ms':>10s} {'ratio':>7s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:45s} {med * 1e3:10.1f} {med / ref:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["16,8,256,32", "2,8,2048,32"], help="B,H,L,d per shape")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", nargs="*", default=[], help="skip cores whose name contains one of these")
    args = parser.parse_args()
    torch.manual_seed(0)
    for shape in args.shapes:
        bench([int(x) for x in shape.split(",")], args.repeats, torch.device(args.device), args.skip)


if __name__ == "__main__":
    main()
