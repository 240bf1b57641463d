"""Forward+backward time and memory of each Hopfield layer variant, as ratios to ``nn.MultiheadAttention``.

    python benchmarks/layers.py                 # both cases on CPU
    python benchmarks/layers.py --case short    # (B=16, L=256, d=256, heads=8) only
    python benchmarks/layers.py --device cuda   # on a GPU (memory = peak allocated)

The reference is ``nn.MultiheadAttention(d, heads, batch_first=True)`` called with ``need_weights=False``
(its fused path), measured in the same run. Time: median of repeated forward+backward passes after
warm-up (``torch.utils.benchmark``). Memory: on CPU the bytes of tensors saved for backward (the
activation memory training pays for; CPU has no peak-allocation counter), on CUDA the peak allocated.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch import nn
from torch.utils import benchmark

from hopformer.layers import (
    ContinuousHopfield,
    GeneralizedSparseHopfield,
    Hopfield,
    KernelizedHopfield,
    MultiheadHopfield,
    SparseHopfield,
)

CASES = {"short": dict(batch=16, length=256, dim=256, heads=8), "long": dict(batch=2, length=2048, dim=256, heads=8)}


def variants(dim: int, heads: int) -> dict[str, Callable[[], nn.Module]]:
    out = {
        "nn.MultiheadAttention (reference)": lambda: nn.MultiheadAttention(dim, heads, batch_first=True),
        "MultiheadHopfield softmax": lambda: MultiheadHopfield(dim, heads, batch_first=True),
        "Hopfield softmax, 1 step": lambda: Hopfield(dim, heads),
        "Hopfield softmax, 3 steps": lambda: Hopfield(dim, heads, update_steps=3),
        "SparseHopfield (sparsemax)": lambda: SparseHopfield(dim, heads),
        "GeneralizedSparse alpha=1.5 fixed": lambda: GeneralizedSparseHopfield(dim, heads, learnable_alpha=False),
        "GeneralizedSparse alpha learnable": lambda: GeneralizedSparseHopfield(dim, heads, alpha=1.3),
    }
    out["KernelizedHopfield (U-Hop) softmax"] = lambda: KernelizedHopfield(dim, heads)
    out["ContinuousHopfield"] = lambda: ContinuousHopfield(dim, heads)
    return out


def call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.MultiheadAttention):
        return module(x, x, x, need_weights=False)[0]
    return module(x)


def step(module: nn.Module, x: torch.Tensor) -> None:
    call(module, x).sum().backward()


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}  # one count per storage: several ops may save the same tensor

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call(module, x)
    out.sum().backward()
    return sum(storages.values())


def peak_cuda_bytes(module: nn.Module, x: torch.Tensor) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(module, x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_case(name: str, batch: int, length: int, dim: int, heads: int, device: str, min_time: float) -> None:
    print(f"\n## case {name}: B={batch}, L={length}, d={dim}, heads={heads}, device={device}, "
          f"threads={torch.get_num_threads()}")
    print(f"{'layer':40s} {'time ms':>9s} {'x MHA':>7s} {'mem MiB':>9s} {'x MHA':>7s}")
    rows = []
    for label, build in variants(dim, heads).items():
        torch.manual_seed(0)
        module = build().to(device)
        x = torch.randn(batch, length, dim, device=device, requires_grad=True)
        try:
            step(module, x)  # warm-up
            timer = benchmark.Timer("step(module, x)", globals=dict(step=step, module=module, x=x))
            seconds = timer.blocked_autorange(min_run_time=min_time).median
            memory = peak_cuda_bytes(module, x) if device == "cuda" else saved_bytes(module, x)
        except Exception as error:  # noqa: BLE001 - a benchmark reports failures and goes on
            print(f"{label:40s} failed: {type(error).__name__}: {error}")
            continue
        rows.append((label, seconds, memory))
        ref_t, ref_m = rows[0][1], rows[0][2]
        print(f"{label:40s} {seconds * 1e3:9.1f} {seconds / ref_t:7.2f} {memory / 2**20:9.1f} {memory / ref_m:7.2f}",
              flush=True)
    one = dict((r[0], r[1]) for r in rows)
    if "Hopfield softmax, 1 step" in one and "Hopfield softmax, 3 steps" in one:
        print(f"3 steps / 1 step: {one['Hopfield softmax, 3 steps'] / one['Hopfield softmax, 1 step']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per variant")
    args = parser.parse_args()
    for name, shape in CASES.items():
        if args.case in (name, "all"):
            run_case(name, **shape, device=args.device, min_time=args.min_time)


if __name__ == "__main__":
    main()
