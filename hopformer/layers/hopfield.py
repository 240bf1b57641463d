"""``Hopfield``: the Hopfield interface with its own projections (Ramsauer et al. 2021; Hu et al. 2023; Wu et al. 2024).

``Hopfield`` associates state patterns ``R`` (queries) with stored patterns ``Y`` (keys) and reads
out pattern projections (values): Ramsauer et al. 2021, "Hopfield Networks is All You Need", eq. 10,

    Z = Sep(beta * R W_Q (Y W_K)^T) Y W_V,

with ``Sep`` softmax (dense modern Hopfield), sparsemax (Hu et al. 2023, eq. 3.4) or alpha-entmax, fixed or
learned (generalized sparse, Wu et al. 2024, STanHop, eq. 3.3). The association itself is the layer's
:class:`~hopformer.layers.retrieval.HopfieldRetrieval` (separation, beta, steps, dropout, discrete or continuous
memory); an optional U-Hop feature map (Wu, Hu et al. 2024, eq. 3.1) is applied to the patterns before
``W_Q``/``W_K``. Every combination is a constructor argument.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from einops import rearrange
from torch import Tensor, nn

from ..checks import positive_int
from .continuous import ContinuousMemory, as_memory
from .interface import HopfieldInterface
from .kernel import UHopFeatureMap
from .masks import merge_masks
from .retrieval import CONTINUOUS_ATTN_MASK_ERROR, HopfieldRetrieval

__all__ = ["Hopfield"]


class Hopfield(HopfieldInterface, nn.Module):
    """Modern Hopfield association of state patterns with stored patterns (self- or cross-association).

    One softmax update step with projections is exactly multi-head attention and runs through
    ``scaled_dot_product_attention``.

    Args:
        dim: size of the state (query) patterns, the last dimension of ``state``.
        num_heads: number of parallel association heads.
        stored_dim: size of the stored (key) patterns; defaults to ``dim``.
        value_dim: size of the patterns read out (values); defaults to ``stored_dim``.
        head_dim: size of each head's association space; defaults to ``dim // num_heads``.
        out_dim: size of the output patterns; defaults to ``dim`` (``value_dim`` without projections).
        separation: ``"softmax"``, ``"sparsemax"``, ``"entmax15"``, a float alpha in [1, 2] or ``"learnable"``
            (alpha-entmax, alpha learned as ``1 + sigmoid(a)``, Wu et al. 2024, eq. 3.3).
        alpha: initial alpha of ``separation="learnable"``.
        alpha_per_head: one learned alpha per head.
        beta: inverse temperature; defaults to ``1 / sqrt(head_dim)`` (association space per head).
        learnable_beta: learn one ``beta`` per head.
        update_steps: retrieval steps per forward (>= 1).
        eps: stop early once the largest change of the state is below ``eps``.
        dropout: dropout on the association weights (training only).
        bias: biases in the projections.
        project: learn the projections ``W_Q, W_K, W_V, W_O``; ``False`` retrieves in pattern space
            (requires ``stored_dim == dim``), heads then split the raw patterns (or ``Phi``'s features).
        memory: ``None`` (discrete), a :class:`~hopformer.layers.continuous.ContinuousMemory` or a dict of
            its options (continuous-time memory, Santos et al. 2025; ``separation`` must be ``"softmax"``).
        kernelized: pass queries and keys through a U-Hop feature map
            :class:`~hopformer.layers.kernel.UHopFeatureMap` ``Phi`` first (queries ``W_Q Phi(x)``, keys
            ``W_K Phi(Xi)``, values ``W_V Xi``, Wu, Hu et al. 2024, eq. 3.1). Queries get their own map when
            ``stored_dim != dim``.
        kernel_dim: feature size ``D_phi`` of ``Phi`` (implies ``kernelized``); default ``max(dim, stored_dim)``.
        feature_init, t, loss: the feature map's initialisation and U-Hop separation loss (see
            :class:`~hopformer.layers.kernel.UHopFeatureMap`).

    With a feature map and ``project=False`` this is exactly the retrieval dynamics ``T_K`` of U-Hop eq. (2.4):
    the head split applies to ``kernel_dim`` and the default ``beta`` is ``(kernel_dim / num_heads) ** -0.5``.
    Masks: ``key_padding_mask`` (``True`` = ignore); with a continuous memory it removes memories before
    compression and ``attn_mask`` raises ``ValueError`` (no discrete keys after compression).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        *,
        stored_dim: int | None = None,
        value_dim: int | None = None,
        head_dim: int | None = None,
        out_dim: int | None = None,
        separation: str | float = "softmax",
        alpha: float = 1.5,
        alpha_per_head: bool = False,
        beta: float | None = None,
        learnable_beta: bool = False,
        update_steps: int = 1,
        eps: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        project: bool = True,
        memory: ContinuousMemory | Mapping[str, Any] | None = None,
        kernelized: bool = False,
        kernel_dim: int | None = None,
        feature_init: str = "orthogonal",
        t: float = 2.0,
        loss: str = "average",
    ) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.num_heads = positive_int("num_heads", num_heads)
        self.stored_dim = positive_int("stored_dim", stored_dim or dim)
        self.value_dim = positive_int("value_dim", value_dim or self.stored_dim)
        self.project = project
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"num_heads={num_heads} must divide dim={dim} (or pass head_dim)")
            head_dim = dim // num_heads
        self.head_dim = positive_int("head_dim", head_dim)
        inner = self.head_dim * num_heads
        if project:
            self.out_dim = positive_int("out_dim", out_dim or dim)
            self.q_proj = nn.Linear(dim, inner, bias=bias)
            self.k_proj = nn.Linear(self.stored_dim, inner, bias=bias)
            self.v_proj = nn.Linear(self.value_dim, inner, bias=bias)
            self.out_proj = nn.Linear(inner, self.out_dim, bias=bias)
        else:
            if self.stored_dim != dim or inner != dim or self.value_dim % num_heads:
                raise ValueError(
                    "project=False retrieves in pattern space: needs stored_dim == dim == num_heads * head_dim and "
                    f"num_heads dividing value_dim; got dim={dim}, stored_dim={self.stored_dim}, "
                    f"value_dim={self.value_dim}, num_heads={num_heads}, head_dim={self.head_dim}"
                )
            if out_dim not in (None, self.value_dim):
                raise ValueError(f"project=False outputs value_dim={self.value_dim} features, got out_dim={out_dim}")
            self.out_dim = self.value_dim
        self.feature_map = None
        association_dim = self.head_dim
        if kernelized or kernel_dim is not None:  # after the plain projections: a seed gives the weights as before
            kernel_dim = kernel_dim if kernel_dim is not None else max(self.dim, self.stored_dim)
            self.feature_map = UHopFeatureMap(self.stored_dim, kernel_dim, query_dim=self.dim, init=feature_init,
                                              t=t, loss=loss)
            kernel_dim = self.feature_map.kernel_dim
            if project:
                self.q_proj = nn.Linear(kernel_dim, inner, bias=bias)
                self.k_proj = nn.Linear(kernel_dim, inner, bias=bias)
            elif kernel_dim % num_heads:
                raise ValueError(f"project=False splits Phi's kernel_dim={kernel_dim} into num_heads={num_heads}; "
                                 "num_heads must divide it")
            else:
                association_dim = kernel_dim // num_heads
        self.retrieval = HopfieldRetrieval(
            association_dim, num_heads, separation=separation, alpha=alpha, alpha_per_head=alpha_per_head, beta=beta,
            learnable_beta=learnable_beta, update_steps=update_steps, eps=eps, dropout=dropout, memory=as_memory(memory),
        )

    @property
    def dropout(self) -> float:
        """Dropout rate on the association weights (the retrieval's)."""
        return self.retrieval.dropout

    @dropout.setter
    def dropout(self, value: float) -> None:
        self.retrieval.dropout = value

    # -- projections ---------------------------------------------------------------------------------
    def _split(self, x: Tensor) -> Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)

    def project_query(self, state: Tensor) -> Tensor:
        """``R W_Q`` (or ``Phi(R) W_Q``) split into heads: ``(B, Lq, dim) -> (B, H, Lq, head_dim)``."""
        if self.feature_map is not None:
            state = self.feature_map.queries(state)
        return self._split(self.q_proj(state) if self.project else state)

    def project_keys(self, stored: Tensor) -> Tensor:
        """``Y W_K`` (or ``Phi(Y) W_K``) split into heads: ``(B, Lk, stored_dim) -> (B, H, Lk, head_dim)``."""
        if self.feature_map is not None:
            stored = self.feature_map(stored)
        return self._split(self.k_proj(stored) if self.project else stored)

    def project_values(self, values: Tensor) -> Tensor:
        """``Y W_V`` split into heads: ``(B, Lk, value_dim) -> (B, H, Lk, head_dim)``."""
        return self._split(self.v_proj(values) if self.project else values)

    def project_output(self, retrieved: Tensor) -> Tensor:
        """Merge heads and apply ``W_O``: ``(B, H, Lq, head_dim) -> (B, Lq, out_dim)``."""
        merged = rearrange(retrieved, "b h n d -> b n (h d)")
        return self.out_proj(merged) if self.project else merged

    # -- checks -------------------------------------------------------------------------------
    def _check_inputs(self, state: Tensor, stored: Tensor, values: Tensor | None = None) -> None:
        expected = [("state", state, self.dim), ("stored", stored, self.stored_dim)]
        if values is not None:
            expected.append(("values", values, self.value_dim))
        for name, t, size in expected:
            if t.dim() != 3 or t.shape[-1] != size:
                raise ValueError(f"{name} must have shape (batch, length, {size}), got {tuple(t.shape)}")
        if len({t.shape[0] for _, t, _ in expected}) > 1:
            raise ValueError(
                "state, stored and values must share the batch size, got "
                + ", ".join(f"{name} {tuple(t.shape)}" for name, t, _ in expected)
            )
        if stored.shape[1] == 0:
            raise ValueError(f"stored must hold at least one pattern, got shape {tuple(stored.shape)}")
        if values is not None and stored.shape[1] != values.shape[1]:
            raise ValueError(f"values must hold one pattern per stored pattern: {values.shape[1]} vs {stored.shape[1]}")

    def _masks(self, state: Tensor, stored: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
               dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
        """``(mask, key_padding_mask)`` for the retrieval: discrete memories get one merged mask."""
        if self.retrieval.memory is not None:
            if key_padding_mask is not None and tuple(key_padding_mask.shape) != (state.shape[0], stored.shape[1]):
                raise ValueError(
                    f"key_padding_mask must have shape (batch, n_keys) = {(state.shape[0], stored.shape[1])}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            return attn_mask, key_padding_mask
        mask = merge_masks(key_padding_mask, attn_mask, batch=state.shape[0], heads=self.num_heads,
                           n_query=state.shape[1], n_keys=stored.shape[1], dtype=dtype)
        return mask, None

    def forward(
        self,
        state: Tensor,
        stored: Tensor | None = None,
        values: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        return_association: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Retrieve for each state pattern.

        Args:
            state: state (query) patterns ``(B, Lq, dim)``.
            stored: stored (key) patterns ``(B, Lk, stored_dim)``; ``None`` means self-association.
            values: patterns to read out ``(B, Lk, value_dim)``; default ``stored``.
            key_padding_mask: ``(B, Lk)``, ``True`` (or -inf) where a stored pattern is ignored.
            attn_mask: ``(Lq, Lk)`` or ``(B * heads, Lq, Lk)``, ``True`` (or -inf) where ignored (discrete memory).
            return_association: also return the association matrix ``(B, heads, Lq, Lk)`` of the last step
                (continuous memory: the responsibilities ``(B, heads, Lq, N)`` over its basis functions).
        """
        stored = state if stored is None else stored
        values = stored if values is None else values
        if attn_mask is not None and self.retrieval.memory is not None:
            raise ValueError(CONTINUOUS_ATTN_MASK_ERROR)
        self._check_inputs(state, stored, values)
        if self.feature_map is not None:
            self.feature_map.observe(stored)
        q, k, v = self.project_query(state), self.project_keys(stored), self.project_values(values)
        mask, kpm = self._masks(state, stored, key_padding_mask, attn_mask, q.dtype)
        retrieved, weights = self._retrieve(q, k, v, mask, key_padding_mask=kpm, return_association=return_association)
        out = self.project_output(retrieved)
        return (out, weights) if return_association else out

    def energy(self, state: Tensor, stored: Tensor | None = None, *, key_padding_mask: Tensor | None = None) -> Tensor:
        """Energy of each state pattern in each head's association space, ``(B, heads, Lq)``.

        Ramsauer et al. 2021, eq. 2 with the separation's conjugate (Hu et al. 2023, eq. 3.3); with a
        feature map the kernelized energy ``-(1/beta) Psi*(beta K(Xi, x)) + 0.5 K(x, x)`` (U-Hop); with a
        continuous memory its energy (Santos et al. 2025, eq. 6).
        """
        stored = state if stored is None else stored
        self._check_inputs(state, stored)
        q, k = self.project_query(state), self.project_keys(stored)
        mask, kpm = self._masks(state, stored, key_padding_mask, None, q.dtype)
        return self.retrieval.energy(q, k, mask, key_padding_mask=kpm)
