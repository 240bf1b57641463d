"""Stage I of U-Hop (Algorithm 1, lines 1-4): SGD on the separation loss w.r.t. the feature map ``W``.

Plain SGD on ``L(Phi(Xi))`` with ``Phi(Xi) = Xi W^T`` moves ``W`` by ``-lr * dPhi^T Xi``, and
``dPhi = dL/dPhi`` has its rows in the span of the rows of ``Phi`` (the losses depend on ``Phi`` only
through its Gram matrix). So every iterate is ``W = W_0 + Q C Xi`` with ``Q`` (``D_phi x k``,
``k = min(M, D_phi)``) an orthonormal basis of the span of ``Phi_0 = Xi W_0^T``'s rows and ``C`` a
``k x M`` matrix, and the features are ``Phi = (P + G C^T) Q^T`` with ``P = Phi_0 Q`` and the Gram matrix
``G = Xi Xi^T``. Because ``Q`` has orthonormal columns the loss of ``Phi`` equals the loss of the small
``M x k`` matrix ``P + G C^T``. :func:`fit_feature_map` therefore runs *exactly* the SGD of the paper at
``O(M^2 k)`` per step instead of ``O(M d D_phi)`` (``M = 500``, ``d = D_phi = 3072``: about 5x fewer
operations than the dense step for ``k = M``; see benchmarks/uhop_stage1.py), then forms ``W`` once.
:func:`fit_feature_map_dense` is the plain autograd version, kept as the reference the tests compare with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional.separation_loss import separation_loss

__all__ = ["fit_feature_map", "fit_feature_map_dense", "row_normalize"]


def row_normalize(weight: Tensor, eps: float = 1e-12) -> Tensor:
    """Rescale every row of ``weight`` (``(..., D_phi, d)``) to unit norm (Algorithm 1, line 4)."""
    return weight / weight.norm(dim=-1, keepdim=True).clamp_min(eps)


def fit_feature_map(
    memories: Tensor,
    weight: Tensor,
    *,
    steps: int,
    lr: float,
    t: float = 2.0,
    kind: str = "average",
    momentum: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Run ``steps`` SGD steps on ``separation_loss(memories W^T)`` w.r.t. ``W``, exactly, in the memory span.

    Args:
        memories: memory sets ``Xi`` ``(..., M, d)`` (each leading index an independent set).
        weight: the initial ``W_0`` ``(D_phi, d)`` or ``(..., D_phi, d)``; not modified.
        steps: number of SGD steps ``N`` (>= 0).
        lr: SGD learning rate (> 0).
        t, kind: separation loss options (:func:`hopformer.functional.separation_loss`).
        momentum: heavy-ball momentum of ``torch.optim.SGD`` (0 = plain SGD, the paper's choice).

    Returns:
        ``(W, losses)``: the final ``W`` ``(..., D_phi, d)`` (not row-normalised) and the loss of each
        memory set before each step, ``(steps, ...)``.
    """
    xi = memories
    phi0 = torch.matmul(xi, weight.transpose(-1, -2))  # (..., M, D)
    basis, r = torch.linalg.qr(phi0.transpose(-1, -2))  # Q (..., D, k), R (..., k, M)
    small = r.transpose(-1, -2)  # P = Phi_0 Q, (..., M, k)
    gram = torch.matmul(xi, xi.transpose(-1, -2))  # G (..., M, M)
    coef = torch.zeros(small.shape[:-2] + (small.shape[-1], xi.shape[-2]), dtype=xi.dtype, device=xi.device)
    velocity = torch.zeros_like(coef)
    losses = []
    for _ in range(steps):
        features = small.detach().requires_grad_(True)
        loss = separation_loss(features, t, kind)
        (grad,) = torch.autograd.grad(loss.sum(), features)
        losses.append(loss.detach())
        step = grad.transpose(-1, -2)  # dC = dPhi~^T, (..., k, M)
        velocity = momentum * velocity + step if momentum else step
        coef = coef - lr * velocity
        small = small - lr * torch.matmul(gram, velocity.transpose(-1, -2))  # Phi~ = P + G C^T
    weight = weight + torch.matmul(torch.matmul(basis, coef), xi)
    stacked = torch.stack(losses) if losses else torch.empty((0,) + xi.shape[:-2], dtype=xi.dtype)
    return weight, stacked


def fit_feature_map_dense(
    memories: Tensor,
    weight: Tensor,
    *,
    steps: int,
    lr: float,
    t: float = 2.0,
    kind: str = "average",
    momentum: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Reference: the same SGD as :func:`fit_feature_map` with ``torch.optim.SGD`` on the full ``W``."""
    w = weight.detach().clone().requires_grad_(True)
    optimizer = torch.optim.SGD([w], lr=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = separation_loss(torch.matmul(memories, w.transpose(-1, -2)), t, kind)
        loss.sum().backward()
        optimizer.step()
        losses.append(loss.detach())
    stacked = torch.stack(losses) if losses else torch.empty((0,) + memories.shape[:-2], dtype=memories.dtype)
    return w.detach(), stacked
