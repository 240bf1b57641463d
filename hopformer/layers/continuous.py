"""Continuous-time memory (Santos et al. 2025, arXiv 2502.10122): the memory of a :class:`HopfieldRetrieval`.

Passed as ``memory=ContinuousMemory(...)`` to any Hopfield interface (``Hopfield``, ``HopfieldAttention``,
``MultiheadHopfield``), it compresses each head's ``L`` keys and values into ``N`` basis coefficients by ridge
regression (eq. 5) and retrieves with the Gibbs expectation update (eqs. 7-8). A query then costs ``O(N d)``
(rectangular boxes, exact closed form) or ``O(K N + N d)`` (trapezoid rule on ``K`` points)
instead of ``O(L d)``; the compression itself is one ``(N x L) @ (L x d)`` product per head with a
factor cached per ``(L, N, lambda, basis)``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..checks import positive_float, positive_int
from ..functional.continuous import (
    continuous_energy,
    continuous_retrieve,
    gaussian_basis,
    gaussian_integral,
    masked_ridge_coefficients,
    memory_positions,
    rectangular_basis,
    rectangular_integral,
    ridge_coefficients,
    ridge_factor,
    trapezoid_rule,
)

__all__ = [
    "RectangularBasis",
    "GaussianBasis",
    "ContinuousMemory",
    "MEMORY_OPTIONS",
    "as_memory",
    "make_basis",
]


class RectangularBasis(nn.Module):
    """``N`` uniformly spaced rectangular boxes on [0, 1] (the paper's choice), heights 1.

    Args:
        num_basis: number of boxes ``N`` (>= 1).
    """

    learnable = False

    def __init__(self, num_basis: int) -> None:
        super().__init__()
        self.num_basis = positive_int("num_basis", num_basis)

    def forward(self, t: Tensor) -> Tensor:
        """``psi(t)``: positions of any shape -> ``(..., N)``."""
        return rectangular_basis(t, self.num_basis)

    def integral(self) -> Tensor:
        """``int_0^1 psi(t) dt`` ``(N,)``, closed form."""
        return rectangular_integral(self.num_basis)

    def resized(self, num_basis: int) -> "RectangularBasis":
        return RectangularBasis(num_basis)

    @property
    def cache_key(self) -> tuple:
        return ("rectangular", self.num_basis)

    def extra_repr(self) -> str:
        return f"num_basis={self.num_basis}"


class GaussianBasis(nn.Module):
    """``N`` Gaussian RBFs ``N(t; mu_n, sigma_n^2)`` on [0, 1] (infinity-former style), closed-form integrals.

    Args:
        num_basis: number of functions ``N`` (>= 1); centres evenly spaced in [0, 1].
        width: common width ``sigma`` (> 0); default ``1 / N``.
        learnable: learn the centres and ``log`` widths (then the ridge factor is recomputed each call).
    """

    def __init__(self, num_basis: int, width: float | None = None, learnable: bool = False) -> None:
        super().__init__()
        self.num_basis = positive_int("num_basis", num_basis)
        width = 1.0 / num_basis if width is None else width
        if not isinstance(width, (int, float)) or not width > 0:
            raise ValueError(f"width (sigma of the Gaussian basis) must be > 0, got {width!r}")
        self.width, self.learnable = float(width), learnable
        centers = memory_positions(num_basis)
        log_widths = torch.full((num_basis,), math.log(width))
        if learnable:
            self.centers, self.log_widths = nn.Parameter(centers), nn.Parameter(log_widths)
        else:
            self.register_buffer("centers", centers)
            self.register_buffer("log_widths", log_widths)

    def forward(self, t: Tensor) -> Tensor:
        """``psi(t)``: positions of any shape -> ``(..., N)``."""
        return gaussian_basis(t, self.centers.to(t.dtype), self.log_widths.exp().to(t.dtype))

    def integral(self) -> Tensor:
        """``int_0^1 psi(t) dt`` ``(N,)``, closed form."""
        return gaussian_integral(self.centers, self.log_widths.exp())

    def resized(self, num_basis: int) -> "GaussianBasis":
        return GaussianBasis(num_basis, width=1.0 / num_basis)

    @property
    def cache_key(self) -> tuple:
        return ("gaussian", self.num_basis, self.width)

    def extra_repr(self) -> str:
        return f"num_basis={self.num_basis}, width={self.width:.4g}, learnable={self.learnable}"


def make_basis(basis: str | nn.Module, num_basis: int) -> nn.Module:
    """A basis module from its name (``"rectangular"`` or ``"gaussian"``) or a given module."""
    if isinstance(basis, nn.Module):
        return basis
    if basis == "rectangular":
        return RectangularBasis(num_basis)
    if basis == "gaussian":
        return GaussianBasis(num_basis)
    raise ValueError(f"basis must be 'rectangular', 'gaussian' or a basis module, got {basis!r}")


class ContinuousMemory(nn.Module):
    """The continuous-time memory of one layer: basis, cached ridge factor, quadrature, retrieval.

    Args:
        num_basis: number of basis functions ``N`` (>= 1) the ``L`` memories are compressed to.
        basis: ``"rectangular"`` (paper), ``"gaussian"``, or a basis module.
        ridge: ridge penalty ``lambda >= 0`` of eq. (5).
        num_points: trapezoid points ``K`` (>= 2) for the integrals of eqs. (7)-(8) (paper: 500).
        integration: ``"auto"`` (exact closed form for boxes, trapezoid otherwise), ``"exact"``
            (boxes only) or ``"trapezoid"``.
        clip_basis: use ``min(N, L)`` functions when a memory set is shorter than ``N`` (fixed
            bases only); more functions than memories only adds empty boxes.
    """

    def __init__(
        self,
        num_basis: int = 16,
        basis: str | nn.Module = "rectangular",
        ridge: float = 1e-3,
        num_points: int = 500,
        integration: str = "auto",
        clip_basis: bool = True,
    ) -> None:
        super().__init__()
        self.basis = make_basis(basis, positive_int("num_basis", num_basis))
        self.num_basis = self.basis.num_basis
        positive_float("ridge (lambda of eq. 5)", ridge, allow_zero=True)
        positive_int("num_points (K, trapezoid points)", num_points, minimum=2)
        if integration not in ("auto", "exact", "trapezoid"):
            raise ValueError(f"integration must be 'auto', 'exact' or 'trapezoid', got {integration!r}")
        if integration == "exact" and not isinstance(self.basis, RectangularBasis):
            raise ValueError("integration='exact' has a closed form only for the rectangular basis")
        self.ridge, self.num_points, self.clip_basis = float(ridge), num_points, clip_basis
        self.exact = integration == "exact" or (integration == "auto" and isinstance(self.basis, RectangularBasis))
        self._cache: dict = {}

    def basis_for(self, length: int) -> nn.Module:
        """The basis used for ``length`` memories (``min(N, L)`` functions when clipping)."""
        if self.clip_basis and not getattr(self.basis, "learnable", False) and length < self.num_basis:
            return self.basis.resized(length)
        return self.basis

    def _cached(self, key: tuple, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda()/.double(): cached tensors must follow
        self._cache = {}
        return super()._apply(fn, *args, **kwargs)

    def ridge_factor(self, length: int, dtype: torch.dtype, device) -> Tensor:
        """The ``(N, L)`` factor ``(F F^T + lambda I)^-1 F`` of eq. (5), cached per ``(L, N, lambda, basis)``."""
        basis = self.basis_for(length)
        if getattr(basis, "learnable", False):
            return ridge_factor(basis(memory_positions(length, dtype=dtype, device=device)).T, self.ridge)

        def build() -> Tensor:  # solved once in float64 (Cholesky), then cast
            t = memory_positions(length, dtype=torch.float64, device=device)
            return ridge_factor(basis.to(device)(t).to(torch.float64).T, self.ridge).to(dtype)

        return self._cached(("factor", length, basis.cache_key, self.ridge, dtype, device), build)

    def quadrature(self, length: int, dtype, device) -> tuple[Tensor | None, Tensor | None]:
        """``psi`` at the ``K`` trapezoid nodes ``(K, N)`` and the weights ``(K,)``; ``(None, None)`` when exact."""
        if self.exact:
            return None, None
        basis = self.basis_for(length)

        def build():
            nodes, weights = trapezoid_rule(self.num_points, dtype=dtype, device=device)
            return basis.to(device)(nodes).to(dtype), weights

        if getattr(basis, "learnable", False):
            return build()
        return self._cached(("quad", self.num_points, basis.cache_key, dtype, device), build)

    def compress(self, memories: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Basis coefficients (eq. 5): ``(B, H, L, d) -> (B, H, N, d)``; padded memories left out."""
        length = memories.shape[-2]
        if length == 0:
            raise ValueError(f"memories must hold at least one pattern, got shape {tuple(memories.shape)}")
        if key_padding_mask is None:
            return ridge_coefficients(memories, self.ridge_factor(length, memories.dtype, memories.device))
        valid = ~key_padding_mask if key_padding_mask.dtype == torch.bool else ~torch.isinf(key_padding_mask)
        return masked_ridge_coefficients(memories, valid, self.basis_for(length).to(memories.device), self.ridge)

    def retrieve(self, q: Tensor, k: Tensor, v: Tensor, *, beta, steps: int = 1, eps: float | None = None,
                 key_padding_mask: Tensor | None = None, dropout: float = 0.0) -> tuple[Tensor, Tensor]:
        """Gibbs retrieval (eqs. 7-8) of queries ``(B, H, Lq, d)`` from the compressed ``k``, ``v``.

        Returns the read-out ``(B, H, Lq, d_v)`` and the responsibilities ``(B, H, Lq, N)``.
        """
        coef_k, coef_v = self.compress(k, key_padding_mask), self.compress(v, key_padding_mask)
        psi, weights = self.quadrature(k.shape[-2], q.dtype, q.device)
        out, resp = continuous_retrieve(q, coef_k, coef_v, beta=beta, psi=psi, quad_weights=weights,
                                        steps=steps, eps=eps, return_association=True)
        if dropout > 0:
            out = torch.matmul(nn.functional.dropout(resp, p=dropout), coef_v)
        return out, resp

    def energy(self, q: Tensor, k: Tensor, *, beta, key_padding_mask: Tensor | None = None) -> Tensor:
        """Energy (6) of queries ``(B, H, Lq, d)`` against the compressed keys: ``(B, H, Lq)``."""
        coef = self.compress(k, key_padding_mask)
        psi, weights = self.quadrature(k.shape[-2], q.dtype, q.device)
        return continuous_energy(q, coef, beta=beta, psi=psi, quad_weights=weights)

    def extra_repr(self) -> str:
        how = "exact" if self.exact else f"trapezoid(K={self.num_points})"
        return f"num_basis={self.num_basis}, ridge={self.ridge}, integration={how}"


MEMORY_OPTIONS = ("num_basis", "basis", "ridge", "num_points", "integration", "clip_basis")


def as_memory(memory: "ContinuousMemory | Mapping[str, Any] | None") -> "ContinuousMemory | None":
    """The memory of a Hopfield interface: ``None`` (discrete), a :class:`ContinuousMemory`, or a dict of its
    options (``{"num_basis": 16}``; a new memory per layer, so a ``functools.partial`` stays shareable)."""
    if memory is None or (isinstance(memory, nn.Module) and callable(getattr(memory, "retrieve", None))):
        return memory  # a ContinuousMemory, or any module with its retrieve/energy interface
    if isinstance(memory, Mapping):
        unknown = sorted(set(memory) - set(MEMORY_OPTIONS))
        if unknown:
            raise ValueError(f"memory: unknown ContinuousMemory options {unknown}; valid: {list(MEMORY_OPTIONS)}")
        return ContinuousMemory(**memory)
    raise TypeError(f"memory must be None, a ContinuousMemory (or a module with its retrieve/energy methods) or a "
                    f"dict of its options {list(MEMORY_OPTIONS)}, "
                    f"got {type(memory).__name__}")
