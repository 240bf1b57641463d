"""Masks in ``nn.MultiheadAttention``'s convention, turned into the functional core's convention.

Layers take ``key_padding_mask`` ``(batch, n_keys)`` and ``attn_mask`` ``(n_query, n_keys)`` or
``(batch * heads, n_query, n_keys)``; boolean entries are ``True`` where a key is *ignored*, float
entries are added to the scores. The functional core (like ``scaled_dot_product_attention``)
wants one mask broadcastable to ``(batch, heads, n_query, n_keys)`` with ``True`` where a key
*takes part*, or an additive float mask.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

__all__ = ["merge_masks"]


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def merge_masks(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    *,
    batch: int,
    heads: int,
    n_query: int,
    n_keys: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """Combine the two layer masks into one core mask of shape ``(batch or 1, heads or 1, n_query, n_keys)``."""
    for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if m is not None and not (m.dtype == torch.bool or m.is_floating_point()):
            raise TypeError(f"{name} must be a boolean (True = ignore) or floating point (added to the scores) tensor, "
                            f"as in nn.MultiheadAttention; got dtype {m.dtype}")
    parts = []
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, n_keys):
            raise ValueError(
                f"key_padding_mask must have shape (batch, n_keys) = {(batch, n_keys)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        parts.append(rearrange(key_padding_mask, "b k -> b 1 1 k"))
    if attn_mask is not None:
        if tuple(attn_mask.shape) == (n_query, n_keys):
            parts.append(rearrange(attn_mask, "q k -> 1 1 q k"))
        elif tuple(attn_mask.shape) == (batch * heads, n_query, n_keys):
            parts.append(rearrange(attn_mask, "(b h) q k -> b h q k", b=batch))
        else:
            raise ValueError(
                f"attn_mask must have shape (n_query, n_keys) = {(n_query, n_keys)} or "
                f"(batch * heads, n_query, n_keys) = {(batch * heads, n_query, n_keys)}, got {tuple(attn_mask.shape)}"
            )
    if not parts:
        return None
    if all(p.dtype == torch.bool for p in parts):
        ignored = parts[0] if len(parts) == 1 else parts[0] | parts[1]
        return ~ignored
    total = _additive(parts[0], dtype)
    for p in parts[1:]:
        total = total + _additive(p, dtype)
    return total
