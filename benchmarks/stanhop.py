"""STanHop-Net epoch time at the paper setting of ETTh1-96, ratio to a minimal Crossformer-style reference.

Paper setting (``configs/forecast/base.yaml``; U-Hop paper Tables 7-8): 7 series, input 168,
horizon 96, patch 12, window 2, 1 layer, d_model 256, 4 heads, d_ff 512, 10 routers, dropout 0.3,
batch 16, Adam lr 1e-4, gradient clipping 5. The reference below has the same shapes and the same
two-stage structure (Crossformer, Zhang & Yan 2023: time attention per series, router attention
across series, segment merging, a decoder with cross-attention per scale) with plain softmax
multi-head attention through ``scaled_dot_product_attention``. A fixed number of training steps is
timed round-robin (random batches of the right shape); the epoch time is extrapolated to the
ETTh1 training split (8640 rows: 8377 windows, 524 steps of 16). Target (issue 14): <= 1.3x.

    flock /tmp/hopformer-heavy.lock python benchmarks/stanhop.py --threads 1
    python benchmarks/stanhop.py --steps 10 --hopfield generalized dense sparse
    python benchmarks/stanhop.py --threads 1 --ab    # + each variant on the reference sparse kernels
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout first
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hopformer  # noqa: E402
from _common import interleaved, machine_line, on_kernel_path  # noqa: E402
from hopformer.models import STanHopNet  # noqa: E402

PAPER = dict(num_series=7, input_len=168, horizon=96, seg_len=12, win_size=2, num_layers=1, d_model=256,
             num_heads=4, d_ff=512, num_router=10, dropout=0.3)
TRAIN_ROWS = 12 * 30 * 24  # ETTh1 training split (Informer/Crossformer borders)
# --hopfield names (STanHop's former vocabulary, docs/ARCHITECTURE.md) -> STanHopNet's layer spec
KINDS = {"generalized": {}, "dense": dict(separation="softmax"), "sparse": dict(separation="sparsemax"),
         "kernelized": dict(attention="kernelized"), "continuous": dict(attention="continuous", separation="softmax")}


class Attention(nn.Module):
    """Multi-head softmax attention (Vaswani et al. 2017) through fused SDPA, with attention dropout."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(y)), split(self.v(y)),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o(rearrange(out, "b h n d -> b n (h d)"))


def _mlp(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class TwoStageAttention(nn.Module):
    """Crossformer's two-stage attention layer: cross-time per series, then cross-dimension via routers."""

    def __init__(self, d: int, heads: int, d_ff: int, routers: int, dropout: float) -> None:
        super().__init__()
        self.time, self.sender, self.receiver = (Attention(d, heads, dropout) for _ in range(3))
        self.router = nn.Parameter(torch.randn(routers, d) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(4))
        self.mlp1, self.mlp2 = _mlp(d, d_ff, dropout), _mlp(d, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        z = rearrange(x, "b c s d -> (b c) s d")
        z = self.norms[0](z + self.drop(self.time(z, z)))
        z = self.norms[1](z + self.drop(self.mlp1(z)))
        z = rearrange(z, "(b c) s d -> (b s) c d", b=b)
        buffer = self.sender(repeat(self.router, "r d -> n r d", n=z.shape[0]), z)
        z = self.norms[2](z + self.drop(self.receiver(z, buffer)))
        z = self.norms[3](z + self.drop(self.mlp2(z)))
        return rearrange(z, "(b s) c d -> b c s d", b=b)


class CrossformerReference(nn.Module):
    """Minimal Crossformer (Zhang & Yan 2023) with STanHop-Net's shapes: ``(B, L, C) -> (B, H, C)``."""

    def __init__(self, num_series: int, input_len: int, horizon: int, seg_len: int, win_size: int, num_layers: int,
                 d_model: int, num_heads: int, d_ff: int, num_router: int, dropout: float) -> None:
        super().__init__()
        self.seg_len, self.horizon, self.win = seg_len, horizon, win_size
        self.patches = math.ceil(input_len / seg_len)
        self.pad = self.patches * seg_len - input_len
        self.embed = nn.Linear(seg_len, d_model)
        self.pos = nn.Parameter(torch.randn(num_series, self.patches, d_model) * 0.02)
        self.norm = nn.LayerNorm(d_model)
        self.merge = nn.ModuleList(nn.Linear(win_size * d_model, d_model) for _ in range(num_layers))
        args = (d_model, num_heads, d_ff, num_router, dropout)
        self.encoder = nn.ModuleList(TwoStageAttention(*args) for _ in range(num_layers))
        self.out = math.ceil(horizon / seg_len)
        self.dec_pos = nn.Parameter(torch.randn(num_series, self.out, d_model) * 0.02)
        self.dec_self = nn.ModuleList(TwoStageAttention(*args) for _ in range(num_layers + 1))
        self.dec_cross = nn.ModuleList(Attention(d_model, num_heads, dropout) for _ in range(num_layers + 1))
        self.dec_norm = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(2 * (num_layers + 1)))
        self.dec_mlp = nn.ModuleList(_mlp(d_model, d_model, dropout) for _ in range(num_layers + 1))
        self.predict = nn.ModuleList(nn.Linear(d_model, seg_len) for _ in range(num_layers + 1))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        x = rearrange(x, "b l c -> b c l")
        if self.pad:
            x = torch.cat([repeat(x[..., :1], "b c 1 -> b c p", p=self.pad), x], dim=-1)
        z = self.norm(self.embed(rearrange(x, "b c (s p) -> b c s p", p=self.seg_len)) + self.pos)
        scales = [z]
        for i, (merge, block) in enumerate(zip(self.merge, self.encoder)):
            if i > 0:
                pad = -z.shape[2] % self.win
                if pad:
                    z = torch.cat([z, repeat(z[:, :, -1], "b c d -> b c p d", p=pad)], dim=2)
                z = merge(rearrange(z, "b c (s w) d -> b c s (w d)", w=self.win))
            z = block(z)
            scales.append(z)
        q = repeat(self.dec_pos, "c s d -> b c s d", b=b)
        pred = 0.0
        for i, cross in enumerate(scales):
            q = rearrange(self.dec_self[i](q), "b c s d -> (b c) s d")
            kv = rearrange(cross, "b c s d -> (b c) s d")
            q = self.dec_norm[2 * i](q + self.drop(self.dec_cross[i](q, kv)))
            q = self.dec_norm[2 * i + 1](q + self.drop(self.dec_mlp[i](q)))
            q = rearrange(q, "(b c) s d -> b c s d", b=b)
            pred = pred + self.predict[i](q)
        return rearrange(pred, "b c s p -> b (s p) c")[:, : self.horizon]


def stepper(net: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    net.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(net(x), y).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (round-robin)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hopfield", nargs="+", default=["generalized", "dense"], choices=list(KINDS),
                        help="STanHop-Net variants (generalized = the paper's GSH)")
    parser.add_argument("--ab", nargs="?", const="torch", default=None, choices=["torch", "reference", "native", "rows"],
                        help="also each variant on the sparse kernels of this path (set_kernel_path; default: torch)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine_line(), f"\nhopformer from {os.path.dirname(hopformer.__file__)}, workers={hopformer.get_num_workers()}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, PAPER["input_len"], PAPER["num_series"], generator=gen).to(device)
    y = torch.randn(args.batch, PAPER["horizon"], PAPER["num_series"], generator=gen).to(device)
    torch.manual_seed(0)
    runs = {"Crossformer-style reference (SDPA)": stepper(CrossformerReference(**PAPER).to(device), x, y)}
    for kind in args.hopfield:
        torch.manual_seed(0)
        runs[f"STanHop-Net hopfield={kind}"] = stepper(STanHopNet(**PAPER, **KINDS[kind]).to(device), x, y)
        if args.ab and kind != "dense":
            torch.manual_seed(0)
            runs[f"STanHop-Net hopfield={kind} [{args.ab} kernels]"] = on_kernel_path(
                stepper(STanHopNet(**PAPER, **KINDS[kind]).to(device), x, y), args.ab)
    med = interleaved(runs, args.steps, device)
    ref = med["Crossformer-style reference (SDPA)"]
    steps = math.ceil((TRAIN_ROWS - PAPER["input_len"] - PAPER["horizon"] + 1) / args.batch)
    print(f"\n### ETTh1-96 paper setting, batch {args.batch}, device={device}, threads={torch.get_num_threads()}, "
          f"{args.steps} timed steps each; epoch = {steps} steps")
    print(f"| {'model':40s} | ms/step | it/s | epoch (min, extrapolated) | x reference |")
    print("|---|---|---|---|---|")
    for name, t in med.items():
        print(f"| {name:40s} | {t * 1e3:.1f} | {1 / t:.2f} | {steps * t / 60:.2f} | {t / ref:.2f} |")


if __name__ == "__main__":
    main()
