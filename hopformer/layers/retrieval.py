"""``HopfieldRetrieval``: the one retrieval core behind every Hopfield interface.

It owns everything between the projected patterns and the read-out (the role ``HopfieldCore`` plays in
ml-jku's ``hflayers`` and ``Attend`` in x-transformers):

- the separation ``Sep``: softmax (dense modern Hopfield, Ramsauer et al. 2021, "Hopfield Networks is All
  You Need", eq. 10), sparsemax (Hu et al. 2023, sparse modern Hopfield, eq. 3.4), alpha-entmax with a fixed
  alpha or a learned one (:class:`LearnableAlpha`; generalized sparse Hopfield, Wu et al. 2024, STanHop,
  eq. 3.3);
- the inverse temperature ``beta`` (:class:`InverseTemperature`);
- update steps, early stop ``eps`` and dropout on the association;
- the memory: discrete (the keys themselves) or a :class:`~hopformer.layers.continuous.ContinuousMemory`
  (Santos et al. 2025) that compresses the keys and values into basis coefficients.

It works on patterns already split into heads, ``(B, H, L, d)``; the interfaces
(:class:`~hopformer.layers.Hopfield`, :class:`~hopformer.layers.HopfieldAttention`,
:class:`~hopformer.layers.MultiheadHopfield`) own the projections. The numbers come from
:func:`hopformer.functional.hopfield_retrieve` / :func:`hopformer.functional.hopfield_energy`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..checks import positive_float, positive_int, probability
from ..functional import check_separation, hopfield_energy, hopfield_retrieve

__all__ = ["InverseTemperature", "LearnableAlpha", "HopfieldRetrieval", "CONTINUOUS_ATTN_MASK_ERROR"]

CONTINUOUS_ATTN_MASK_ERROR = (
    "continuous-time memory compresses the keys into basis coefficients, so an attn_mask (or is_causal) over "
    "discrete keys has no meaning after compression; use key_padding_mask (applied before compression) or a "
    "discrete Hopfield layer"
)


class InverseTemperature(nn.Module):
    """The inverse temperature ``beta``: a fixed float, or one learnable value per head (``exp`` keeps it > 0).

    Args:
        beta: initial value, > 0.
        num_heads: number of heads (one learnable value each).
        learnable: learn ``log beta`` (gradient stays alive; ``beta`` stays positive).
    """

    def __init__(self, beta: float, num_heads: int = 1, learnable: bool = False) -> None:
        super().__init__()
        positive_float("beta", beta)
        self.learnable = learnable
        self.init_beta = float(beta)
        if learnable:
            self.log_beta = nn.Parameter(torch.full((num_heads, 1, 1), math.log(beta)))

    def forward(self) -> float | Tensor:
        return self.log_beta.exp() if self.learnable else self.init_beta

    def extra_repr(self) -> str:
        return f"beta={self.init_beta:.4g}, learnable={self.learnable}"


class LearnableAlpha(nn.Module):
    """alpha-entmax's alpha (Wu et al. 2024, eq. 3.3) learned as ``alpha = 1 + sigmoid(a)``: stays in (1, 2).

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


class HopfieldRetrieval(nn.Module):
    """Associate head-split state patterns with stored patterns and read out (Ramsauer et al. 2021, eq. 10).

    ``Z = Sep(beta Q K^T) V``, iterated ``update_steps`` times in the key space before the read-out
    (``Q <- Sep(beta Q K^T) K``, the modern Hopfield update, eq. 3 of Ramsauer et al. 2021).

    Args:
        head_dim: size of each head's association space (sets the default ``beta = head_dim ** -0.5``).
        num_heads: number of heads (shape of a learnable beta or per-head alpha).
        separation: ``"softmax"``, ``"sparsemax"``, ``"entmax15"``, a float alpha in [1, 2], ``"learnable"``
            (alpha-entmax with a learned alpha initialised at ``alpha``) or a :class:`LearnableAlpha` module.
        alpha: initial alpha of ``separation="learnable"`` (strictly inside (1, 2)).
        alpha_per_head: with ``separation="learnable"``, one alpha per head.
        beta: inverse temperature; default ``head_dim ** -0.5``.
        learnable_beta: learn one ``beta`` per head (``beta.log_beta``).
        update_steps: retrieval steps per forward (>= 1).
        eps: stop the steps early once the state changes less than ``eps`` (``None``: never).
        dropout: dropout on the association weights (training only).
        memory: ``None`` (discrete: the keys are the memories) or a
            :class:`~hopformer.layers.continuous.ContinuousMemory` (needs ``separation="softmax"``: its Gibbs
            density is a continuous softmax).
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int = 1,
        *,
        separation: str | float | LearnableAlpha = "softmax",
        alpha: float = 1.5,
        alpha_per_head: bool = False,
        beta: float | None = None,
        learnable_beta: bool = False,
        update_steps: int = 1,
        eps: float | None = None,
        dropout: float = 0.0,
        memory: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = positive_int("head_dim", head_dim)
        self.num_heads = positive_int("num_heads", num_heads)
        self.update_steps = positive_int("update_steps", update_steps)
        self.eps = None if eps is None else positive_float("eps", eps)
        self.dropout = probability("dropout", dropout)
        if isinstance(separation, LearnableAlpha):
            self.alpha, separation = separation, float(separation().detach().mean())
        elif isinstance(separation, str) and separation == "learnable":
            self.alpha, separation = LearnableAlpha(alpha, num_heads, alpha_per_head), float(alpha)
        else:
            self.alpha = None
        self.separation = check_separation(separation)
        if memory is not None and (self.alpha is not None or self.separation != "softmax"):
            raise TypeError(
                "continuous-time memory retrieves with the Gibbs density (a continuous softmax); separation must be "
                f"'softmax', got {'learnable' if self.alpha is not None else self.separation!r}"
            )
        self.memory = memory
        self.beta = InverseTemperature(beta if beta is not None else self.head_dim**-0.5, num_heads, learnable_beta)

    def current_separation(self) -> str | float | Tensor:
        """The separation of this forward: the fixed one, or the learned alpha (a tensor)."""
        return self.alpha() if self.alpha is not None else self.separation

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        return_association: bool = False,
        dropout: float | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Retrieve ``(B, H, Lq, d)`` queries from ``(B, H, Lk, d)`` keys and ``(B, H, Lk, d_v)`` values.

        Args:
            q, k, v: head-split state, stored and value patterns.
            mask: discrete memory: broadcastable to ``(B, H, Lq, Lk)``, ``True`` (or 0) where a key takes
                part, ``False`` (or -inf) where not, as ``scaled_dot_product_attention``. A continuous memory
                has no discrete keys after compression: passing one raises ``ValueError``.
            key_padding_mask: continuous memory only, ``(B, Lk)`` ``True`` where a key is left out before
                compression (discrete interfaces fold it into ``mask``).
            return_association: also return the association ``(B, H, Lq, Lk)`` of the last step (continuous:
                the responsibilities ``(B, H, Lq, N)`` over the basis functions).
            dropout: overrides ``self.dropout`` (for interfaces whose dropout rate lives on the module they
                replace); applied in training mode only.

        Returns:
            ``(read-out (B, H, Lq, d_v), association or None)``.
        """
        p = (self.dropout if dropout is None else dropout) if self.training else 0.0
        if self.memory is not None:
            if mask is not None:
                raise ValueError(CONTINUOUS_ATTN_MASK_ERROR)
            out, resp = self.memory.retrieve(q, k, v, beta=self.beta(), steps=self.update_steps, eps=self.eps,
                                             key_padding_mask=key_padding_mask, dropout=p)
            return out, (resp if return_association else None)
        result = hopfield_retrieve(q, k, v, beta=self.beta(), separation=self.current_separation(),
                                   steps=self.update_steps, eps=self.eps, mask=mask, dropout=p,
                                   return_association=return_association)
        return result if return_association else (result, None)

    def energy(self, q: Tensor, k: Tensor, mask: Tensor | None = None, *,
               key_padding_mask: Tensor | None = None) -> Tensor:
        """Energy of each head-split query against the keys, ``(B, H, Lq)``.

        Discrete: ``-(1/beta) Psi*(beta q K^T) + 0.5 |q|^2`` (Ramsauer et al. 2021, eq. 2, with the
        separation's convex conjugate ``Psi*``, Hu et al. 2023, eq. 3.3); continuous memory: its energy
        (Santos et al. 2025, eq. 6). ``mask`` and ``key_padding_mask`` as in :meth:`forward`.
        """
        if self.memory is not None:
            if mask is not None:
                raise ValueError(CONTINUOUS_ATTN_MASK_ERROR)
            return self.memory.energy(q, k, beta=self.beta(), key_padding_mask=key_padding_mask)
        return hopfield_energy(q, k, beta=self.beta(), separation=self.current_separation(), mask=mask)

    def extra_repr(self) -> str:
        sep = "learnable" if self.alpha is not None else repr(self.separation)
        return f"separation={sep}, update_steps={self.update_steps}, eps={self.eps}, dropout={self.dropout}"
