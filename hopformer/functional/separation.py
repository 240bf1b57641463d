"""Separation maps (SPEC section 1): softmax, sparsemax, 1.5-entmax and alpha-entmax.

Provisional version wrapping the `entmax` package; a faster exact implementation follows.
"""

from __future__ import annotations

from typing import Union

import torch
from entmax import entmax15 as _entmax15_ref
from entmax import entmax_bisect as _entmax_bisect_ref
from entmax import sparsemax as _sparsemax_ref

SEPARATIONS = ("softmax", "sparsemax", "entmax15")
Separation = Union[str, float, torch.Tensor]


def check_separation(separation: Separation) -> Separation:
    """Validate and normalise a separation spec.

    Returns "softmax" | "sparsemax" | "entmax15" for names and for the floats 1.0, 2.0, 1.5,
    a float alpha in [1, 2] otherwise, or the tensor alpha unchanged (values checked).
    """
    if isinstance(separation, str):
        if separation not in SEPARATIONS:
            raise ValueError(
                f"separation must be one of {SEPARATIONS}, a float alpha in [1, 2] or a tensor alpha; "
                f"got {separation!r}"
            )
        return separation
    if isinstance(separation, torch.Tensor):
        if not separation.is_floating_point():
            raise ValueError(f"separation: a tensor alpha must be floating point, got dtype {separation.dtype}")
        with torch.no_grad():
            bad = (separation < 1) | (separation > 2) | torch.isnan(separation)
            if bool(bad.any()):
                raise ValueError(
                    f"separation: tensor alpha must lie in [1, 2], got values in "
                    f"[{separation.min().item():.4g}, {separation.max().item():.4g}]"
                )
        return separation
    if isinstance(separation, (int, float)) and not isinstance(separation, bool):
        alpha = float(separation)
        if not 1.0 <= alpha <= 2.0:
            raise ValueError(
                f"separation: alpha must lie in [1, 2] (1 = softmax, 2 = sparsemax), got {separation!r}"
            )
        if alpha == 1.0:
            return "softmax"
        if alpha == 2.0:
            return "sparsemax"
        if alpha == 1.5:
            return "entmax15"
        return alpha
    raise ValueError(
        f"separation must be one of {SEPARATIONS}, a float alpha in [1, 2] or a tensor alpha; "
        f"got {separation!r} of type {type(separation).__name__}"
    )


def is_softmax(separation: Separation) -> bool:
    """True when `separation` is plain softmax ("softmax" or float alpha 1.0)."""
    if isinstance(separation, str):
        return separation == "softmax"
    if isinstance(separation, (int, float)) and not isinstance(separation, bool):
        return float(separation) == 1.0
    return False


def _prepare(scores: torch.Tensor, dim: int):
    dtype = scores.dtype
    z = scores.float() if dtype in (torch.float16, torch.bfloat16) else scores
    neginf = torch.isneginf(z)
    empty = neginf.all(dim=dim, keepdim=True)
    zmax = torch.where(neginf, torch.zeros_like(z), z).amax(dim=dim, keepdim=True)
    return z, neginf, empty, zmax, dtype


def _finish(p: torch.Tensor, neginf, empty, dtype):
    p = torch.where(neginf | empty, torch.zeros_like(p), p)
    return p.to(dtype)


def softmax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax; -inf entries get weight 0 and an all -inf row gives all zeros."""
    z, neginf, empty, _, dtype = _prepare(scores, dim)
    z = torch.where(empty, torch.zeros_like(z), z)
    return _finish(torch.softmax(z, dim=dim), neginf, empty, dtype)


def sparsemax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax (Martins & Astudillo 2016): Euclidean projection onto the simplex."""
    z, neginf, empty, zmax, dtype = _prepare(scores, dim)
    z = torch.where(neginf | empty, zmax - 2.0, z)
    return _finish(_sparsemax_ref(z, dim=dim), neginf, empty, dtype)


def entmax15(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax (Peters et al. 2019)."""
    z, neginf, empty, zmax, dtype = _prepare(scores, dim)
    z = torch.where(neginf | empty, zmax - 3.0, z)
    return _finish(_entmax15_ref(z, dim=dim), neginf, empty, dtype)


def entmax(scores: torch.Tensor, alpha, dim: int = -1, n_iter: int = 50) -> torch.Tensor:
    """alpha-entmax, alpha in [1, 2] (float or tensor with size 1 along `dim`)."""
    alpha = check_separation(alpha) if not isinstance(alpha, str) else alpha
    if isinstance(alpha, str):
        return {"softmax": softmax, "sparsemax": sparsemax, "entmax15": entmax15}[alpha](scores, dim=dim)
    z, neginf, empty, zmax, dtype = _prepare(scores, dim)
    a = alpha if isinstance(alpha, float) else alpha.to(z.dtype)
    gap = 1.0 / (a - 1.0) + 1.0 if isinstance(a, float) else 1.0 / (a.clamp_min(1e-6) - 1.0 + 1e-6) + 1.0
    z = torch.where(neginf | empty, zmax - gap, z)
    return _finish(_entmax_bisect_ref(z, a, dim=dim, n_iter=n_iter), neginf, empty, dtype)


def separate(scores: torch.Tensor, separation: Separation, dim: int = -1) -> torch.Tensor:
    """Apply the separation map named by `separation` along `dim`."""
    sep = check_separation(separation)
    if isinstance(sep, str):
        return {"softmax": softmax, "sparsemax": sparsemax, "entmax15": entmax15}[sep](scores, dim=dim)
    return entmax(scores, sep, dim=dim)


def separation_conjugate(scores: torch.Tensor, separation: Separation, dim: int = -1) -> torch.Tensor:
    """Psi*(z) = max_{p in simplex} <p, z> - Omega(p) (Tsallis Omega); reduces `dim`."""
    sep = check_separation(separation)
    z, neginf, empty, _, dtype = _prepare(scores, dim)
    if sep == "softmax":
        zz = torch.where(empty, torch.zeros_like(z), z)
        out = torch.logsumexp(zz, dim=dim, keepdim=True)
    else:
        p = separate(z, sep, dim=dim)
        alpha = {"sparsemax": 2.0, "entmax15": 1.5}.get(sep, sep) if not isinstance(sep, torch.Tensor) else sep
        zz = torch.where(neginf, torch.zeros_like(z), z)
        omega = (p.pow(alpha).sum(dim, keepdim=True) - 1.0) / (alpha * (alpha - 1.0))
        out = (p * zz).sum(dim, keepdim=True) - omega
    out = torch.where(empty, torch.zeros_like(out), out)
    return out.squeeze(dim).to(dtype)
