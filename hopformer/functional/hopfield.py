"""The one retrieval step and the one energy shared by every Hopfield layer (Ramsauer et al. 2020; Hu et al. 2023; Wu et al. 2024).

Retrieval (Ramsauer et al. 2020, eq. 3; Hu et al. 2023, eq. 3.4; Wu et al. 2024, eq. 3.3)::

    x_new = V^T Sep(beta * K x)

Energy (Ramsauer et al. eq. 2; Hu et al. eq. 3.1; convex conjugate form)::

    E(x) = -(1/beta) Psi*(beta * K x) + 0.5 <x, x>

The update is the concave-convex procedure (CCCP) on ``E`` when the values are the keys, so the
energy of the iterates never increases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .separation import (
    check_mask,
    check_separation,
    is_softmax,
    nan_rows_to_output,
    separate,
    separated_attention,
    separation_conjugate,
)

__all__ = ["hopfield_retrieve", "hopfield_energy", "association", "as_additive_mask"]


def _check_patterns(query: Tensor, keys: Tensor, values: Tensor | None) -> None:
    for name, t in (("query", query), ("keys", keys), ("values", values)):
        if t is not None and t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., n, d) with at least 2 dimensions, got shape {tuple(t.shape)}")
    if query.shape[-1] != keys.shape[-1]:
        raise ValueError(
            f"query and keys must share their last (pattern) dimension, got query {tuple(query.shape)} "
            f"and keys {tuple(keys.shape)}"
        )
    if values is not None and values.shape[-2] != keys.shape[-2]:
        raise ValueError(
            f"values must hold one pattern per key: keys {tuple(keys.shape)} has {keys.shape[-2]} patterns, "
            f"values {tuple(values.shape)} has {values.shape[-2]}"
        )
    if keys.shape[-2] == 0:
        raise ValueError(f"keys must hold at least one stored pattern, got shape {tuple(keys.shape)}")


def _check_beta(beta: float | Tensor) -> None:
    """beta must be positive and finite: inf gives NaN (softmax) or errors, a negative beta retrieves the
    *least* similar pattern. A tensor beta is checked too (one device sync, skipped while tracing)."""
    if isinstance(beta, Tensor):
        if not beta.is_floating_point():
            raise ValueError(f"beta (inverse temperature) must be a floating point tensor, got dtype {beta.dtype}")
        if beta.numel() and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(beta.detach())
            if not (bool(lo > 0) and bool(hi < float("inf"))):  # also False for NaN
                raise ValueError(f"beta (inverse temperature) must be positive and finite, got a tensor with values "
                                 f"in [{lo.item():.4g}, {hi.item():.4g}]")
        return
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < float("inf"):
        raise ValueError(f"beta (inverse temperature) must be a positive finite number, got {beta!r}")


def as_additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Turn a boolean mask (``True`` = the key takes part) into an additive one (0 / -inf)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _check_scores_mask(mask: Tensor | None, query: Tensor, keys: Tensor) -> None:
    """`check_mask` against the scores of `query` and `keys`, whose shape is formed only when there is a mask
    (`torch.broadcast_shapes` costs about as much as a small attention call)."""
    if mask is not None:
        check_mask(mask, (*torch.broadcast_shapes(query.shape[:-2], keys.shape[:-2]), query.shape[-2], keys.shape[-2]))


def _scores(query: Tensor, keys: Tensor, beta: float | Tensor, mask: Tensor | None) -> Tensor:
    """``beta * query keys^T`` plus the mask as an additive term."""
    _check_scores_mask(mask, query, keys)
    scores = torch.matmul(query, keys.transpose(-1, -2)) * beta
    additive = as_additive_mask(mask, scores.dtype)
    return scores if additive is None else scores + additive


def association(
    query: Tensor,
    keys: Tensor,
    *,
    beta: float | Tensor,
    separation="softmax",
    mask: Tensor | None = None,
) -> Tensor:
    """The association matrix ``Sep(beta * query keys^T + mask)``, shape ``(..., n_query, n_keys)``.

    A row whose keys are all masked gets all-zero weights (a defined output, never NaN).
    """
    return separate(_scores(query, keys, beta, mask), separation, dim=-1)


def _step(x: Tensor, keys: Tensor, values: Tensor, *, beta, separation, mask, dropout: float) -> Tensor:
    """One retrieval ``Sep(beta x K^T + mask) V`` without materialising the scores where possible.

    softmax runs the fused ``scaled_dot_product_attention``; sparsemax/entmax run the block-wise core
    of :func:`hopformer.functional.separated_attention` (thresholds saved, not weights). Dropout on
    sparse weights needs the weights themselves, so that case materialises them.
    """
    if dropout == 0.0:
        return separated_attention(x, keys, values, separation=separation, beta=beta, mask=mask)
    if is_softmax(separation):
        if isinstance(beta, Tensor):  # SDPA's scale takes floats only: fold a tensor beta into the query
            x, beta = x * beta, 1.0
        out = F.scaled_dot_product_attention(x, keys, values, attn_mask=mask, dropout_p=dropout, scale=float(beta))
        return nan_rows_to_output(x, out)
    weights = association(x, keys, beta=beta, separation=separation, mask=mask)
    return torch.matmul(F.dropout(weights, p=dropout), values)


def hopfield_retrieve(
    query: Tensor,
    keys: Tensor,
    values: Tensor | None = None,
    *,
    beta: float | Tensor,
    separation="softmax",
    steps: int = 1,
    eps: float | None = None,
    mask: Tensor | None = None,
    dropout: float = 0.0,
    return_association: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Retrieve stored patterns: ``x <- Sep(beta x K^T) K`` for ``steps - 1`` steps, then ``Sep(beta x K^T) V``.

    With ``values=None`` (values are the keys) this is the modern Hopfield update repeated ``steps``
    times. One softmax step with ``beta = 1/sqrt(d)`` is scaled dot-product attention and runs through
    ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where available); sparse
    separations run a block-wise core that never stores the score matrix (unless the association
    is asked for, or dropout needs the weights).

    Args:
        query: state patterns ``(..., n, d)``; any leading batch/head dimensions, including none.
        keys: stored patterns ``(..., m, d)``, leading dimensions broadcastable with ``query``'s.
        values: patterns read out in the last step ``(..., m, d_v)``; defaults to ``keys``.
        beta: inverse temperature, a positive float or a tensor broadcastable to ``(..., 1, 1)``
            (e.g. one value per head).
        separation: ``"softmax"``, ``"sparsemax"``, ``"entmax15"``, a float alpha in [1, 2] or a
            tensor alpha (see :func:`hopformer.functional.separate`).
        steps: number of update steps (>= 1).
        eps: stop iterating early once the largest change of the state is below ``eps``
            (checked once per step; this reads a value back from the device).
        mask: boolean (``True`` = key takes part) or additive float mask broadcastable to
            ``(..., n, m)``; a row with every key masked retrieves zeros.
        dropout: dropout probability on the association weights of the last step.
        return_association: also return the last step's association matrix ``(..., n, m)``.

    Returns:
        The retrieved patterns ``(..., n, d_v)`` (and the association matrix if asked for).
    """
    _check_patterns(query, keys, values)
    _check_beta(beta)
    separation = check_separation(separation)
    _check_scores_mask(mask, query, keys)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be positive or None, got {eps!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    values = keys if values is None else values

    x = query
    for _ in range(steps - 1):
        x_new = _step(x, keys, keys, beta=beta, separation=separation, mask=mask, dropout=0.0)
        converged = eps is not None and bool((x_new - x).abs().amax() < eps)
        x = x_new
        if converged:
            break

    if not return_association:
        return _step(x, keys, values, beta=beta, separation=separation, mask=mask, dropout=dropout)
    weights = association(x, keys, beta=beta, separation=separation, mask=mask)
    kept = F.dropout(weights, p=dropout) if dropout > 0 else weights
    return torch.matmul(kept, values), weights


def hopfield_energy(
    query: Tensor,
    keys: Tensor,
    *,
    beta: float | Tensor,
    separation="softmax",
    mask: Tensor | None = None,
) -> Tensor:
    """Energy ``E(x) = -(1/beta) Psi*(beta K x) + 0.5 <x, x>`` of each state pattern, shape ``(..., n)``.

    ``Psi*`` is the convex conjugate of the separation's regulariser (softmax: log-sum-exp, Ramsauer et al. 2020; sparsemax: Hu et al. 2023; alpha-entmax: Tsallis conjugate, Wu et al. 2024):
    log-sum-exp for softmax (Ramsauer et al. eq. 2), the sparsemax conjugate (Hu et al. eq. 3.1),
    and the Tsallis alpha-entmax conjugate (Wu et al. 2024, eq. 3.1). Along
    :func:`hopfield_retrieve` steps with values = keys the energy is non-increasing.
    """
    _check_patterns(query, keys, None)
    _check_beta(beta)
    separation = check_separation(separation)
    scores = _scores(query, keys, beta, mask)
    beta_t = beta.squeeze(-1) if isinstance(beta, Tensor) and beta.dim() > 0 else beta
    return -separation_conjugate(scores, separation, dim=-1) / beta_t + 0.5 * (query * query).sum(-1)
