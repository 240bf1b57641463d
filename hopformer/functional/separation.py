"""Separation maps of the modern Hopfield core (Martins & Astudillo 2016; Peters et al. 2019; Hu et al. 2023; Wu et al. 2024): weights on the simplex from scores.

    softmax(z)      = argmax_{p in simplex} <p, z> + H^S(p)           (dense, Ramsauer et al. 2020)
    sparsemax(z)    = argmin_{p in simplex} ||p - z||^2                (Martins & Astudillo 2016)
    entmax(z, a)    = argmax_{p in simplex} <p, z> + H^T_a(p)          (Peters et al. 2019, eq. 2-4)

with the Tsallis entropy `H^T_a(p) = (1 - sum p^a) / (a (a - 1))`, `a` in [1, 2]: a = 1 is softmax,
a = 2 sparsemax, a = 1.5 the exact "entmax15". `separation_conjugate` gives the matching
`Psi*(z) = max_{p in simplex} <p, z> - Omega_a(p)` (`Omega_a = -H^T_a`) used by the Hopfield energies.

Conventions (all maps): computed along `dim`; half/bfloat16 inputs are computed in float32 and
returned in the input dtype (float64 stays float64); `-inf` scores get exactly zero weight; a row
whose scores are all `-inf` returns all zeros (and conjugate 0), never NaN; NaN or `+inf` scores
raise `ValueError` for the sparse maps. Sparse maps use sort-free exact threshold iterations on CPU
and GPU (see `_separation_kernels`), with closed-form backward passes.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from einops import rearrange
from torch.autograd import Function

import torch.nn.functional as F

from hopformer.functional._separated_attention import _lead_shape, separated_attention_core
from hopformer.functional._separation_kernels import _MAX_NEWTON, EntmaxFunction, SparsemaxFunction, _default_tol

SEPARATIONS = ("softmax", "sparsemax", "entmax15")
Separation = Union[str, float, torch.Tensor]

_ALPHA_OF = {"softmax": 1.0, "entmax15": 1.5, "sparsemax": 2.0}
_ALLOWED = f"one of {SEPARATIONS}, a float alpha in [1, 2] (1 = softmax, 2 = sparsemax) or a tensor alpha"

__all__ = [
    "SEPARATIONS",
    "check_separation",
    "entmax",
    "entmax15",
    "is_softmax",
    "separate",
    "separated_attention",
    "separation_conjugate",
    "softmax",
    "sparsemax",
]


# ----------------------------------------------------------------------------- validation


def check_separation(separation: Separation) -> Separation:
    """Validate and normalise a separation spec.

    Args:
        separation: "softmax" | "sparsemax" | "entmax15" | float alpha in [1, 2] | floating tensor
            alpha with values in [1, 2] (its shape is checked against the scores when applied).

    Returns:
        the name for "softmax"/"sparsemax"/"entmax15" and for the floats 1.0/2.0/1.5, the float
        alpha otherwise, or the tensor unchanged.

    Raises:
        ValueError: naming `separation`, the value received and the allowed values.
    """
    if isinstance(separation, str):
        if separation not in SEPARATIONS:
            raise ValueError(f"separation must be {_ALLOWED}; got {separation!r}")
        return separation
    if isinstance(separation, torch.Tensor):
        if not separation.is_floating_point():
            raise ValueError(f"separation: a tensor alpha must be floating point; got dtype {separation.dtype}")
        if separation.numel() and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(separation.detach())  # data-dependent: skipped while compiling
            if not (bool(lo >= 1.0) and bool(hi <= 2.0)):  # also False for NaN
                raise ValueError(
                    f"separation: tensor alpha must lie in [1, 2]; got values in [{lo.item():.4g}, {hi.item():.4g}]"
                )
        return separation
    if isinstance(separation, (int, float)) and not isinstance(separation, bool):
        alpha = float(separation)
        if not 1.0 <= alpha <= 2.0:
            raise ValueError(f"separation: alpha must lie in [1, 2] (1 = softmax, 2 = sparsemax); got {separation!r}")
        return {1.0: "softmax", 1.5: "entmax15", 2.0: "sparsemax"}.get(alpha, alpha)
    raise ValueError(f"separation must be {_ALLOWED}; got {separation!r} of type {type(separation).__name__}")


def is_softmax(separation: Separation) -> bool:
    """True when `separation` is plain softmax ("softmax" or float alpha 1.0): the fused SDPA path applies."""
    if isinstance(separation, str):
        return separation == "softmax"
    if isinstance(separation, (int, float)) and not isinstance(separation, bool):
        return float(separation) == 1.0
    return False


def _check_scores(scores: torch.Tensor, dim: int) -> int:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating point tensor; got {type(scores).__name__} "
                        f"{getattr(scores, 'dtype', '')}")
    if scores.dim() == 0 or not -scores.dim() <= dim < scores.dim():
        raise ValueError(f"dim={dim} is out of range for scores of shape {tuple(scores.shape)}")
    if scores.shape[dim] == 0 and all(s for i, s in enumerate(scores.shape) if i != dim % scores.dim()):
        raise ValueError(f"scores of shape {tuple(scores.shape)} have no entries along dim={dim}: a separation "
                         f"needs at least one score per row (there is no distribution over zero items)")
    return dim % scores.dim()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(scores: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Size]:
    """Scores as contiguous `(rows, n)` in the compute dtype, and the moved shape to restore."""
    moved = scores.movedim(dim, -1)
    rows = rearrange(moved, "... n -> (...) n").to(_compute_dtype(scores.dtype)).contiguous()
    return rows, moved.shape


def _unrows(rows: torch.Tensor, moved_shape: torch.Size, dim: int, dtype: torch.dtype) -> torch.Tensor:
    return rows.reshape(moved_shape).movedim(-1, dim).to(dtype)


def _check_alpha_shape(alpha: torch.Tensor, shape, dim: int) -> list:
    """Raise unless `alpha` broadcasts to `shape` with size 1 along `dim`; return that target shape."""
    target = list(shape)
    target[dim] = 1
    lead = len(target) - alpha.dim()
    ok = lead >= 0
    if ok:
        for have, want in zip(alpha.shape, target[lead:]):
            ok = ok and have in (1, want)
    if not ok:
        raise ValueError(
            f"separation (tensor alpha) must be broadcastable to {tuple(target)} (scores {tuple(shape)} "
            f"with size 1 along dim={dim}); got shape {tuple(alpha.shape)}"
        )
    return target


def _alpha_rows(alpha: torch.Tensor, scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Tensor alpha (broadcastable to scores, size 1 along `dim`) as `(rows, 1)`."""
    target = _check_alpha_shape(alpha, scores.shape, dim)
    a = alpha.to(_compute_dtype(scores.dtype)).expand(target).movedim(dim, -1)
    return rearrange(a, "... one -> (...) one")


# ----------------------------------------------------------------------------- maps


# The row kernels run data-dependent loops (and CPU worker threads): torch.compile runs them eagerly
# (one graph break each) instead of tracing them.
@torch.compiler.disable
def _sparsemax_apply(z: torch.Tensor) -> torch.Tensor:
    return SparsemaxFunction.apply(z)


@torch.compiler.disable
def _entmax_apply(z: torch.Tensor, alpha, tol: float = 1e-5, max_iter: int = _MAX_NEWTON) -> torch.Tensor:
    return EntmaxFunction.apply(z, alpha, tol, max_iter)


def softmax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along `dim` (Ramsauer et al. 2020 update); all -inf rows give zeros instead of NaN.

    Args:
        scores: floating tensor; `-inf` marks entries that must get zero weight.
        dim: the dimension normalised onto the simplex.
    """
    dim = _check_scores(scores, dim)
    cdtype = _compute_dtype(scores.dtype)
    empty = torch.isneginf(scores.amax(dim=dim, keepdim=True))
    if bool(empty.any()):
        safe = scores.masked_fill(empty, 0.0)
        return torch.softmax(safe, dim=dim, dtype=cdtype).masked_fill(empty, 0.0).to(scores.dtype)
    return torch.softmax(scores, dim=dim, dtype=cdtype).to(scores.dtype)


def sparsemax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax along `dim` (Martins & Astudillo 2016, eq. 2): Euclidean projection onto the simplex.

    Exact (sort-free support iteration), exact zeros, closed-form backward `s * (g - mean_s(g))`.
    """
    dim = _check_scores(scores, dim)
    if scores.numel() == 0:
        return scores.clone()
    z, shape = _rows(scores, dim)
    return _unrows(_sparsemax_apply(z), shape, dim, scores.dtype)


def entmax15(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax along `dim` (Peters et al. 2019, eq. 4 with alpha = 1.5), exact threshold, exact zeros."""
    dim = _check_scores(scores, dim)
    if scores.numel() == 0:
        return scores.clone()
    z, shape = _rows(scores, dim)
    return _unrows(_entmax_apply(z, 1.5), shape, dim, scores.dtype)


def entmax(
    scores: torch.Tensor,
    alpha: Union[float, torch.Tensor],
    dim: int = -1,
    n_iter: int = _MAX_NEWTON,
    tol: Optional[float] = None,
) -> torch.Tensor:
    """alpha-entmax along `dim` (Peters et al. 2019, eq. 4), differentiable w.r.t. scores and alpha.

    Args:
        scores: floating tensor; `-inf` entries get weight 0.
        alpha: float in [1, 2] or tensor broadcastable to `scores` with size 1 along `dim` (per row /
            per head). 1 gives softmax, 2 sparsemax and 1.5 entmax15 exactly; the gradient w.r.t. a
            tensor alpha follows Correia et al. 2019 (eq. 12-14).
        dim: the dimension normalised onto the simplex.
        n_iter: maximum Newton iterations for the threshold (it stops earlier once converged).
        tol: stop when `| ||(x - tau)_+||_{1/(alpha-1)} - 1 | <= tol` (default 1e-5 in float32,
            1e-12 in float64: max error of p below 2e-6 against 200-step bisection); the row is then renormalised to sum to one.
    """
    if isinstance(alpha, str) or not isinstance(alpha, (int, float, torch.Tensor)) or isinstance(alpha, bool):
        raise ValueError(f"alpha must be a float in [1, 2] or a tensor alpha; got {alpha!r}")
    spec = check_separation(alpha)
    if isinstance(spec, str):
        return {"softmax": softmax, "sparsemax": sparsemax, "entmax15": entmax15}[spec](scores, dim=dim)
    dim = _check_scores(scores, dim)
    if isinstance(spec, torch.Tensor):
        a_rows = _alpha_rows(spec, scores, dim)
    if scores.numel() == 0:
        return scores.clone()
    z, shape = _rows(scores, dim)
    if tol is None:
        tol = _default_tol(z.dtype)
    if isinstance(spec, float):
        return _unrows(_entmax_apply(z, spec, tol, n_iter), shape, dim, scores.dtype)
    ones = a_rows == 1.0
    if bool(ones.any()):  # rows with alpha = 1 are softmax rows
        p = _entmax_apply(z, a_rows.masked_fill(ones, 1.5), tol, n_iter)
        p = torch.where(ones, softmax(z, dim=-1), p)
    else:
        p = _entmax_apply(z, a_rows, tol, n_iter)
    return _unrows(p, shape, dim, scores.dtype)


def separate(scores: torch.Tensor, separation: Separation, dim: int = -1) -> torch.Tensor:
    """Apply the separation map `separation` (see `check_separation`) to `scores` along `dim`."""
    spec = check_separation(separation)
    if isinstance(spec, str):
        return {"softmax": softmax, "sparsemax": sparsemax, "entmax15": entmax15}[spec](scores, dim=dim)
    return entmax(scores, spec, dim=dim)


# ----------------------------------------------------------------------------- conjugate


def _safe(p: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(p > 0, p with zeros replaced by 1): keeps the derivatives of log p and p^a finite at p = 0."""
    on = p > 0
    return on, torch.where(on, p, torch.ones_like(p))


def _omega_rows(p: torch.Tensor, a: Union[float, torch.Tensor]) -> torch.Tensor:
    """Omega_a(p) = (sum p^a - 1) / (a (a - 1)) per row (negative Shannon entropy rows where a = 1)."""
    on, ps = _safe(p)
    zero = torch.zeros_like(p)
    plogp = lambda: torch.where(on, ps * torch.log(ps), zero).sum(-1, keepdim=True)  # noqa: E731
    if isinstance(a, float):
        if a == 1.0:
            return plogp()
        return (torch.where(on, ps.pow(a), zero).sum(-1, keepdim=True) - 1.0) / (a * (a - 1.0))
    one = a == 1.0
    a_s = a.masked_fill(one, 2.0)
    tsallis = (torch.where(on, ps.pow(a_s), zero).sum(-1, keepdim=True) - 1.0) / (a_s * (a_s - 1.0))
    return torch.where(one, plogp(), tsallis) if bool(one.any()) else tsallis


def _domega_dalpha_rows(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """d Omega_a(p) / d a at fixed p; at a = 1 the limit sum p log^2 p / 2."""
    on, ps = _safe(p)
    zero = torch.zeros_like(p)
    logp = torch.where(on, torch.log(ps), zero)
    one = a == 1.0
    a_s = a.masked_fill(one, 2.0)
    pa = torch.where(on, ps.pow(a_s), zero)
    denom = a_s * (a_s - 1.0)
    d = (pa * logp).sum(-1, keepdim=True) / denom - (pa.sum(-1, keepdim=True) - 1.0) * (2.0 * a_s - 1.0) / denom**2
    return torch.where(one, 0.5 * (p * logp * logp).sum(-1, keepdim=True), d)


def _weights_rows(z: torch.Tensor, a: Union[float, torch.Tensor]) -> torch.Tensor:
    if isinstance(a, float):
        return {1.0: softmax, 2.0: sparsemax, 1.5: entmax15}.get(a, lambda s, dim: entmax(s, a, dim=dim))(z, dim=-1)
    one = a == 1.0
    p = _entmax_apply(z, a.masked_fill(one, 1.5), _default_tol(z.dtype), _MAX_NEWTON)
    return torch.where(one, softmax(z, dim=-1), p) if bool(one.any()) else p


class _ConjugateFunction(Function):
    """Psi*(z) per row with Danskin's gradient p* (and -dOmega/dalpha for a tensor alpha)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, a_t: Optional[torch.Tensor], a_f: float):
        a = a_t if a_t is not None else a_f
        with torch.no_grad():
            p = _weights_rows(z, a)
            empty = torch.isneginf(z.amax(-1, keepdim=True))
            if isinstance(a, float) and a == 1.0:
                psi = torch.logsumexp(z.masked_fill(empty, 0.0), dim=-1, keepdim=True)
            else:
                zf = z.masked_fill(torch.isneginf(z), 0.0)
                psi = torch.linalg.vecdot(p, zf).unsqueeze(-1) - _omega_rows(p, a)
            psi = psi.masked_fill(empty, 0.0)
        ctx.a_f = a_f
        ctx.save_for_backward(z, p, a_t)
        return psi

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, p, a_t = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: recompute p* differentiably
            p = _weights_rows(z, a_t if a_t is not None else ctx.a_f)
        dz = g * p
        da = None
        if a_t is not None and ctx.needs_input_grad[1]:
            da = -g * _domega_dalpha_rows(p, a_t)
        return dz, da, None


@torch.compiler.disable
def _conjugate_apply(z: torch.Tensor, a_t: Optional[torch.Tensor], a_f: float) -> torch.Tensor:
    return _ConjugateFunction.apply(z, a_t, a_f)


def separation_conjugate(scores: torch.Tensor, separation: Separation, dim: int = -1) -> torch.Tensor:
    """Psi*(z) = max_{p in simplex} <p, z> - Omega(p), reducing `dim` (the energies' lse generalised).

    Omega is the negative Shannon entropy for softmax (Psi* = logsumexp), `0.5 ||p||^2 - 0.5` for
    sparsemax, and the Tsallis `(sum p^a - 1) / (a (a - 1))` for alpha-entmax (Peters et al. 2019;
    Hu et al. 2023, eq. 2.3; Wu et al. 2024). Its gradient w.r.t. `scores` is `separate(scores)`
    (Danskin); for a tensor alpha the gradient w.r.t. alpha is `-dOmega/dalpha` at p*. `-inf`
    entries are ignored; an all `-inf` row has no feasible p and is given the value 0.

    Returns:
        tensor of `scores.shape` without `dim`, in the dtype of `scores`.
    """
    spec = check_separation(separation)
    dim = _check_scores(scores, dim)
    a_t = _alpha_rows(spec, scores, dim) if isinstance(spec, torch.Tensor) else None
    a_f = _ALPHA_OF.get(spec, spec) if a_t is None else 0.0
    z, shape = _rows(scores, dim)
    psi = _conjugate_apply(z, a_t, float(a_f))
    return psi.reshape(shape[:-1]).to(scores.dtype)


# ----------------------------------------------------------------------------- fused attention core


_COMPILED_ALPHA_FLOOR = 1e-5


def separated_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: Optional[torch.Tensor] = None,
    *,
    separation: Separation = "softmax",
    beta: Union[float, torch.Tensor, None] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The attention/retrieval core `Sep(beta * query keys^T + mask) values` without materialising the scores.

    softmax runs `scaled_dot_product_attention`; sparsemax / entmax run block-wise with saved
    thresholds (`_separated_attention`), O(n) extra memory and cache-resident blocks on CPU.
    Identical (to float tolerance) to `separate(beta * query @ keys^T + mask, separation) @ values`.

    Args:
        query: `(..., n, d)` state patterns.
        keys: `(..., m, d)` stored patterns, leading dims broadcastable with `query`.
        values: `(..., m, dv)` read-out patterns; default `keys`.
        separation: see `check_separation`; a tensor alpha broadcasts to `(..., n, 1)`.
        beta: inverse temperature, float or tensor broadcastable to `(..., 1, 1)`; default 1/sqrt(d).
        mask: boolean (True = the key takes part) or additive float mask broadcastable to `(..., n, m)`;
            a row with every key masked reads out zeros.
    """
    spec = check_separation(separation)
    values = keys if values is None else values
    for name, t in (("query", query), ("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor of shape (..., n, d); got {getattr(t, 'shape', t)}")
    if query.shape[-1] != keys.shape[-1] or keys.shape[-2] != values.shape[-2]:
        raise ValueError(
            f"query (..., n, d), keys (..., m, d) and values (..., m, dv) do not fit: got query "
            f"{tuple(query.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}"
        )
    try:
        lead = _lead_shape(query.shape[:-2], keys.shape[:-2], values.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the leading (batch) dims of query {tuple(query.shape)}, keys {tuple(keys.shape)} and values "
            f"{tuple(values.shape)} must broadcast"
        ) from None
    score_shape = (*lead, query.shape[-2], keys.shape[-2])
    if isinstance(beta, torch.Tensor) and beta.numel() != 1 and (beta.dim() < 2 or beta.shape[-2:] != (1, 1)):
        raise ValueError(f"beta must be a float or a tensor broadcastable to (..., 1, 1); got shape {tuple(beta.shape)}")
    check_mask(mask, score_shape)
    if isinstance(spec, torch.Tensor):
        _check_alpha_shape(spec, score_shape, -1)
    beta = query.shape[-1] ** -0.5 if beta is None else beta
    alpha = _ALPHA_OF.get(spec, spec) if isinstance(spec, str) else spec
    if isinstance(alpha, float) and alpha == 1.0:
        return _softmax_attention(query, keys, values, beta, mask)
    if isinstance(alpha, torch.Tensor) and torch.compiler.is_compiling():
        # No data-dependent branch while compiling (it would break the graph at every layer): rows with
        # alpha = 1, which eager sends to the explicit path, run in the core at alpha = 1 + 1e-5 (softmax
        # to about 1e-3; a learnable alpha = 1 + sigmoid(a) only gets there when sigmoid underflows).
        alpha = alpha.clamp_min(1.0 + _COMPILED_ALPHA_FLOOR)
        unit_alpha = False
    else:
        unit_alpha = isinstance(alpha, torch.Tensor) and bool((alpha == 1.0).any())
    if unit_alpha or (mask is not None and mask.requires_grad and torch.is_grad_enabled()):  # rare cases: explicit path
        scores = torch.matmul(query, keys.transpose(-1, -2)) * beta
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return torch.matmul(separate(scores, spec), values.to(scores.dtype))
    return separated_attention_core(query, keys, values, beta, alpha, mask)


def check_mask(mask: Optional[torch.Tensor], score_shape) -> None:
    """A mask is boolean (True = the key takes part) or floating (added to the scores) and broadcasts to the
    scores without enlarging them; an integer mask would be added to the scores and mask nothing."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise TypeError(f"mask must be a boolean or floating point tensor (as in scaled_dot_product_attention); "
                        f"got {getattr(mask, 'dtype', type(mask).__name__)}")
    try:
        ok = torch.broadcast_shapes(mask.shape, score_shape) == torch.Size(score_shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask must broadcast to the scores' shape {tuple(score_shape)}; got shape {tuple(mask.shape)}")


def nan_rows_to_output(query: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """NaN output rows where the query row is not finite (SDPA's fused kernels can return finite numbers
    there, while the materialised ``softmax(q k^T) v`` gives NaN): one answer on every path.

    A row is not finite iff its maximum is NaN or +inf or its minimum is NaN or -inf (``amax`` / ``amin``
    propagate NaN): two reductions instead of elementwise tests over the query (which cost about 5% of
    a Hopfield ViT's CPU training step). On CPU outside ``torch.compile`` one sum over the whole query
    comes first: it is finite when every entry is (a NaN or infinite entry makes it NaN or infinite), and
    then the output is returned as it is (a quarter of the two reductions' time; a sum that overflows
    falls through to them). Elsewhere the mask is applied unconditionally (no device sync, no
    data-dependent branch in a compiled graph)."""
    if query.shape[-1] == 0:
        return out
    eager_cpu = out.device.type == "cpu" and not torch.compiler.is_compiling()
    if eager_cpu and bool(torch.isfinite(query.detach().sum())):
        return out
    bad = ~(torch.isfinite(query.amax(dim=-1, keepdim=True)) & torch.isfinite(query.amin(dim=-1, keepdim=True)))
    if eager_cpu and not bool(bad.any()):
        return out
    return out.masked_fill(bad, float("nan"))


def _softmax_attention(query, keys, values, beta, mask):
    """SDPA with all-masked rows reading out zeros (instead of NaN)."""
    if isinstance(beta, torch.Tensor):
        query, beta = query * beta, 1.0
    empty = None
    if mask is not None:
        dead = ~mask if mask.dtype == torch.bool else torch.isneginf(mask)
        empty = dead.all(dim=-1, keepdim=True)
        if bool(empty.any()):
            mask = mask | empty if mask.dtype == torch.bool else mask.masked_fill(empty, 0.0)
        else:
            empty = None
    out = nan_rows_to_output(query, F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=float(beta)))
    return out if empty is None else out.masked_fill(empty, 0.0)
