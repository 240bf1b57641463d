"""Continuous-time memories for modern Hopfield networks (Santos et al. 2025, arXiv 2502.10122).

``L`` discrete memories ``X = [x_1 .. x_L]`` at evenly spaced positions ``t_l`` in [0, 1] are
compressed into ``N`` coefficients ``B`` of basis functions ``psi(t)`` by ridge regression (eq. 5)::

    B = (F F^T + lambda I)^-1 F X,        F = [psi(t_1) .. psi(t_L)]  (N x L)

so that ``xbar(t) = B^T psi(t)`` (eq. 4). Retrieval is the CCCP step on the energy (6)::

    E(q) = -(1/beta) log int_0^1 exp(beta xbar(t)^T q) dt + 0.5 ||q||^2

i.e. the Gibbs expectation update (7)-(8) ``q <- B^T int p(t) psi(t) dt``. Integrals use the
trapezoidal rule on ``K`` points (max-subtracted, in log space), or the exact closed form for
rectangular boxes: the score is constant on each box, so ``int p psi_n dt = softmax(beta B q)_n``.

Every function here is pure torch and differentiable with autograd (no custom backward).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checks import positive_int

__all__ = [
    "memory_positions",
    "rectangular_basis",
    "rectangular_integral",
    "gaussian_basis",
    "gaussian_integral",
    "trapezoid_rule",
    "ridge_factor",
    "ridge_coefficients",
    "masked_ridge_coefficients",
    "basis_responsibilities",
    "continuous_retrieve",
    "continuous_energy",
]



def _check_ridge(ridge) -> float:
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not ridge >= 0 or math.isinf(ridge):
        raise ValueError(f"ridge (lambda of eq. 5) must be a finite number >= 0, got {ridge!r}")
    return float(ridge)


def _check_beta(beta) -> None:
    if isinstance(beta, Tensor):
        return
    if not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta (inverse temperature) must be a positive number, got {beta!r}")


def memory_positions(length: int, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Positions ``t_l`` of ``length`` memories, evenly spaced in [0, 1] (``[0.]`` for one memory)."""
    positive_int("length (number of memories L)", length)
    if length == 1:
        return torch.zeros(1, dtype=dtype, device=device)
    return torch.linspace(0.0, 1.0, length, dtype=dtype, device=device)


def rectangular_basis(t: Tensor, num_basis: int) -> Tensor:
    """Rectangular boxes ``psi_n(t) = 1[n/N <= t < (n+1)/N]`` (the last box closed at 1): ``(..., N)``."""
    positive_int("num_basis (N)", num_basis)
    index = torch.clamp((t * num_basis).floor().long(), 0, num_basis - 1)
    return torch.nn.functional.one_hot(index, num_basis).to(t.dtype)


def rectangular_integral(num_basis: int, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """``int_0^1 psi_n(t) dt = 1/N`` for each box: ``(N,)``."""
    positive_int("num_basis (N)", num_basis)
    return torch.full((num_basis,), 1.0 / num_basis, dtype=dtype, device=device)


def gaussian_basis(t: Tensor, centers: Tensor, widths: Tensor) -> Tensor:
    """Gaussian RBFs ``psi_n(t) = N(t; mu_n, sigma_n^2)`` (infinity-former style): ``(..., N)``.

    Args:
        t: positions, any shape.
        centers: ``mu`` ``(N,)``.
        widths: ``sigma`` ``(N,)``, > 0.
    """
    z = (t.unsqueeze(-1) - centers) / widths
    return torch.exp(-0.5 * z * z) / (widths * math.sqrt(2.0 * math.pi))


def gaussian_integral(centers: Tensor, widths: Tensor) -> Tensor:
    """Closed form ``int_0^1 N(t; mu_n, sigma_n^2) dt = Phi((1 - mu)/sigma) - Phi(-mu/sigma)``: ``(N,)``."""
    normal = torch.distributions.Normal(torch.zeros_like(centers), torch.ones_like(widths))
    return normal.cdf((1.0 - centers) / widths) - normal.cdf(-centers / widths)


def trapezoid_rule(num_points: int, *, dtype: torch.dtype = torch.float32, device=None) -> tuple[Tensor, Tensor]:
    """Nodes ``t_k`` (``K`` evenly spaced in [0, 1]) and trapezoid weights (summing to 1): two ``(K,)`` tensors."""
    positive_int("num_points (K, quadrature points)", num_points, minimum=2)
    nodes = torch.linspace(0.0, 1.0, num_points, dtype=dtype, device=device)
    weights = torch.full((num_points,), 1.0 / (num_points - 1), dtype=dtype, device=device)
    weights[0] = weights[-1] = 0.5 / (num_points - 1)
    return nodes, weights


def _cholesky(gram: Tensor, what: str) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        raise ValueError(
            f"{what} is singular (a basis function covers no memory position): use ridge > 0, "
            "fewer basis functions, or more memories"
        )
    return chol


def ridge_factor(design: Tensor, ridge: float) -> Tensor:
    """The memory-independent factor ``A = (F F^T + lambda I)^-1 F`` of eq. (5), ``(N, L)``.

    ``B = A X`` for any memories ``X`` (``L x D``). Computed with a Cholesky solve (no explicit
    inverse); cache it per ``(L, N, lambda, basis)`` and reuse it for every call.

    Args:
        design: design matrix ``F`` ``(N, L)``, column ``l`` is ``psi(t_l)``.
        ridge: ``lambda >= 0``; 0 needs ``F F^T`` positive definite.
    """
    ridge = _check_ridge(ridge)
    if design.dim() != 2 or design.shape[0] < 1 or design.shape[1] < 1:
        raise ValueError(f"design matrix F must have shape (N, L) with N, L >= 1, got {tuple(design.shape)}")
    gram = design @ design.T + ridge * torch.eye(design.shape[0], dtype=design.dtype, device=design.device)
    return torch.cholesky_solve(design, _cholesky(gram, f"F F^T + {ridge} I"))


def ridge_coefficients(memories: Tensor, factor: Tensor) -> Tensor:
    """Basis coefficients ``B = A X`` (eq. 5), batched: memories ``(..., L, D)`` -> ``(..., N, D)``."""
    if memories.dim() < 2 or memories.shape[-2] == 0:
        raise ValueError(f"memories must have shape (..., L, D) with L >= 1, got {tuple(memories.shape)}")
    if factor.shape[-1] != memories.shape[-2]:
        raise ValueError(f"factor {tuple(factor.shape)} was built for L={factor.shape[-1]}, memories have L={memories.shape[-2]}")
    return torch.matmul(factor, memories)


def masked_ridge_coefficients(memories: Tensor, valid: Tensor, basis, ridge: float) -> Tensor:
    """Ridge coefficients of each memory set's valid memories only (key padding before compression).

    The valid memories of each set are re-spaced evenly over [0, 1] in their order, so the
    continuous signal covers exactly the valid ones; padded memories get zero weight in the fit.

    Args:
        memories: ``(B, ..., L, D)`` (e.g. ``(B, heads, L, D)``).
        valid: ``(B, L)`` boolean, ``True`` where a memory takes part.
        basis: callable ``t -> psi(t)`` mapping positions ``(B, L)`` to ``(B, L, N)``.
        ridge: ``lambda >= 0``.

    Returns:
        Coefficients ``(B, ..., N, D)``; all zero for a set with no valid memory.
    """
    ridge = _check_ridge(ridge)
    out_dtype = memories.dtype
    if out_dtype in (torch.float16, torch.bfloat16):  # Cholesky needs float32 or better
        memories = memories.float()
    valid = valid.to(torch.bool)
    weight = valid.to(memories.dtype)
    count = weight.sum(-1, keepdim=True)
    position = (torch.cumsum(weight, -1) - 1.0) / torch.clamp(count - 1.0, min=1.0)
    position = torch.where(valid, position, torch.zeros_like(position))
    design = basis(position) * weight.unsqueeze(-1)  # (B, L, N), padded rows zeroed
    n = design.shape[-1]
    eye = torch.eye(n, dtype=memories.dtype, device=memories.device)
    gram = design.transpose(-1, -2) @ design + ridge * eye
    empty = (count.squeeze(-1) == 0).view(-1, 1, 1)
    gram = torch.where(empty, eye.expand_as(gram), gram)  # an empty set gets B = 0, not a singular solve
    chol = _cholesky(gram, f"F W F^T + {ridge} I")
    extra = memories.dim() - 3  # dims between batch and L (heads)
    design_t = design.transpose(-1, -2).reshape(design.shape[0], *([1] * extra), n, design.shape[1])
    chol = chol.reshape(chol.shape[0], *([1] * extra), n, n)
    return torch.cholesky_solve(torch.matmul(design_t, memories), chol).to(out_dtype)


def basis_responsibilities(
    query: Tensor,
    coefficients: Tensor,
    *,
    beta: float | Tensor,
    psi: Tensor | None = None,
    quad_weights: Tensor | None = None,
) -> Tensor:
    """``r = int_0^1 p(t) psi(t) dt`` for the Gibbs density (8) of each query: ``(..., n, N)``.

    Args:
        query: ``(..., n, D)``.
        coefficients: ``B`` ``(..., N, D)``.
        beta: inverse temperature.
        psi: basis at the quadrature nodes ``(K, N)``; ``None`` = exact closed form for N
            rectangular boxes (a softmax over the box scores).
        quad_weights: quadrature weights ``(K,)`` (trapezoid rule), needed with ``psi``.
    """
    if psi is None:
        return torch.softmax(torch.matmul(query, coefficients.transpose(-1, -2)) * beta, dim=-1)
    if quad_weights is None:
        raise ValueError("quad_weights (trapezoid weights, shape (K,)) are needed together with psi")
    scores = torch.matmul(torch.matmul(query, coefficients.transpose(-1, -2)) * beta, psi.transpose(-1, -2))
    density = torch.softmax(scores + torch.log(quad_weights), dim=-1)  # max-subtracted by softmax
    return torch.matmul(density, psi)


def _check_retrieval(query: Tensor, coefficients: Tensor, psi: Tensor | None) -> None:
    if query.dim() < 2 or coefficients.dim() < 2:
        raise ValueError(
            f"query (..., n, D) and coefficients (..., N, D) need 2+ dims, got {tuple(query.shape)} and {tuple(coefficients.shape)}"
        )
    if coefficients.shape[-2] == 0:
        raise ValueError(f"coefficients must hold N >= 1 basis coefficients, got shape {tuple(coefficients.shape)}")
    if query.shape[-1] != coefficients.shape[-1]:
        raise ValueError(f"query {tuple(query.shape)} and coefficients {tuple(coefficients.shape)} must share D")
    if psi is not None and (psi.dim() != 2 or psi.shape[-1] != coefficients.shape[-2] or psi.shape[0] < 2):
        raise ValueError(
            f"psi must have shape (K >= 2, N={coefficients.shape[-2]}), got {tuple(psi.shape)}"
        )


def continuous_retrieve(
    query: Tensor,
    coefficients: Tensor,
    value_coefficients: Tensor | None = None,
    *,
    beta: float | Tensor,
    psi: Tensor | None = None,
    quad_weights: Tensor | None = None,
    steps: int = 1,
    eps: float | None = None,
    return_association: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Gibbs expectation update (7): ``q <- B^T int p(t) psi(t) dt``, ``steps - 1`` times, then the read-out.

    The last step reads out ``B_v^T int p psi`` with the value coefficients (default: the keys'),
    like :func:`hopformer.functional.hopfield_retrieve`. With ``N = L`` boxes and ``lambda -> 0``
    this is exactly the discrete modern Hopfield update.

    Args:
        query: ``(..., n, D)``.
        coefficients: key coefficients ``B`` ``(..., N, D)`` (from :func:`ridge_coefficients`).
        value_coefficients: ``(..., N, D_v)``; defaults to ``coefficients``.
        beta: inverse temperature (float, or tensor broadcastable to ``(..., 1, 1)``).
        psi, quad_weights: quadrature (see :func:`basis_responsibilities`); ``None`` = exact boxes.
        steps: number of updates (>= 1).
        eps: stop early when the largest change of the state is below ``eps``.
        return_association: also return the last responsibilities ``(..., n, N)``.
    """
    _check_retrieval(query, coefficients, psi)
    _check_beta(beta)
    positive_int("steps", steps)
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be positive or None, got {eps!r}")
    values = coefficients if value_coefficients is None else value_coefficients
    q = query
    for _ in range(steps - 1):
        q_new = torch.matmul(basis_responsibilities(q, coefficients, beta=beta, psi=psi, quad_weights=quad_weights), coefficients)
        converged = eps is not None and bool((q_new - q).abs().amax() < eps)
        q = q_new
        if converged:
            break
    r = basis_responsibilities(q, coefficients, beta=beta, psi=psi, quad_weights=quad_weights)
    out = torch.matmul(r, values)
    return (out, r) if return_association else out


def continuous_energy(
    query: Tensor,
    coefficients: Tensor,
    *,
    beta: float | Tensor,
    psi: Tensor | None = None,
    quad_weights: Tensor | None = None,
) -> Tensor:
    """Energy (6) ``-(1/beta) log int_0^1 exp(beta xbar(t)^T q) dt + 0.5 ||q||^2`` per query: ``(..., n)``.

    The first term is ``-(1/beta) log Z`` (not CHM-Net's ``-log(Z / beta)``). Exact for boxes
    (``psi=None``: ``Z = (1/N) sum_n exp(beta b_n^T q)``), trapezoid rule otherwise. Non-increasing
    along :func:`continuous_retrieve` steps (CCCP).
    """
    _check_retrieval(query, coefficients, psi)
    _check_beta(beta)
    beta_t = beta.squeeze(-1) if isinstance(beta, Tensor) and beta.dim() > 0 else beta
    scores = torch.matmul(query, coefficients.transpose(-1, -2)) * beta
    if psi is None:
        log_z = torch.logsumexp(scores, dim=-1) - math.log(coefficients.shape[-2])
    else:
        if quad_weights is None:
            raise ValueError("quad_weights (trapezoid weights, shape (K,)) are needed together with psi")
        log_z = torch.logsumexp(torch.matmul(scores, psi.transpose(-1, -2)) + torch.log(quad_weights), dim=-1)
    return -log_z / beta_t + 0.5 * (query * query).sum(-1)
