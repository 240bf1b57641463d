"""Forward+backward time and memory of the attention core `Sep(q k^T / sqrt(d)) v`, ratio to SDPA.

One table per sequence length L (default 64, 256, 1024, 4096; batch x heads shrink with L so each
table is a similar amount of work). The reference is the fused softmax core
`torch.nn.functional.scaled_dot_product_attention`, measured in the same run, round-robin with the
others (load changes hit every core alike). Rows:

- "explicit softmax": `softmax(q k^T) v` with matmuls, the floor for any core that materialises the scores;
- "sparsemax", "entmax15", "entmax alpha=1.3": `hopformer.functional.separated_attention` (block-wise,
  thresholds saved, scores never materialised);
- "learnable alpha": the same with a per-head tensor alpha that receives a gradient (Correia et al. 2019);
- with `--maps`: the separation maps on materialised scores (`separate`), and with `--pkg` the
  `entmax` package.

Memory: "saved MiB" is what autograd keeps between forward and backward (inputs included);
"peak MiB" the peak above the inputs during one forward+backward (CPU: sampled resident set size).
Targets (issue 14): sparsemax and entmax15 <= 1.5x SDPA, learnable alpha <= 2.5x.

    flock /tmp/hopformer-heavy.lock python benchmarks/separation.py                 # all lengths
    python benchmarks/separation.py --lengths 64 256 --repeats 5 --threads 1
    python benchmarks/separation.py --device cuda                                   # see also gpu.py
    python benchmarks/separation.py --threads 1 --ab     # + the sparse cores on the torch-op kernels
    python benchmarks/separation.py --threads 1 --repeats 9 --stat min   # minimum of the rounds (noisy machines)

With ``--ab [PATH]`` each sparse core is also timed on the kernels of another path
(``hopformer.functional.set_kernel_path``): ``torch`` (default: the torch-op kernels, i.e. before the
fused C++ kernels) or ``reference`` (before the small-sequence work), interleaved in the same run;
the last column is current / that path.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout first
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hopformer  # noqa: E402
from _common import add_stat_option, interleaved, machine_line, on_kernel_path, peak_bytes, saved_bytes  # noqa: E402
from hopformer.functional.separation import entmax, entmax15, separated_attention, sparsemax  # noqa: E402

# (batch, heads) per length: B * H * L^2 scores kept between 2^22 and 2^26
SHAPES: Dict[int, Tuple[int, int]] = {64: (64, 8), 256: (16, 8), 1024: (4, 4), 4096: (1, 2)}
HEAD_DIM = 32


SPARSE = ("sparsemax", "entmax15", "entmax alpha=1.3", "learnable alpha (per head, grad)")


def cores(h: int, device: torch.device, maps: bool, pkg: bool, ab: Optional[str] = None) -> Dict[str, Callable]:
    """name -> f(q, k, v) returning the core's output (with `ab` a kernel path, also the sparse cores
    on that path's kernels)."""
    alpha = torch.full((h, 1, 1), 1.3, device=device, requires_grad=True)
    out: Dict[str, Callable] = {
        "sdpa softmax (reference)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "explicit softmax": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / HEAD_DIM**0.5, -1) @ v,
        "sparsemax": lambda q, k, v: separated_attention(q, k, v, separation="sparsemax"),
        "entmax15": lambda q, k, v: separated_attention(q, k, v, separation="entmax15"),
        "entmax alpha=1.3": lambda q, k, v: separated_attention(q, k, v, separation=1.3),
        "learnable alpha (per head, grad)": lambda q, k, v: separated_attention(q, k, v, separation=alpha),
    }
    if ab:
        out.update({f"{name} [{ab} kernels]": on_kernel_path(out[name], ab) for name in SPARSE})

    def on_scores(sep):
        return lambda q, k, v: sep(q @ k.transpose(-1, -2) / HEAD_DIM**0.5) @ v

    if maps:
        out.update({"map sparsemax (scores)": on_scores(lambda s: sparsemax(s, -1)),
                    "map entmax15 (scores)": on_scores(lambda s: entmax15(s, -1)),
                    "map alpha=1.3 (scores)": on_scores(lambda s: entmax(s, 1.3, -1))})
    if pkg:
        import entmax as e

        out.update({"entmax pkg sparsemax": on_scores(lambda s: e.sparsemax(s, dim=-1)),
                    "entmax pkg entmax15": on_scores(lambda s: e.entmax15(s, dim=-1)),
                    "entmax pkg bisect alpha=1.3": on_scores(lambda s: e.entmax_bisect(s, 1.3, dim=-1))})
    return out


def bench(length: int, repeats: int, device: torch.device, maps: bool, pkg: bool, memory: bool,
          dtype: torch.dtype = torch.float32, ab: Optional[str] = None, stat: str = "median") -> Dict[str, float]:
    b, h = SHAPES.get(length, (1, 2))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, length, HEAD_DIM, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    fns = cores(h, device, maps, pkg, ab)

    def step(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).float().sum().backward()
        return run

    med = interleaved({name: step(fn) for name, fn in fns.items()}, repeats, device, stat=stat)
    ref = med["sdpa softmax (reference)"]
    print(f"\n### L={length}: B={b} H={h} d={HEAD_DIM} {str(dtype).removeprefix('torch.')} device={device} "
          f"threads={torch.get_num_threads()} workers={hopformer.get_num_workers()} repeats={repeats} stat={stat}")
    head = f"| {'core':34s} | {'ms':>8s} | {'x SDPA':>6s} |"
    print(head + (" saved MiB | peak MiB |" if memory else "") + (f" current / {ab} |" if ab else ""))
    print("|" + "---|" * (3 + 2 * memory + bool(ab)))
    for name, fn in fns.items():
        row = f"| {name:34s} | {med[name] * 1e3:8.1f} | {med[name] / ref:6.2f} |"
        if memory:
            q.grad = k.grad = v.grad = None
            saved = saved_bytes(lambda: fn(q, k, v).float())
            peak = peak_bytes(step(fn), device)
            row += f" {saved / 2**20:9.1f} | {peak / 2**20:8.1f} |"
        if ab and f"{name} [{ab} kernels]" in med:
            row += f" {med[name] / med[f'{name} [{ab} kernels]']:.3f} |"
        print(row, flush=True)
    return {name: t / ref for name, t in med.items()}


def sweep_chunk(lengths, repeats: int, sizes, stat: str = "median") -> None:
    """Forward+backward time of the fused sparse cores per CPU block size (`_CHUNK_ELEMS` scores)."""
    import hopformer.functional._separated_attention as sa
    import hopformer.functional._separation_kernels as sk

    default = sa._CHUNK_ELEMS
    print(f"\n### block size sweep (default 2^{default.bit_length() - 1} scores), threads={torch.get_num_threads()}")
    print("| L | core | " + " | ".join(f"2^{s} ms" for s in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for length in lengths:
        b, h = SHAPES.get(length, (1, 2))
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, length, HEAD_DIM, generator=gen).requires_grad_() for _ in range(3))
        for sep in ("sparsemax", "entmax15"):
            runs = {}
            for size in sizes:
                def run(size=size, sep=sep):
                    sa._CHUNK_ELEMS = sk._CHUNK_ELEMS = 1 << size
                    separated_attention(q, k, v, separation=sep).sum().backward()
                runs[size] = run
            med = interleaved(runs, repeats, torch.device("cpu"), stat=stat)
            print(f"| {length} | {sep} | " + " | ".join(f"{med[s] * 1e3:.1f}" for s in sizes) + " |", flush=True)
    sa._CHUNK_ELEMS = sk._CHUNK_ELEMS = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (L=4096: at most 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--maps", action="store_true", help="also the maps on materialised scores")
    parser.add_argument("--pkg", action="store_true", help="also the entmax package")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory columns")
    parser.add_argument("--ab", nargs="?", const="torch", default=None, choices=["torch", "reference", "native", "rows"],
                        help="also the sparse cores on the kernels of this path (default: torch)")
    parser.add_argument("--sweep-chunk", nargs="*", type=int, default=None,
                        help="instead: time the sparse cores per block size 2^s (e.g. 16 17 18 19)")
    add_stat_option(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(), f"\nhopformer from {os.path.dirname(hopformer.__file__)}")
    if args.sweep_chunk is not None:
        sweep_chunk(args.lengths, args.repeats, args.sweep_chunk or [16, 17, 18, 19], args.stat)
        return
    for length in args.lengths:
        bench(length, min(args.repeats, 3) if length >= 4096 else args.repeats, torch.device(args.device),
              args.maps, args.pkg, not args.no_memory, ab=args.ab, stat=args.stat)


if __name__ == "__main__":
    main()
