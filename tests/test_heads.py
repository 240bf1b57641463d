"""`split_heads`: the packed head split equals einops' split in value and gradient, packs its backward itself."""

import pytest
import torch
from einops import rearrange

from hopformer.functional.heads import split_heads


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_split_heads_gradcheck(parts):
    packed = torch.randn(2, 5, parts * 3 * 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: split_heads(t, parts, 3), (packed,))


def test_split_heads_equals_rearrange_and_is_contiguous():
    packed = torch.randn(4, 7, 3 * 2 * 8, requires_grad=True)
    ref = rearrange(packed, "b n (three h d) -> three b h n d", three=3, h=2).unbind(0)
    out = split_heads(packed, 3, 2)
    weights = [torch.randn_like(t) for t in out]
    for a, b in zip(out, ref):
        assert a.is_contiguous() and torch.equal(a, b)
    (grad,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(out, weights)), packed)
    (ref_grad,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ref, weights)), packed)
    assert torch.equal(grad, ref_grad)


def test_split_heads_unused_part_gets_zero_gradient():
    packed = torch.randn(2, 3, 3 * 2 * 4, requires_grad=True)
    q, _, v = split_heads(packed, 3, 2)
    (q.sum() + 2 * v.sum()).backward()
    parts = rearrange(packed.grad, "b n (three h d) -> three b h n d", three=3, h=2)
    assert torch.equal(parts[0], torch.ones_like(parts[0]))
    assert torch.equal(parts[1], torch.zeros_like(parts[1]))  # new_empty memory: must be written, not left
    assert torch.equal(parts[2], torch.full_like(parts[2], 2.0))


def test_split_heads_under_inference_mode():
    packed = torch.randn(2, 3, 12)
    with torch.inference_mode():
        q, k = split_heads(packed, 2, 3)
    assert q.shape == (2, 3, 3, 2) and torch.equal(k, rearrange(packed, "b n (two h d) -> two b h n d", two=2, h=3)[1])


@pytest.mark.parametrize("shape", [(2, 3, 10), (2, 12)])
def test_split_heads_bad_shape(shape):
    with pytest.raises(ValueError, match=r"packed must have shape .*parts=3, heads=2.*got \(" + ", ".join(map(str, shape))):
        split_heads(torch.randn(*shape), 3, 2)
