"""The ``Hopfield`` layer and its named variants (Ramsauer et al. 2020; Hu et al. 2023; Wu et al. 2024).

``Hopfield`` associates state patterns ``R`` (queries) with stored patterns ``Y`` (keys) and reads
out pattern projections (values): Ramsauer et al. 2020, eq. 10,

    Z = Sep(beta * R W_Q (Y W_K)^T) Y W_V,

with ``Sep`` softmax (dense modern Hopfield), sparsemax (Hu et al. 2023, eq. 3.4) or alpha-entmax
(generalized sparse, Wu et al. 2024, eq. 3.3). ``update_steps > 1`` iterates the retrieval in the
projected key space before the read-out (see :func:`hopformer.functional.hopfield_retrieve`).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from ..functional import check_separation, hopfield_energy, hopfield_retrieve
from .masks import merge_masks

__all__ = ["InverseTemperature", "Hopfield", "SparseHopfield", "GeneralizedSparseHopfield", "LearnableAlpha"]


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class InverseTemperature(nn.Module):
    """The inverse temperature ``beta``: a fixed float, or one learnable value per head (``exp`` keeps it > 0).

    Args:
        beta: initial value, > 0.
        num_heads: number of heads (one learnable value each).
        learnable: learn ``log beta`` (gradient stays alive; ``beta`` stays positive).
    """

    def __init__(self, beta: float, num_heads: int = 1, learnable: bool = False) -> None:
        super().__init__()
        if not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"beta must be a positive number, got {beta!r}")
        self.learnable = learnable
        self.init_beta = float(beta)
        if learnable:
            self.log_beta = nn.Parameter(torch.full((num_heads, 1, 1), math.log(beta)))

    def forward(self) -> float | Tensor:
        return self.log_beta.exp() if self.learnable else self.init_beta

    def extra_repr(self) -> str:
        return f"beta={self.init_beta:.4g}, learnable={self.learnable}"


class LearnableAlpha(nn.Module):
    """alpha-entmax's alpha, reparametrised as ``alpha = 1 + sigmoid(a)`` so it stays in (1, 2) with a live gradient.

    Clamping would zero the gradient at the bounds; the sigmoid never does.

    Args:
        alpha: initial alpha, strictly inside (1, 2).
        num_heads: number of heads; with ``per_head`` each head learns its own alpha.
        per_head: one alpha per head (shape ``(heads, 1, 1)``) instead of one shared alpha.
    """

    def __init__(self, alpha: float = 1.5, num_heads: int = 1, per_head: bool = False) -> None:
        super().__init__()
        if not isinstance(alpha, (int, float)) or not 1.0 < alpha < 2.0:
            raise ValueError(f"alpha must be strictly between 1 and 2 to be learnable, got {alpha!r}")
        logit = math.log((alpha - 1.0) / (2.0 - alpha))
        shape = (num_heads, 1, 1) if per_head else (1,)
        self.logit = nn.Parameter(torch.full(shape, logit))

    def forward(self) -> Tensor:
        return 1.0 + torch.sigmoid(self.logit)


class Hopfield(nn.Module):
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
        separation: ``"softmax"``, ``"sparsemax"``, ``"entmax15"`` or a float alpha in [1, 2].
        beta: inverse temperature; defaults to ``1 / sqrt(head_dim)``.
        learnable_beta: learn one ``beta`` per head.
        update_steps: retrieval steps per forward (>= 1).
        eps: stop early once the largest change of the state is below ``eps``.
        dropout: dropout on the association weights (training only).
        bias: biases in the projections.
        project: learn the projections ``W_Q, W_K, W_V, W_O``; ``False`` retrieves in pattern space
            (requires ``stored_dim == dim``), heads then split the raw patterns.
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
        beta: float | None = None,
        learnable_beta: bool = False,
        update_steps: int = 1,
        eps: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        project: bool = True,
    ) -> None:
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.stored_dim = _positive_int("stored_dim", stored_dim or dim)
        self.value_dim = _positive_int("value_dim", value_dim or self.stored_dim)
        self.update_steps = _positive_int("update_steps", update_steps)
        if eps is not None and not eps > 0:
            raise ValueError(f"eps must be positive or None, got {eps!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.eps, self.dropout, self.project = eps, dropout, project
        self.separation = check_separation(separation)
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"num_heads={num_heads} must divide dim={dim} (or pass head_dim)")
            head_dim = dim // num_heads
        self.head_dim = _positive_int("head_dim", head_dim)
        inner = self.head_dim * num_heads
        if project:
            self.out_dim = _positive_int("out_dim", out_dim or dim)
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
        self.beta = InverseTemperature(beta if beta is not None else self.head_dim**-0.5, num_heads, learnable_beta)

    # -- hooks that subclasses (kernelized, continuous) override ---------------------------------
    def current_separation(self):
        """The separation used in this forward (a learnable alpha is a tensor)."""
        return self.separation

    def _split(self, x: Tensor) -> Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)

    def project_query(self, state: Tensor) -> Tensor:
        """``R W_Q`` split into heads: ``(B, Lq, dim) -> (B, H, Lq, head_dim)``."""
        return self._split(self.q_proj(state) if self.project else state)

    def project_keys(self, stored: Tensor) -> Tensor:
        """``Y W_K`` split into heads: ``(B, Lk, stored_dim) -> (B, H, Lk, head_dim)``."""
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
            attn_mask: ``(Lq, Lk)`` or ``(B * heads, Lq, Lk)``, ``True`` (or -inf) where ignored.
            return_association: also return the association matrix ``(B, heads, Lq, Lk)`` of the last step.
        """
        stored = state if stored is None else stored
        values = stored if values is None else values
        self._check_inputs(state, stored, values)
        q, k, v = self.project_query(state), self.project_keys(stored), self.project_values(values)
        mask = merge_masks(
            key_padding_mask, attn_mask, batch=state.shape[0], heads=self.num_heads,
            n_query=state.shape[1], n_keys=stored.shape[1], dtype=q.dtype,
        )
        result = hopfield_retrieve(
            q, k, v,
            beta=self.beta(), separation=self.current_separation(), steps=self.update_steps, eps=self.eps,
            mask=mask, dropout=self.dropout if self.training else 0.0, return_association=return_association,
        )
        if return_association:
            retrieved, weights = result
            return self.project_output(retrieved), weights
        return self.project_output(result)

    def energy(self, state: Tensor, stored: Tensor | None = None, *, key_padding_mask: Tensor | None = None) -> Tensor:
        """Energy of each state pattern in each head's association space, ``(B, heads, Lq)`` (Ramsauer et al. 2020, eq. 2 with the separation's conjugate)."""
        stored = state if stored is None else stored
        self._check_inputs(state, stored)
        q, k = self.project_query(state), self.project_keys(stored)
        mask = merge_masks(key_padding_mask, None, batch=state.shape[0], heads=self.num_heads,
                           n_query=state.shape[1], n_keys=stored.shape[1], dtype=q.dtype)
        return hopfield_energy(q, k, beta=self.beta(), separation=self.current_separation(), mask=mask)


class SparseHopfield(Hopfield):
    """Sparse modern Hopfield layer (Hu et al. 2023): ``Hopfield`` with sparsemax separation (eq. 3.4).

    Takes the same arguments as :class:`Hopfield` except ``separation``.
    """

    def __init__(self, dim: int, num_heads: int = 1, **kwargs) -> None:
        if "separation" in kwargs:
            raise TypeError("SparseHopfield always uses separation='sparsemax'; use Hopfield for another one")
        super().__init__(dim, num_heads, separation="sparsemax", **kwargs)


class GeneralizedSparseHopfield(Hopfield):
    """Generalized sparse Hopfield layer (Wu et al. 2024, STanHop, eq. 3.3): alpha-entmax separation.

    Args:
        dim, num_heads: as :class:`Hopfield`.
        alpha: (initial) alpha in [1, 2]; strictly inside (1, 2) when learnable.
        learnable_alpha: learn alpha as ``1 + sigmoid(a)`` (stays in (1, 2), gradient never dies).
        alpha_per_head: one alpha per head instead of one per layer.
        **kwargs: the other :class:`Hopfield` arguments except ``separation``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        *,
        alpha: float = 1.5,
        learnable_alpha: bool = True,
        alpha_per_head: bool = False,
        **kwargs,
    ) -> None:
        if "separation" in kwargs:
            raise TypeError("GeneralizedSparseHopfield sets its separation from alpha; use Hopfield for another one")
        super().__init__(dim, num_heads, separation=float(alpha), **kwargs)
        self.alpha = LearnableAlpha(alpha, num_heads, alpha_per_head) if learnable_alpha else None

    def current_separation(self):
        return self.alpha() if self.alpha is not None else self.separation
