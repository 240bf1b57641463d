"""Stage I of U-Hop (Algorithm 1, lines 1-4): SGD on the separation loss w.r.t. the feature map ``W``.

Plain SGD on ``L(Phi)`` with ``Phi = Xi W^T`` moves ``W`` by ``-lr dPhi^T Xi``. The separation losses
depend on ``Phi`` only through its Gram matrix ``K = Phi Phi^T``, so ``dPhi = S Phi`` with
``S = dL/dK + (dL/dK)^T`` (``M x M``). By induction every iterate is

    W = W_0 + Phi_0^T A Xi,     Phi = B Phi_0,     K = B H B^T,

with ``Phi_0 = Xi W_0^T``, ``H = Phi_0 Phi_0^T``, ``G = Xi Xi^T``, ``B = I + G A^T`` and an ``M x M``
matrix ``A`` updated by ``A <- A - lr B^T S^T`` (heavy-ball momentum likewise). :func:`fit_feature_map`
therefore runs *exactly* the SGD of the paper with ``O(M^3)`` work per step instead of the
``O(M d D_phi)`` of a dense step, and forms ``W`` once at the end (``M = 500``, ``d = D_phi = 3072``,
100 steps: 1.8 s instead of about 35 s on one CPU core, benchmarks/uhop_stage1.py).
:func:`fit_feature_map_dense` is the plain ``torch.optim.SGD`` version, the reference the tests compare with.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from einops import rearrange
from torch import Tensor

from ..functional.separation_loss import separation_loss

__all__ = ["fit_feature_map", "fit_feature_map_dense", "gram_loss_and_grad", "row_normalize"]


def row_normalize(weight: Tensor, eps: float = 1e-12) -> Tensor:
    """Rescale every row of ``weight`` (``(..., D_phi, d)``) to unit norm (Algorithm 1, line 4)."""
    return weight / weight.norm(dim=-1, keepdim=True).clamp_min(eps)


def gram_loss_and_grad(gram: Tensor, t: float, kind: str) -> tuple[Tensor, Tensor]:
    """``separation_loss_from_gram(gram, t, kind)`` (normalised form) and its gradient w.r.t. ``gram``, in closed form.

    About a third of the elementwise work of autograd through the loss (stage I's bottleneck for ``M`` in the
    hundreds). With ``Kh = D K D``, ``D = diag(K)^{-1/2}``, and ``P`` the softmax (``"max"``: one-hot) of the
    off-diagonal logits: ``dL/dKh = 2t P`` (``"orthogonal"``: ``4t Kh P``), and
    ``dL/dK = D (dL/dKh) D - diag(sum_v (G_uv + G_vu) Kh_uv / (2 K_uu))`` with ``G = dL/dKh``.
    """
    m = gram.shape[-1]
    diag = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(1e-30)
    inv = diag.rsqrt()
    inv_u, inv_v = rearrange(inv, "... m -> ... m 1"), rearrange(inv, "... m -> ... 1 m")
    kh = gram * inv_u * inv_v
    logits = 2.0 * t * ((kh * kh if kind == "orthogonal" else kh) - 1.0)
    eye = torch.eye(m, dtype=torch.bool, device=gram.device)
    flat = rearrange(logits.masked_fill(eye, float("-inf")), "... u v -> ... (u v)")
    if kind == "max":
        loss = flat.amax(dim=-1)
        weights = torch.zeros_like(flat).scatter_(-1, flat.argmax(dim=-1, keepdim=True), 1.0)
    else:
        lse = torch.logsumexp(flat, dim=-1)
        loss = lse - math.log(m * (m - 1))
        weights = torch.exp(flat - rearrange(lse, "... -> ... 1"))
    weights = rearrange(weights, "... (u v) -> ... u v", u=m)
    g = (4.0 * t) * kh * weights if kind == "orthogonal" else (2.0 * t) * weights
    gkh = g * kh
    corr = -0.5 * (gkh.sum(dim=-1) + gkh.sum(dim=-2)) / diag
    return loss, g * inv_u * inv_v + torch.diag_embed(corr)


def fit_feature_map(
    memories: Tensor,
    weight: Tensor | None = None,
    *,
    steps: int,
    lr: float,
    t: float = 2.0,
    kind: str = "average",
    momentum: float = 0.0,
    snapshots: Sequence[int] = (),
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[int, Tensor]]:
    """Run ``steps`` SGD steps on ``separation_loss(Xi W^T)`` w.r.t. ``W``, exactly, in the ``M x M`` memory space.

    Args:
        memories: memory sets ``Xi`` ``(..., M, d)`` (each leading index an independent set).
        weight: the initial ``W_0`` ``(D_phi, d)`` or ``(..., D_phi, d)``, not modified; ``None`` means the
            identity (``D_phi = d``), which skips the ``O(M d D_phi)`` products with ``W_0``.
        steps: number of SGD steps ``N`` (>= 0).
        lr: SGD learning rate (> 0).
        t, kind: separation loss options (:func:`hopformer.functional.separation_loss`).
        momentum: heavy-ball momentum as in ``torch.optim.SGD`` (0 = plain SGD, the paper's choice).
        snapshots: step counts (each in ``[0, steps]``) after which ``W`` is also returned, to sweep ``N``
            in one run.

    Returns:
        ``(W, losses)``: the final ``W`` ``(..., D_phi, d)`` (not row-normalised) and the loss of each
        memory set before each step, ``(steps, ...)``; with ``snapshots``, a third item
        ``{step: W after that many steps}``.
    """
    wanted = sorted(set(snapshots))
    if wanted and (wanted[0] < 0 or wanted[-1] > steps):
        raise ValueError(f"snapshots must lie in [0, steps={steps}], got {list(snapshots)}")
    xi = memories
    gram = torch.matmul(xi, xi.transpose(-1, -2))  # G
    phi0 = xi if weight is None else torch.matmul(xi, weight.transpose(-1, -2))
    h = gram if weight is None else torch.matmul(phi0, phi0.transpose(-1, -2))  # H = Phi_0 Phi_0^T
    eye = torch.eye(xi.shape[-2], dtype=xi.dtype, device=xi.device)
    coef = torch.zeros_like(gram)  # A
    velocity = torch.zeros_like(gram)
    base = torch.eye(xi.shape[-1], dtype=xi.dtype, device=xi.device) if weight is None else weight

    def current_weight() -> Tensor:
        return base + torch.matmul(torch.matmul(phi0.transpose(-1, -2), coef), xi)

    saved = {0: current_weight()} if 0 in wanted else {}
    losses = []
    for i in range(steps):
        b = eye + torch.matmul(gram, coef.transpose(-1, -2))  # B = I + G A^T
        k = torch.matmul(torch.matmul(b, h), b.transpose(-1, -2))
        loss, dk = gram_loss_and_grad(k, t, kind)
        losses.append(loss)
        s = dk + dk.transpose(-1, -2)  # dPhi = S Phi
        step = torch.matmul(b.transpose(-1, -2), s.transpose(-1, -2))  # B^T S^T
        velocity = momentum * velocity + step if momentum else step
        coef = coef - lr * velocity
        if i + 1 in wanted:
            saved[i + 1] = current_weight()
    stacked = torch.stack(losses) if losses else torch.empty((0,) + xi.shape[:-2], dtype=xi.dtype)
    final = saved[steps] if steps in saved else current_weight()
    return (final, stacked, saved) if wanted else (final, stacked)


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
