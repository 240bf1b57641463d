"""`hopformer.functional.heads.split_heads`: the contiguous heads of the sparse core, one copy each way."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from hopformer.functional.heads import split_heads


def _packed(b=2, n=5, parts=3, h=4, d=3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(b, n, parts * h * d, generator=gen, dtype=dtype).requires_grad_(True)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_split_heads_equals_the_views_and_their_gradient(parts):
    packed = _packed(parts=parts)
    views = rearrange(packed, "b n (parts h d) -> parts b h n d", parts=parts, h=4).unbind(0)
    heads = split_heads(packed, parts, 4)
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=t.dtype) for i, t in enumerate(views)]
    for a, b in zip(heads, views):
        assert a.is_contiguous() and torch.equal(a, b)
    (g_views,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(views, weights)), packed)
    (g_heads,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(heads, weights)), packed)
    assert torch.equal(g_heads, g_views)


def test_split_heads_gradcheck():
    packed = _packed(b=1, n=3, h=2, d=2)
    assert torch.autograd.gradcheck(lambda x: split_heads(x, 3, 2), (packed,))


def test_split_heads_unused_part_gets_zero_gradient():
    packed = _packed()
    q, k, v = split_heads(packed, 3, 4)
    (grad,) = torch.autograd.grad(v.sum(), packed)
    q_k, v_part = grad.split([2 * 4 * 3, 4 * 3], dim=-1)
    assert torch.equal(q_k, torch.zeros_like(q_k)) and torch.equal(v_part, torch.ones_like(v_part))


def test_split_heads_under_inference_mode():
    packed = _packed().detach()
    with torch.inference_mode():
        heads = split_heads(packed, 3, 4)
    assert all(t.is_contiguous() for t in heads)


def test_split_heads_rejects_a_width_that_does_not_split():
    with pytest.raises(ValueError, match=r"parts=3, heads=4; got \(2, 5, 35\)"):
        split_heads(torch.zeros(2, 5, 35), 3, 4)
