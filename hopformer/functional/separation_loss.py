"""U-Hop separation losses over a memory set (Wu, Hu et al., "Uniform Memory Retrieval with Larger
Capacity for Modern Hopfield Models", Def. 2.2, Def. 3.1 and Appendix G.2).

For kernelized memories ``Phi(xi_1) .. Phi(xi_M)`` (unit-normalised, ``Phi^ = Phi / ||Phi||``) and
their kernel ``K(u, v) = <Phi^(u), Phi^(v)>``:

- ``"average"`` (Def. 2.2, eq. 2.6): ``L = log mean_{u != v} exp(-t ||Phi^(u) - Phi^(v)||^2)``.
  On the unit sphere ``||Phi^(u) - Phi^(v)||^2 = 2 - 2 K(u, v)``, so ``L = log mean exp(2t (K - 1))``.
  This is the loss the authors use everywhere (retrieval and deep models).
- ``"orthogonal"`` (Def. 3.1, eq. 3.2): ``L = log mean_{u != v} exp(2t (K(u, v)^2 - 1))``, minimised by
  mutually orthogonal features (possible only when ``M <= D_phi``).
- ``"max"`` (Appendix G.2): only the closest pair counts, ``L = max_{u != v} -t ||Phi^(u) - Phi^(v)||^2``
  (the log of the largest Gaussian similarity); its minimiser maximises the radius ``R_Phi`` of
  Def. 2.1 but it is a non-convex max-min problem.

All are computed with log-sum-exp (no overflow/underflow for any ``t``) and batched over any leading
dimensions (independent memory sets). Cost: one ``(..., M, M)`` Gram matrix, i.e. ``O(M^2 D_phi)``
time and ``O(M^2)`` memory per memory set.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = [
    "SEPARATION_LOSSES",
    "separation_loss",
    "separation_loss_from_gram",
    "pairwise_sq_distances",
    "min_pairwise_distance",
]

SEPARATION_LOSSES = ("average", "orthogonal", "max")


def _check_features(features: Tensor) -> None:
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor of shape (..., M, D_phi), got {type(features).__name__}")
    if features.dim() < 2:
        raise ValueError(f"features must have shape (..., M, D_phi), got shape {tuple(features.shape)}")
    if features.shape[-2] < 2:
        raise ValueError(
            f"a separation loss needs a memory set of at least 2 patterns (pairs u != v), "
            f"got {features.shape[-2]} pattern(s) in features of shape {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got dtype {features.dtype}")


def _check_t(t: float) -> None:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"t (the RBF scale of Def. 2.2 / 3.1) must be a positive finite number, got {t!r}")


def _check_kind(kind: str) -> None:
    if kind not in SEPARATION_LOSSES:
        raise ValueError(f"kind must be one of {SEPARATION_LOSSES}, got {kind!r}")


def _check_gram(gram: Tensor) -> None:
    if not isinstance(gram, Tensor):
        raise TypeError(f"gram must be a torch.Tensor of shape (..., M, M), got {type(gram).__name__}")
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be a square Gram matrix of shape (..., M, M), got shape {tuple(gram.shape)}")
    if gram.shape[-1] < 2:
        raise ValueError(
            f"a separation loss needs a memory set of at least 2 patterns (pairs u != v), got a Gram matrix "
            f"of shape {tuple(gram.shape)}"
        )


def _normalize_gram(gram: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine Gram ``K(u, v) / sqrt(K(u, u) K(v, v))`` (the Gram of the unit-normalised features)."""
    inv = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(eps * eps).rsqrt()
    return gram * rearrange(inv, "... m -> ... m 1") * rearrange(inv, "... m -> ... 1 m")


def _sq_distances_from_gram(gram: Tensor) -> Tensor:
    sq_norms = torch.diagonal(gram, dim1=-2, dim2=-1)
    return (rearrange(sq_norms, "... m -> ... m 1") + rearrange(sq_norms, "... m -> ... 1 m") - 2.0 * gram).clamp_min(0.0)


def pairwise_sq_distances(features: Tensor, *, normalize: bool = True) -> Tensor:
    """Squared Euclidean distances ``||Phi(u) - Phi(v)||^2`` between all pairs, shape ``(..., M, M)``.

    Args:
        features: kernelized memories ``(..., M, D_phi)``.
        normalize: unit-normalise the features first (the form used by the separation losses).
    """
    _check_features(features)
    phi = F.normalize(features, dim=-1) if normalize else features
    return _sq_distances_from_gram(torch.matmul(phi, phi.transpose(-1, -2)))


def min_pairwise_distance(features: Tensor, *, normalize: bool = True) -> Tensor:
    """Smallest distance ``min_{u != v} ||Phi(u) - Phi(v)||`` of each memory set, shape ``(...)``.

    Twice the radius ``R_Phi`` of Def. 2.1; stage I of U-Hop is meant to raise it.
    """
    dist = pairwise_sq_distances(features, normalize=normalize)
    eye = torch.eye(dist.shape[-1], dtype=torch.bool, device=dist.device)
    return dist.masked_fill(eye, float("inf")).amin(dim=(-2, -1)).sqrt()


def separation_loss(
    features: Tensor,
    t: float = 2.0,
    kind: str = "average",
    *,
    normalize: bool = True,
) -> Tensor:
    """Separation loss of kernelized memories, one value per memory set (Def. 2.2 / 3.1 / G.2).

    Args:
        features: kernelized memories ``Phi(Xi)`` of shape ``(..., M, D_phi)`` with ``M >= 2``; every
            leading dimension indexes an independent memory set.
        t: RBF scale ``t > 0`` of eq. (2.5) (paper: ``t = 2``).
        kind: ``"average"`` (Def. 2.2), ``"orthogonal"`` (Def. 3.1) or ``"max"`` (closest pair only, G.2).
        normalize: unit-normalise each feature vector first (the paper's form; makes the loss invariant
            to the scale of ``Phi``). With ``False`` the raw features are used: squared distances for
            ``"average"``/``"max"``, raw inner products for ``"orthogonal"``.

    Returns:
        The loss of each memory set, shape ``features.shape[:-2]`` (a 0-dim tensor for one set).
        Memory: ``O(M^2)`` per set (one Gram matrix); time ``O(M^2 D_phi)``.
    """
    _check_features(features)
    _check_t(t)
    _check_kind(kind)
    # Gram of the raw features, normalised as an M x M matrix: the same cosine Gram as normalising the
    # M x D_phi features first, but the normalisation (and its backward) costs O(M^2) instead of O(M D_phi).
    return separation_loss_from_gram(torch.matmul(features, features.transpose(-1, -2)), t, kind, normalize=normalize)


def separation_loss_from_gram(gram: Tensor, t: float = 2.0, kind: str = "average", *, normalize: bool = True) -> Tensor:
    """:func:`separation_loss` from the kernel Gram matrix ``K = Phi Phi^T`` ``(..., M, M)`` instead of the features.

    Same arguments and result; ``normalize`` turns ``K`` into the cosine Gram ``K(u, v) / sqrt(K(u, u) K(v, v))``.
    Lets stage I run in the ``M x M`` memory space when ``D_phi`` is large (hopformer.retrieval.stage_one).
    """
    _check_gram(gram)
    _check_t(t)
    _check_kind(kind)
    m = gram.shape[-1]
    gram = _normalize_gram(gram) if normalize else gram
    if kind == "orthogonal":
        logits = 2.0 * t * (gram.square() - 1.0)
    else:
        logits = -t * _sq_distances_from_gram(gram)
    eye = torch.eye(m, dtype=torch.bool, device=gram.device)
    logits = logits.masked_fill(eye, float("-inf"))
    if kind == "max":
        return logits.amax(dim=(-2, -1))
    return torch.logsumexp(rearrange(logits, "... u v -> ... (u v)"), dim=-1) - math.log(m * (m - 1))
