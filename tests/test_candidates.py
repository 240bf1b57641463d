"""The sparse solvers restricted to the candidate entries `x > max - 1` give the whole-row results."""

from __future__ import annotations

import pytest
import torch

from hopformer.functional import _separation_kernels as sk
from hopformer.functional.separation import entmax, separated_attention, sparsemax


def _both(fn):
    """(with candidate compaction, without)."""
    out = []
    for compact in (True, False):
        sk._COMPACT = compact
        try:
            out.append(fn())
        finally:
            sk._COMPACT = True
    return out


@pytest.mark.parametrize("separation", ["sparsemax", "entmax15", 1.6, "per_head"])
def test_compacted_attention_matches_whole_rows(separation):
    gen = torch.Generator().manual_seed(0)
    mk = lambda *s: (3 * torch.randn(*s, generator=gen, dtype=torch.float64)).requires_grad_()  # noqa: E731
    q, k, v = mk(2, 3, 40, 8), mk(2, 3, 40, 8), mk(2, 3, 40, 5)
    mask = torch.rand(2, 1, 40, 40, generator=gen) > 0.2
    mask[0, 0, 3] = False  # one row with every key masked
    sep = torch.tensor([1.3, 2.0, 1.7], dtype=torch.float64).view(3, 1, 1) if separation == "per_head" else separation
    cand = (torch.matmul(q, k.transpose(-1, -2)) * 0.5).detach()
    assert ((cand - cand.amax(-1, keepdim=True)) > -1).float().mean() < 0.25  # the compacted path runs

    def run():
        out = separated_attention(q, k, v, separation=sep, beta=0.5, mask=mask)
        return (out, *torch.autograd.grad((out * out.cos()).sum(), (q, k, v)))

    for a, b in zip(*_both(run)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_compacted_maps_match_whole_rows_and_gradcheck():
    gen = torch.Generator().manual_seed(1)
    z = 4 * torch.randn(6, 32, generator=gen, dtype=torch.float64)
    z[2] = float("-inf")
    z[4, :20] = float("-inf")
    for fn in (sparsemax, lambda s: entmax(s, 1.5), lambda s: entmax(s, 1.25)):
        a, b = _both(lambda: fn(z))
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    q, k, v = (torch.randn(1, 2, 12, 4, generator=gen, dtype=torch.float64).mul(3).requires_grad_() for _ in range(3))
    alpha = torch.tensor([1.4, 1.8], dtype=torch.float64).view(2, 1, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, a: separated_attention(q, k, v, separation=a), (q, k, v, alpha))
    assert torch.autograd.gradcheck(lambda q, k, v: separated_attention(q, k, v, separation="sparsemax"), (q, k, v))
