"""Drop-in interfaces: Hopfield retrieval behind ``nn.MultiheadAttention`` and timm's ViT ``Attention``.

Both subclass the module they replace, so constructor, parameters, initialisation and state dict are
the originals' (a checkpoint of the original loads as is); only ``forward`` changes: the association goes
through the layer's :class:`~hopformer.layers.retrieval.HopfieldRetrieval` (any separation, learned alpha,
``update_steps``, discrete or continuous memory), optionally after a U-Hop feature map on the query/key
patterns. With softmax and one step each reproduces the module it replaces to float tolerance.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from ..functional.heads import split_heads
from .continuous import as_memory
from .interface import HopfieldInterface
from .kernel import UHopFeatureMap
from .masks import merge_masks
from .retrieval import CONTINUOUS_ATTN_MASK_ERROR, HopfieldRetrieval

__all__ = ["MultiheadHopfield", "HopfieldAttention", "HOPFIELD_OPTIONS"]

# the Hopfield options the drop-ins take on top of the constructor of the module they replace
RETRIEVAL_OPTIONS = ("separation", "alpha", "alpha_per_head", "beta", "learnable_beta", "update_steps", "eps", "memory")
FEATURE_OPTIONS = ("kernelized", "kernel_dim", "feature_init", "t", "loss")
HOPFIELD_OPTIONS = RETRIEVAL_OPTIONS + FEATURE_OPTIONS


def _no_op_hook(module, args):
    return None


def _split_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(retrieval options, feature-map options, the rest)`` of a drop-in's keyword arguments."""
    retrieval = {k: kwargs.pop(k) for k in RETRIEVAL_OPTIONS if k in kwargs}
    feature = {k: kwargs.pop(k) for k in FEATURE_OPTIONS if k in kwargs}
    if "memory" in retrieval:
        retrieval["memory"] = as_memory(retrieval["memory"])
    return retrieval, feature, kwargs


def _feature_map(dim: int, options: dict[str, Any]) -> UHopFeatureMap | None:
    if not (options.pop("kernelized", False) or options.get("kernel_dim") is not None):
        if options:
            raise TypeError(f"feature-map options {sorted(options)} need kernelized=True")
        return None
    return UHopFeatureMap(dim, options.get("kernel_dim"), init=options.get("feature_init", "orthogonal"),
                          t=options.get("t", 2.0), loss=options.get("loss", "average"))


class MultiheadHopfield(HopfieldInterface, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with Hopfield retrieval: same constructor, ``forward`` and return value.

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
            device, dtype: as ``nn.MultiheadAttention`` (``dropout`` acts on the association weights).
        separation: ``"softmax"``, ``"sparsemax"``, ``"entmax15"``, a float alpha in [1, 2] or ``"learnable"``
            (alpha-entmax with learned alpha, Wu et al. 2024, eq. 3.3; ``alpha``, ``alpha_per_head``).
        beta: inverse temperature; defaults to ``1 / sqrt(head_dim)`` (attention's scaling).
        learnable_beta: learn one ``beta`` per head (adds ``retrieval.beta.log_beta`` to the state dict).
        update_steps: retrieval steps in the projected key space before the value read-out.
        eps: stop the steps early once the state changes less than ``eps``.
        memory: ``None`` (discrete), a :class:`~hopformer.layers.continuous.ContinuousMemory` or a dict of its
            options: continuous-time memory (Santos et al. 2025); ``attn_mask``/``is_causal`` then raise.
        kernelized: U-Hop feature map ``Phi`` (Wu, Hu et al. 2024, eq. 3.1) on query and key before the
            projections (queries ``W_q Phi(query)``, keys ``W_k Phi(key)``, values ``W_v value``). ``Phi`` is
            square and shared, so ``kdim`` must equal ``embed_dim``; the state dict is
            ``nn.MultiheadAttention``'s plus ``feature_map.weight``. ``kernel_dim`` (only ``embed_dim``),
            ``feature_init``, ``t``, ``loss``: see :class:`~hopformer.layers.kernel.UHopFeatureMap`.

    The returned attention weights are the association matrix of the last step, before dropout.
    ``nn.TransformerEncoderLayer``'s inference fast path would compute softmax attention from this
    module's weights without calling ``forward``; a no-op forward pre-hook turns that path off.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, **hopfield):
        retrieval, feature, unexpected = _split_options(dict(hopfield))
        if unexpected:
            raise TypeError(f"MultiheadHopfield got unexpected keyword arguments {sorted(unexpected)}")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.retrieval = HopfieldRetrieval(self.head_dim, num_heads, **retrieval)
        self.feature_map = _feature_map(embed_dim, feature)
        if self.feature_map is not None and (self.kdim != embed_dim or self.feature_map.kernel_dim != embed_dim):
            raise ValueError(f"a kernelized MultiheadHopfield shares a square Phi between queries and keys: kdim must "
                             f"equal embed_dim (and so must kernel_dim), got kdim={self.kdim}, "
                             f"kernel_dim={self.feature_map.kernel_dim}, embed_dim={embed_dim}")
        self.register_forward_pre_hook(_no_op_hook)  # keeps TransformerEncoderLayer off its softmax fast path

    def _projections(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.feature_map is not None:
            self.feature_map.observe(key)
            query, key = self.feature_map(query), self.feature_map(key)
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
        continuous = self.retrieval.memory is not None
        if continuous and (attn_mask is not None or is_causal):
            raise ValueError(CONTINUOUS_ATTN_MASK_ERROR)
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
        if continuous:
            if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, k.shape[2]):
                raise ValueError(f"key_padding_mask must have shape (batch, n_keys) = {(batch, k.shape[2])}, "
                                 f"got {tuple(key_padding_mask.shape)}")
            mask, kpm = None, key_padding_mask
        else:
            mask, kpm = merge_masks(key_padding_mask, attn_mask, batch=batch, heads=self.num_heads,
                                    n_query=n_query, n_keys=k.shape[2], dtype=q.dtype), None
        out, weights = self._retrieve(q, k, v, mask, key_padding_mask=kpm, return_association=need_weights,
                                      dropout=self.dropout)
        out = self.out_proj(rearrange(out, "n h l d -> n l (h d)"))
        if weights is not None and average_attn_weights:
            weights = reduce(weights, "n h l s -> n l s", "mean")
        if unbatched:
            out = rearrange(out, "1 l e -> l e")
            weights = None if weights is None else weights[0]
        elif not self.batch_first:
            out = rearrange(out, "n l e -> l n e")
        return out, weights


class HopfieldAttention(HopfieldInterface, Attention):
    """timm's ViT ``Attention`` (``x -> x``) with Hopfield self-association of the tokens.

    Same constructor, parameters and state dict as ``timm.models.vision_transformer.Attention``, plus:

    Args:
        separation: ``"softmax"``, ``"sparsemax"``, ``"entmax15"``, a float alpha in [1, 2] or ``"learnable"``
            (alpha-entmax with learned alpha, Wu et al. 2024, eq. 3.3; ``alpha``, ``alpha_per_head``).
        beta: inverse temperature; defaults to timm's ``head_dim ** -0.5``.
        learnable_beta: learn one ``beta`` per head.
        update_steps: retrieval steps per forward.
        eps: stop the steps early once the state changes less than ``eps``.
        memory: ``None`` (discrete), a :class:`~hopformer.layers.continuous.ContinuousMemory` or a dict of its
            options: the tokens are retrieved from a continuous-time memory (Santos et al. 2025);
            ``attn_mask``/``is_causal`` then raise ``ValueError`` (no discrete keys after compression).
        kernelized: U-Hop feature map ``Phi`` on the tokens before the query/key projections (queries
            ``W_Q Phi(x)``, keys ``W_K Phi(x)``, values ``W_V x``, Wu, Hu et al. 2024, eq. 4.1); the tokens are
            the layer's memories. ``kernel_dim`` (default ``dim``): with ``kernel_dim == dim`` timm's ``qkv`` is
            kept (a plain ViT checkpoint loads; only ``feature_map.weight`` is new); otherwise ``qkv`` is
            replaced by ``qk`` (``kernel_dim -> 2 attn_dim``) and ``v`` (``dim -> attn_dim``).
            ``feature_init``, ``t``, ``loss``: see :class:`~hopformer.layers.kernel.UHopFeatureMap`.

    As ``VisionTransformer``'s ``attn_layer`` pass ``functools.partial(HopfieldAttention, separation=...)``
    (picklable), or :func:`hopformer.layers.registry.attention_layer`. ``attn_mask`` follows
    ``scaled_dot_product_attention`` (boolean ``True`` = key takes part).
    """

    def __init__(self, dim: int, num_heads: int = 8, *args, **kwargs):
        retrieval, feature, options = _split_options(dict(kwargs))
        super().__init__(dim, num_heads, *args, **options)
        self.retrieval = HopfieldRetrieval(self.head_dim, num_heads, **retrieval)
        self.feature_map = _feature_map(dim, feature)
        if self.feature_map is not None and self.feature_map.kernel_dim != dim:
            bias = self.qkv.bias is not None
            del self.qkv
            self.qk = nn.Linear(self.feature_map.kernel_dim, 2 * self.attn_dim, bias=bias)
            self.v = nn.Linear(dim, self.attn_dim, bias=bias)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.feature_map is None:
            q, k, v = split_heads(self.qkv(x), 3, self.num_heads)
            return self.q_norm(q), self.k_norm(k), v
        phi = self.feature_map(x)
        if self.feature_map.kernel_dim == self.feature_map.dim:
            w_qk, w_v = self.qkv.weight.split([2 * self.attn_dim, self.attn_dim])
            b_qk, b_v = (None, None) if self.qkv.bias is None else self.qkv.bias.split([2 * self.attn_dim, self.attn_dim])
            qk, v = F.linear(phi, w_qk, b_qk), F.linear(x, w_v, b_v)
        else:
            qk, v = self.qk(phi), self.v(x)
        q, k = split_heads(qk, 2, self.num_heads)
        v = rearrange(v, "b n (h d) -> b h n d", h=self.num_heads)
        return self.q_norm(q), self.k_norm(k), v

    def _mask(self, attn_mask: Tensor | None, is_causal: bool, n: int, device) -> Tensor | None:
        if self.retrieval.memory is not None and (attn_mask is not None or is_causal):
            raise ValueError(CONTINUOUS_ATTN_MASK_ERROR)
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
        """``x`` ``(B, N, dim)`` -> ``(B, N, dim_out)`` (and the association ``(B, heads, N, N)`` if asked;
        continuous memory: the responsibilities ``(B, heads, N, num_basis)``)."""
        if x.dim() != 3:
            raise ValueError(f"x must have shape (batch, tokens, dim), got {tuple(x.shape)}")
        mask = self._mask(attn_mask, is_causal, x.shape[1], x.device)
        if self.feature_map is not None:
            self.feature_map.observe(x)
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = self._qkv(x)
        out, weights = self._retrieve(q, k, v, mask, return_association=return_association, dropout=self.attn_drop.p)
        out = self.norm(rearrange(out, "b h n d -> b n (h d)"))
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out))
        return (out, weights) if return_association else out

    def energy(self, x: Tensor) -> Tensor:
        """Energy of each token's query against the tokens' keys, ``(B, heads, N)`` (Ramsauer et al. 2021, eq. 2;
        Hu et al. 2023, eq. 3.3; continuous memory: Santos et al. 2025, eq. 6)."""
        q, k, _ = self._qkv(x)
        return self.retrieval.energy(q, k)

