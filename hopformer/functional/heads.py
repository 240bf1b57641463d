"""Contiguous heads for the block-wise sparse attention core: one copy forward, one copy backward.

``rearrange(qkv, "b n (three h d) -> three b h n d")`` gives strided views, which the fused softmax
(``scaled_dot_product_attention``) reads as they are. The sparse core (`_separated_attention`) runs batched
matmuls on ``(batch * heads, n, d)`` blocks and so copies each view into that layout; its gradients then go
back through the views' backward, which stacks them (one copy) and permutes the stack into the packed
layout (a second). :func:`split_heads` makes the contiguous heads itself and writes their gradients
straight into the packed layout: about 7% of a sparse ViT training step on CPU (``benchmarks/training_step.py``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor


class _SplitHeads(torch.autograd.Function):
    """``(B, N, parts * H * d)`` -> ``parts`` contiguous ``(B, H, N, d)``; backward in one ``(B, N, parts, H, d)`` buffer."""

    @staticmethod
    def forward(ctx, packed: Tensor, parts: int, heads: int) -> Tuple[Tensor, ...]:
        split = rearrange(packed, "b n (parts h d) -> parts b h n d", parts=parts, h=heads)
        ctx.parts, ctx.heads = parts, heads
        return tuple(t.contiguous() for t in split.unbind(0))

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        like = next(g for g in grads if g is not None)
        b, h, n, d = like.shape
        packed = like.new_empty(b, n, ctx.parts, h, d)
        for i, g in enumerate(grads):
            if g is None:
                packed[:, :, i].zero_()
            else:
                packed[:, :, i].copy_(rearrange(g, "b h n d -> b n h d"))
        return rearrange(packed, "b n parts h d -> b n (parts h d)"), None, None


def split_heads(packed: Tensor, parts: int, heads: int) -> Tuple[Tensor, ...]:
    """Split a packed projection into contiguous heads.

    Args:
        packed: ``(B, N, parts * heads * d)``, e.g. the output of a ViT's ``qkv`` linear layer (``parts=3``).
        parts: how many tensors are packed along the last dimension (3 for q, k, v).
        heads: number of heads.

    Returns:
        ``parts`` contiguous tensors ``(B, heads, N, d)``, equal to
        ``rearrange(packed, "b n (parts h d) -> parts b h n d").unbind(0)``.
    """
    if packed.dim() != 3 or packed.shape[-1] % (parts * heads):
        raise ValueError(f"packed must have shape (batch, tokens, parts * heads * d) with parts={parts}, "
                         f"heads={heads}; got {tuple(packed.shape)}")
    return _SplitHeads.apply(packed, parts, heads)
