"""Head split of a packed projection, `(B, N, parts * H * d) -> parts x (B, H, N, d)`, without a stack in the backward.

A fused `qkv` projection split with `rearrange(..., "b n (three h d) -> three b h n d")` hands each part on as a
strided view. The sparse attention cores need `(B * H, N, d)` blocks and copy each part; autograd then undoes the
split with a stack of the three gradients and a second, permuting copy for the projection's backward. Here the
forward makes the contiguous copies and the backward writes each gradient straight into one packed tensor: per
training step of a ViT-Mini layer one copy of `qkv` fewer and no `(3, B, H, N, d)` temporary.
"""

from __future__ import annotations

from typing import Tuple

import torch
from einops import rearrange
from torch import Tensor


class _SplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed: Tensor, parts: int, heads: int) -> Tuple[Tensor, ...]:
        ctx.shape, ctx.parts, ctx.heads = packed.shape, parts, heads
        ctx.set_materialize_grads(False)  # an unused part's gradient stays None: zeros written in place below
        views = rearrange(packed, "b n (parts h d) -> parts b h n d", parts=parts, h=heads)
        return tuple(view.contiguous() for view in views)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        given = [g for g in grads if g is not None]
        if not given:
            return None, None, None
        packed = given[0].new_empty(ctx.shape)
        views = rearrange(packed, "b n (parts h d) -> parts b h n d", parts=ctx.parts, h=ctx.heads)
        for view, grad in zip(views, grads):
            if grad is None:
                view.zero_()
            else:
                view.copy_(grad)
        return packed, None, None


def split_heads(packed: Tensor, parts: int, heads: int) -> Tuple[Tensor, ...]:
    """Split a packed projection `(B, N, parts * heads * d)` into `parts` contiguous `(B, heads, N, d)` tensors.

    Equal to `rearrange(packed, "b n (parts h d) -> parts b h n d").unbind(0)` in value and gradient; the parts
    come out contiguous (a sparse attention core reads them without another copy) and the backward packs the
    parts' gradients into one tensor directly.
    """
    if packed.dim() != 3 or packed.shape[-1] % (parts * heads):
        raise ValueError(
            f"packed must have shape (batch, tokens, parts * heads * head_dim) with parts={parts}, heads={heads}, "
            f"got {tuple(packed.shape)}"
        )
    return _SplitHeads.apply(packed, parts, heads)
