"""The U-Hop feature map (Wu, Hu et al. 2024, "Uniform Memory Retrieval with Larger Capacity for Modern
Hopfield Models", arXiv 2404.03827) as a component of any Hopfield interface.

A linear feature map ``Phi(u) = W u`` (eq. 2.1, ``W`` of shape ``D_phi x d``, ``D_phi >= d``, full rank,
Assumption 2.1) defines the kernel ``K(u, v) = <Phi(u), Phi(v)>``. An interface holding a
:class:`UHopFeatureMap` as ``feature_map`` (``Hopfield(..., kernel_dim=...)``, ``HopfieldAttention(...,
kernel_dim=...)``, ``MultiheadHopfield(..., kernelized=True)``) associates queries ``W_Q Phi(x)`` with keys
``W_K Phi(Xi)`` and reads out values ``W_V Xi`` (eq. 3.1 / 4.1); with ``project=False`` it is the retrieval
dynamics ``T_K(x) = Xi Sep(beta K(Xi, x))`` of eq. (2.4).

The U-Hop protocol (docs/ARCHITECTURE.md): stage I of the two-stage optimisation (Algorithm 2) minimises
``separation_loss`` over ``feature_parameters`` only; :func:`named_uhop_modules` finds the layers that take part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..checks import positive_float, positive_int
from ..functional.separation_loss import SEPARATION_LOSSES, separation_loss

__all__ = [
    "FEATURE_MAP_INITS",
    "FeatureMap",
    "UHopFeatureMap",
    "association_entropy",
    "named_uhop_modules",
    "uhop_modules",
]

FEATURE_MAP_INITS = ("orthogonal", "identity", "gaussian")


class FeatureMap(nn.Module):
    """The U-Hop feature map ``Phi(u) = W u`` (eq. 2.1), ``W in R^{kernel_dim x dim}``.

    Args:
        dim: size ``d`` of the patterns it maps.
        kernel_dim: feature size ``D_phi >= dim`` (Assumption 2.1); defaults to ``dim``.
        init: ``"orthogonal"`` (default: orthonormal columns, rescaled so each row has unit norm, as
            after Algorithm 1's row normalisation), ``"identity"`` (``W = I``, needs ``kernel_dim == dim``;
            the kernel starts as the plain inner product) or ``"gaussian"`` (i.i.d. standard normal, the
            paper's Remark 2.1; its large scale makes stage-I SGD steps tiny, see docs/uhop_retrieval.md).
            All three are full rank (the Gaussian one almost surely).

    The separation losses only see unit-normalised features, so the overall scale of ``W`` matters to
    stage I only through the step size: the gradient scales like ``1 / ||W||``. The unit-row
    initialisations keep plain SGD with ``lr ~ 0.01-0.1`` effective.
    """

    def __init__(self, dim: int, kernel_dim: int | None = None, *, init: str = "orthogonal") -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.kernel_dim = positive_int("kernel_dim", kernel_dim if kernel_dim is not None else dim)
        if self.kernel_dim < self.dim:
            raise ValueError(
                f"kernel_dim must be >= dim so that W is full rank (U-Hop Assumption 2.1), "
                f"got kernel_dim={self.kernel_dim} < dim={self.dim}"
            )
        if init not in FEATURE_MAP_INITS:
            raise ValueError(f"init must be one of {FEATURE_MAP_INITS}, got {init!r}")
        if init == "identity" and self.kernel_dim != self.dim:
            raise ValueError(f"init='identity' needs kernel_dim == dim, got kernel_dim={self.kernel_dim}, dim={self.dim}")
        self.init = init
        self.weight = nn.Parameter(torch.empty(self.kernel_dim, self.dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw ``W`` with the initialisation chosen at construction."""
        if self.init == "identity":
            self.weight.copy_(torch.eye(self.dim))
        elif self.init == "gaussian":
            nn.init.normal_(self.weight)
        else:
            nn.init.orthogonal_(self.weight)
            self.row_normalize_()

    @torch.no_grad()
    def row_normalize_(self, eps: float = 1e-12) -> "FeatureMap":
        """Rescale every row of ``W`` to unit norm in place (Algorithm 1, line 4). Returns ``self``."""
        self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(eps))
        return self

    @torch.no_grad()
    def condition_number(self) -> float:
        """``sigma_max(W) / sigma_min(W)``; ``inf`` when ``W`` lost rank (breaks Assumption 2.1)."""
        w = self.weight.detach()
        if not bool(torch.isfinite(w).all()):
            return float("nan")
        try:
            s = torch.linalg.svdvals(w.float())
        except RuntimeError:  # float32 LAPACK failed to converge: retry in float64
            s = torch.linalg.svdvals(w.double())
        return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")

    @torch.no_grad()
    def clamp_condition_(self, max_condition: float) -> bool:
        """Keep ``W`` full rank (Assumption 2.1): raise every singular value to at least ``sigma_max / max_condition``.

        ``W = U diag(s) V^T`` becomes ``U diag(max(s, s_max / max_condition)) V^T``; the singular vectors
        (the directions the separation loss chose) are kept. Returns whether ``W`` was changed.
        """
        if not max_condition >= 1:
            raise ValueError(f"max_condition must be >= 1, got {max_condition!r}")
        w = self.weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError("FeatureMap weight W has non-finite entries: stage I diverged "
                                     "(lower the U-Hop callback's lr or raise its max_condition guard)")
        try:
            u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        except RuntimeError:  # LAPACK's float32 divide-and-conquer can fail to converge on a finite matrix
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        floor = s[0] / max_condition
        if bool(s[-1] >= floor):
            return False
        w = (u * s.clamp_min(floor)) @ vh
        self.weight.copy_(w.to(self.weight.dtype))
        return True

    def forward(self, u: Tensor) -> Tensor:
        """``Phi(u) = W u`` for patterns ``u`` of shape ``(..., dim)`` -> ``(..., kernel_dim)``."""
        if u.shape[-1] != self.dim:
            raise ValueError(f"FeatureMap expects patterns with last dimension {self.dim}, got shape {tuple(u.shape)}")
        return F.linear(u, self.weight)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_dim={self.kernel_dim}, init={self.init!r}"


def _check_loss_options(t: float, loss: str) -> None:
    positive_float("t (separation-loss RBF scale)", t)
    if loss not in SEPARATION_LOSSES:
        raise ValueError(f"loss must be one of {SEPARATION_LOSSES}, got {loss!r}")


def association_entropy(weights: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of association rows ``(..., n, m)``: 0 = one memory retrieved, ``log m`` = uniform."""
    return -torch.special.xlogy(weights, weights).sum(-1).mean()


class UHopFeatureMap(FeatureMap):
    """The U-Hop feature map ``Phi`` of one layer, with what stage I needs (Algorithm 2).

    ``forward`` maps the stored (key) patterns, :meth:`queries` the state (query) patterns (the same ``Phi``
    unless the queries live in another space, then ``query_map``). The layer holding it calls :meth:`observe`
    with the memories that entered it and :meth:`record` with its association weights.

    Args:
        dim: size of the stored patterns.
        kernel_dim: feature size ``D_phi >= dim`` (Assumption 2.1); defaults to ``dim``.
        query_dim: size of the state patterns when it differs from ``dim``: they get their own map
            ``query_map`` (a kernel needs one ``Phi`` per input space); the separation loss uses ``Phi`` only.
        init: initialisation of ``W`` (see :class:`FeatureMap`).
        t: separation-loss scale (eq. 2.5; paper ``t = 2``).
        loss: separation loss of stage I: ``"average"`` (Def. 2.2), ``"orthogonal"`` (Def. 3.1) or ``"max"`` (G.2).

    Attributes:
        cache_memories: when ``True``, :meth:`observe` keeps the memories in ``cached_memories`` ``(B, M, dim)``.
        cache_with_grad: keep the cached memories attached to the graph (stage I then also moves the
            parameters that produced them, e.g. the patch embedding); default: detached.
        track_entropy: when ``True`` the layer records the mean entropy of its association in ``last_entropy``
            (a collapse onto one memory shows as entropy near 0).
    """

    def __init__(self, dim: int, kernel_dim: int | None = None, *, query_dim: int | None = None,
                 init: str = "orthogonal", t: float = 2.0, loss: str = "average") -> None:
        super().__init__(dim, kernel_dim, init=init)
        self.query_map = None if query_dim in (None, dim) else FeatureMap(query_dim, self.kernel_dim, init=init)
        _check_loss_options(t, loss)
        self.separation_t, self.separation_kind = float(t), loss
        self.cache_memories, self.cache_with_grad, self.cached_memories = False, False, None
        self.track_entropy, self.last_entropy = False, None

    def queries(self, u: Tensor) -> Tensor:
        """``Phi`` of the state (query) patterns: ``query_map`` when they have their own space."""
        return self(u) if self.query_map is None else self.query_map(u)

    def observe(self, memories: Tensor) -> None:
        """Keep the stored patterns ``(B, M, dim)`` of this forward when ``cache_memories`` is set."""
        if self.cache_memories:
            self.cached_memories = memories if self.cache_with_grad else memories.detach()

    def record(self, weights: Tensor) -> None:
        """Record the mean entropy of the association ``weights`` in ``last_entropy``."""
        self.last_entropy = association_entropy(weights.detach().float())

    def feature_parameters(self) -> list[nn.Parameter]:
        """The parameters stage I updates: ``W`` (and the query map's)."""
        return [m.weight for m in self.modules() if isinstance(m, FeatureMap)]

    def separation_loss(self, memories: Tensor | None = None, owner: str | None = None) -> Tensor:
        """The separation loss of ``Phi`` over the memories, averaged over independent memory sets.

        Args:
            memories: ``(B, M, dim)`` or ``(M, dim)`` stored patterns; ``None`` uses ``cached_memories``.
            owner: name of the layer, for the error message.

        Returns:
            A scalar: the mean over the ``B`` memory sets of ``separation_loss(Phi(memories), t, kind)``.

        With one memory per sample (``(B, 1, dim)``, e.g. the authors' ViH with patch 32 on 32x32 images)
        there is no pair to separate within a sample, so the ``B`` memories of the batch form one set.
        """
        if memories is None:
            memories = self.cached_memories
            if memories is None:
                raise RuntimeError(
                    f"{owner or type(self).__name__}.separation_loss() has no memories: pass them, or set "
                    "cache_memories = True and run a forward pass first"
                )
        if memories.dim() not in (2, 3):
            raise ValueError(f"memories must have shape (B, M, dim) or (M, dim), got {tuple(memories.shape)}")
        if memories.dim() == 3 and memories.shape[1] == 1:
            memories = rearrange(memories, "b 1 d -> 1 b d")
        return separation_loss(self(memories), self.separation_t, self.separation_kind).mean()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, t={self.separation_t}, loss={self.separation_kind!r}"


def _follows_uhop_protocol(module: nn.Module) -> bool:
    if isinstance(module, FeatureMap):  # reached through the layer that holds it
        return False
    if hasattr(module, "retrieval") and hasattr(module, "feature_map"):  # a Hopfield interface
        return isinstance(module.feature_map, UHopFeatureMap)
    return (callable(getattr(module, "separation_loss", None)) and callable(getattr(module, "feature_parameters", None))
            and hasattr(module, "cache_memories"))


def named_uhop_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every submodule of ``model`` (itself included) that follows the U-Hop protocol.

    The protocol (docs/ARCHITECTURE.md): ``feature_parameters()``, ``separation_loss(memories=None)`` and
    a boolean ``cache_memories`` attribute. A Hopfield interface takes part when its ``feature_map`` is a
    :class:`UHopFeatureMap`; any other module honouring the protocol (duck-typed) takes part too.
    """
    return [(name, m) for name, m in model.named_modules() if _follows_uhop_protocol(m)]


def uhop_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of :func:`named_uhop_modules`, without their names."""
    return [m for _, m in named_uhop_modules(model)]
