"""Drop-in adapters: Hopfield retrieval behind the interfaces of ``nn.MultiheadAttention`` and timm's ViT ``Attention``.

Both subclass the module they replace, so constructor, parameters, initialisation and state dict are
the originals' (a checkpoint of the original loads as is); only ``forward`` changes: the association
goes through :func:`hopformer.functional.hopfield_retrieve` with any separation and ``update_steps``.
With softmax and one step each reproduces the module it replaces to float tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from ..functional import check_separation, hopfield_energy, hopfield_retrieve
from .hopfield import InverseTemperature, _positive_int
from .masks import merge_masks

__all__ = ["MultiheadHopfield", "HopfieldAttention"]


def _no_op_hook(module, args):
    return None


class _HopfieldOptions:
    """Shared Hopfield options of the adapters and the ``configure`` class factory."""

    def _init_hopfield(self, head_dim: int, num_heads: int, separation, beta, learnable_beta, update_steps, eps):
        self.separation = check_separation(separation)
        self.update_steps = _positive_int("update_steps", update_steps)
        if eps is not None and not eps > 0:
            raise ValueError(f"eps must be positive or None, got {eps!r}")
        self.eps = eps
        self.beta = InverseTemperature(beta if beta is not None else head_dim**-0.5, num_heads, learnable_beta)

    def current_separation(self):
        """The separation used in this forward (subclasses with a learnable alpha return a tensor)."""
        return self.separation

    @classmethod
    def configure(cls, **options) -> type:
        """A subclass whose constructor defaults to ``options`` (any constructor argument of ``cls``).

        For code that builds the layer itself from a class, such as timm's ``VisionTransformer(attn_layer=...)``
        (which needs a class, not a ``functools.partial``):
        ``VisionTransformer(attn_layer=HopfieldAttention.configure(separation="sparsemax", update_steps=2))``.
        """
        base_init = cls.__init__

        def __init__(self, *args, **kwargs):
            base_init(self, *args, **{**options, **kwargs})

        namespace = {"__init__": __init__, "__module__": cls.__module__, "__doc__": cls.__doc__}
        return type(cls.__name__, (cls,), namespace)


class MultiheadHopfield(_HopfieldOptions, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with Hopfield retrieval: same constructor, ``forward`` and return value.

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
            device, dtype: as ``nn.MultiheadAttention`` (``dropout`` acts on the association weights).
        separation: ``"softmax"``, ``"sparsemax"``, ``"entmax15"`` or a float alpha in [1, 2].
        beta: inverse temperature; defaults to ``1 / sqrt(head_dim)`` (attention's scaling).
        learnable_beta: learn one ``beta`` per head (adds ``beta.log_beta`` to the state dict).
        update_steps: retrieval steps in the projected key space before the value read-out.
        eps: stop the steps early once the state changes less than ``eps``.

    The returned attention weights are the association matrix of the last step, before dropout.
    ``nn.TransformerEncoderLayer``'s inference fast path would compute softmax attention from this
    module's weights without calling ``forward``; a no-op forward pre-hook turns that path off.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, **hopfield):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self._init_hopfield(self.head_dim, num_heads, hopfield.pop("separation", "softmax"), hopfield.pop("beta", None),
                            hopfield.pop("learnable_beta", False), hopfield.pop("update_steps", 1),
                            hopfield.pop("eps", None))
        if hopfield:
            raise TypeError(f"MultiheadHopfield got unexpected keyword arguments {sorted(hopfield)}")
        self.register_forward_pre_hook(_no_op_hook)  # keeps TransformerEncoderLayer off its softmax fast path

    def _projections(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    @staticmethod
    def _pad_masks(key_padding_mask: Tensor | None, attn_mask: Tensor | None):
        """One more key (bias_kv or zero attention): its mask column lets it take part."""
        pad = lambda m: None if m is None else torch.cat([m, m.new_zeros(*m.shape[:-1], 1)], dim=-1)  # noqa: E731
        return pad(key_padding_mask), pad(attn_mask)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: returns ``(output, weights or None)``."""
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (rearrange(t, "l e -> 1 l e") for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else rearrange(key_padding_mask, "s -> 1 s")
        elif query.dim() != 3:
            raise ValueError(f"query must have shape (L, E), (L, N, E) or (N, L, E), got {tuple(query.shape)}")
        elif not self.batch_first:
            query, key, value = (rearrange(t, "l n e -> n l e") for t in (query, key, value))
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must have {self.embed_dim} features (embed_dim), got shape {tuple(query.shape)}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key and value must share batch and length, got {tuple(key.shape)} and {tuple(value.shape)}")
        batch, n_query = query.shape[:2]
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(n_query, key.shape[1], dtype=torch.bool, device=query.device).triu(1)

        q, k, v = self._projections(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, repeat(self.bias_k, "1 1 e -> n 1 e", n=batch)], dim=1)
            v = torch.cat([v, repeat(self.bias_v, "1 1 e -> n 1 e", n=batch)], dim=1)
            key_padding_mask, attn_mask = self._pad_masks(key_padding_mask, attn_mask)
        q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=self.num_heads) for t in (q, k, v))
        if self.add_zero_attn:
            k, v = (torch.cat([t, t.new_zeros(*t.shape[:2], 1, t.shape[-1])], dim=2) for t in (k, v))
            key_padding_mask, attn_mask = self._pad_masks(key_padding_mask, attn_mask)
        mask = merge_masks(key_padding_mask, attn_mask, batch=batch, heads=self.num_heads,
                           n_query=n_query, n_keys=k.shape[2], dtype=q.dtype)
        result = hopfield_retrieve(q, k, v, beta=self.beta(), separation=self.current_separation(),
                                   steps=self.update_steps, eps=self.eps, mask=mask,
                                   dropout=self.dropout if self.training else 0.0, return_association=need_weights)
        out, weights = result if need_weights else (result, None)
        out = self.out_proj(rearrange(out, "n h l d -> n l (h d)"))
        if weights is not None and average_attn_weights:
            weights = reduce(weights, "n h l s -> n l s", "mean")
        if unbatched:
            out = rearrange(out, "1 l e -> l e")
            weights = None if weights is None else weights[0]
        elif not self.batch_first:
            out = rearrange(out, "n l e -> l n e")
        return out, weights


class HopfieldAttention(_HopfieldOptions, Attention):
    """timm's ViT ``Attention`` (``x -> x``) with Hopfield self-association of the tokens.

    Same constructor, parameters and state dict as ``timm.models.vision_transformer.Attention``, plus:

    Args:
        separation: ``"softmax"``, ``"sparsemax"``, ``"entmax15"`` or a float alpha in [1, 2].
        beta: inverse temperature; defaults to timm's ``head_dim ** -0.5``.
        learnable_beta: learn one ``beta`` per head.
        update_steps: retrieval steps per forward.
        eps: stop the steps early once the state changes less than ``eps``.

    Use ``HopfieldAttention.configure(separation=...)`` as ``VisionTransformer``'s ``attn_layer``.
    ``attn_mask`` follows ``scaled_dot_product_attention`` (boolean ``True`` = key takes part).
    """

    def __init__(self, dim: int, num_heads: int = 8, *args, **kwargs):
        options = dict(kwargs)
        hopfield = {name: options.pop(name) for name in ("separation", "beta", "learnable_beta", "update_steps", "eps")
                    if name in options}
        super().__init__(dim, num_heads, *args, **options)
        self._init_hopfield(self.head_dim, num_heads, hopfield.get("separation", "softmax"), hopfield.get("beta"),
                            hopfield.get("learnable_beta", False), hopfield.get("update_steps", 1), hopfield.get("eps"))

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        return self.q_norm(q), self.k_norm(k), v

    def _mask(self, attn_mask: Tensor | None, is_causal: bool, n: int, device) -> Tensor | None:
        if not is_causal:
            return attn_mask
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        if attn_mask is None:
            return causal
        if attn_mask.dtype == torch.bool:
            return causal & attn_mask
        return attn_mask.masked_fill(~causal, float("-inf"))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                return_association: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``x`` ``(B, N, dim)`` -> ``(B, N, dim_out)`` (and the association ``(B, heads, N, N)`` if asked)."""
        if x.dim() != 3:
            raise ValueError(f"x must have shape (batch, tokens, dim), got {tuple(x.shape)}")
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._qkv(x)
        mask = self._mask(attn_mask, is_causal, x.shape[1], x.device)
        result = hopfield_retrieve(q, k, v, beta=self.beta(), separation=self.current_separation(),
                                   steps=self.update_steps, eps=self.eps, mask=mask,
                                   dropout=self.attn_drop.p if self.training else 0.0,
                                   return_association=return_association)
        out, weights = result if return_association else (result, None)
        out = self.norm(rearrange(out, "b h n d -> b n (h d)"))
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out))
        return (out, weights) if return_association else out

    def energy(self, x: Tensor) -> Tensor:
        """Energy of each token's query against the tokens' keys, ``(B, heads, N)`` (Ramsauer et al. 2020; Hu et al. 2023; Wu et al. 2024)."""
        q, k, _ = self._qkv(x)
        return hopfield_energy(q, k, beta=self.beta(), separation=self.current_separation())
