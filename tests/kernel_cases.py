"""Shared inputs and runner of the sparse-kernel path tests (`test_kernel_paths.py`, `test_native_kernels.py`)."""

from __future__ import annotations

import torch

from hopformer.functional import set_kernel_path
from hopformer.functional.separation import separated_attention


def qkv(b=2, h=4, n=65, m=65, d=8, dtype=torch.float64, seed=0, scale=1.5):
    """Seeded queries, keys and values `(b, h, n or m, d)` with `requires_grad`."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)  # noqa: E731
    return mk(b, h, n, d), mk(b, h, m, d), mk(b, h, m, d)


def run_on_path(path, q, k, v, separation, mask=None):
    """`[output, d/dq, d/dk, d/dv (, d/dalpha)]` of `separated_attention` on kernel path `path`, for a fixed
    linear loss."""
    set_kernel_path(path)
    inputs = [q, k, v] + ([separation] if isinstance(separation, torch.Tensor) else [])
    out = separated_attention(q, k, v, separation=separation, mask=mask)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return [out.detach()] + list(torch.autograd.grad((out * g).sum(), inputs))


def assert_no_worse(new, ref, truth, floor=1.0):
    """Outputs `new` are no further from `truth` than outputs `ref`: per tensor, max abs error / max(|truth|,
    `floor`) within 2x `ref`'s + 1e-6."""
    def err(out, t):
        return ((out.double() - t).abs().max() / t.abs().max().clamp_min(floor)).item()

    for a, b, t in zip(new, ref, truth):
        assert err(a, t) <= 2 * err(b, t) + 1e-6


def assert_float32_no_worse(new, ref, q, k, v, separation, truth, mask=None):
    """In float32, kernel path `new` is no further from the float64 result `truth` (`run_on_path`'s list) than
    path `ref` (see `assert_no_worse`)."""
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    outs = {path: run_on_path(path, q32, k32, v32, separation, mask) for path in (new, ref)}
    assert_no_worse(outs[new], outs[ref], truth)
