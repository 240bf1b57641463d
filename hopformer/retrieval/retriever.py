"""Associative-memory retrievers with one interface: ``fit(memories)`` then ``retrieve(queries, steps)``.

- :class:`UHopRetriever`: U-Hop, Algorithm 1 of Wu, Hu et al. 2024 (stage I: SGD on the separation loss
  w.r.t. ``W``, then row normalisation; stage II: the kernelized update ``T_K`` of eq. 2.4).
- :class:`HopfieldRetriever`: modern Hopfield (softmax, Ramsauer et al. 2020), sparse modern Hopfield
  (sparsemax, Hu et al. 2023), generalized sparse (alpha-entmax, Wu et al. 2024), and the L2 / Manhattan
  similarities of Millidge et al. 2022 (``x <- Xi^T Sep(beta * sim(Xi, x))``).
- :class:`PolynomialRetriever`: dense associative memory with the rectified polynomial energy of Krotov &
  Hopfield 2016 (``F(z) = max(z, 0)^n``, degree 10), normalised as in Millidge et al. 2022.

All work on one memory set ``(M, d)`` or a batch of independent sets ``(B, M, d)``; queries are ``(n, d)``
(or ``(B, n, d)``).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor

from ..checks import positive_float, positive_int
from ..functional import check_separation, hopfield_retrieve, separate
from ..functional.separation_loss import SEPARATION_LOSSES, separation_loss
from .stage_one import fit_feature_map, row_normalize

__all__ = ["Retriever", "HopfieldRetriever", "PolynomialRetriever", "UHopRetriever", "SIMILARITIES", "FEATURE_INITS"]

SIMILARITIES = ("dot", "l2", "manhattan")
FEATURE_INITS = ("identity", "orthogonal", "gaussian")



class Retriever:
    """Base class: validates memories and queries; subclasses implement ``_fit`` and ``_step``.

    Args:
        dim: pattern size ``d``.
        beta: inverse temperature of the separation (> 0; the paper's retrieval experiments use 1).
    """

    name = "retriever"

    def __init__(self, dim: int, *, beta: float = 1.0) -> None:
        positive_int("dim", dim)
        positive_float("beta", beta)
        self.dim, self.beta = dim, float(beta)
        self.memories_: Tensor | None = None

    # -- checks ----------------------------------------------------------------------------------
    def _check_memories(self, memories: Tensor) -> Tensor:
        if not isinstance(memories, Tensor):
            raise TypeError(f"memories must be a torch.Tensor (M, {self.dim}) or (B, M, {self.dim}), "
                            f"got {type(memories).__name__}")
        if memories.dim() not in (2, 3) or memories.shape[-1] != self.dim:
            raise ValueError(f"memories must have shape (M, {self.dim}) or (B, M, {self.dim}), got {tuple(memories.shape)}")
        if memories.shape[-2] < 1:
            raise ValueError(f"memories must hold at least one pattern, got shape {tuple(memories.shape)}")
        if not memories.is_floating_point():
            memories = memories.float()
        if not bool(torch.isfinite(memories).all()):
            raise ValueError("memories contain NaN or infinite values")
        return memories

    def _check_queries(self, queries: Tensor, steps: int) -> Tensor:
        if self.memories_ is None:
            raise RuntimeError(f"{type(self).__name__}.retrieve() called before fit(memories)")
        positive_int("steps", steps)
        if not isinstance(queries, Tensor):
            raise TypeError(f"queries must be a torch.Tensor, got {type(queries).__name__}")
        batched = self.memories_.dim() == 3
        want = f"(B, n, {self.dim}) with B = {self.memories_.shape[0]}" if batched else f"(n, {self.dim})"
        ok = queries.dim() == self.memories_.dim() and queries.shape[-1] == self.dim
        if ok and batched:
            ok = queries.shape[0] == self.memories_.shape[0]
        if not ok:
            raise ValueError(f"queries must have shape {want}, got {tuple(queries.shape)}")
        queries = queries.to(self.memories_.dtype)
        if not bool(torch.isfinite(queries).all()):
            raise ValueError("queries contain NaN or infinite values")
        return queries

    # -- interface -------------------------------------------------------------------------------
    def fit(self, memories: Tensor) -> "Retriever":
        """Store the memory set(s) ``(M, d)`` or ``(B, M, d)``. Returns ``self``."""
        self.memories_ = self._check_memories(memories)
        self._fit(self.memories_)
        return self

    def _fit(self, memories: Tensor) -> None:
        return None

    @torch.no_grad()
    def retrieve(self, queries: Tensor, steps: int = 1) -> Tensor:
        """Run ``steps`` retrieval updates from ``queries`` ``(n, d)`` / ``(B, n, d)``; returns the same shape."""
        x = self._check_queries(queries, steps)
        for _ in range(steps):
            x = self._step(x)
        return x

    def _step(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, beta={self.beta})"


class HopfieldRetriever(Retriever):
    """Modern Hopfield retrieval ``x <- Xi^T Sep(beta * sim(Xi, x))`` with any separation and similarity.

    Args:
        dim: pattern size.
        separation: ``"softmax"`` (MHM, Ramsauer et al. 2020), ``"sparsemax"`` (Hu et al. 2023),
            ``"entmax15"`` or a float alpha in [1, 2] (generalized sparse, Wu et al. 2024).
        beta: inverse temperature (paper: 1).
        similarity: ``"dot"`` (``<xi, x>``), ``"l2"`` (``-||xi - x||_2``) or ``"manhattan"``
            (``-||xi - x||_1``); the last two are the similarities of Millidge et al. 2022.
    """

    def __init__(self, dim: int, *, separation="softmax", beta: float = 1.0, similarity: str = "dot") -> None:
        super().__init__(dim, beta=beta)
        self.separation = check_separation(separation)
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.similarity = similarity

    def _step(self, x: Tensor) -> Tensor:
        xi = self.memories_
        if self.similarity == "dot":
            return hopfield_retrieve(x, xi, beta=self.beta, separation=self.separation)
        p = 2.0 if self.similarity == "l2" else 1.0
        scores = -torch.cdist(x, xi, p=p)
        return torch.matmul(separate(self.beta * scores, self.separation, dim=-1), xi)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dim={self.dim}, separation={self.separation!r}, beta={self.beta}, "
                f"similarity={self.similarity!r})")


class PolynomialRetriever(Retriever):
    """Dense associative memory, polynomial energy (Krotov & Hopfield 2016): ``x <- Xi^T w``, ``w ∝ max(<xi, x>, 0)^n``.

    The weights are normalised to sum to one (Millidge et al. 2022's form; computed in the log domain,
    so degree 10 neither overflows nor underflows). A query with no positive overlap retrieves zeros.

    Args:
        dim: pattern size.
        degree: the polynomial degree ``n`` (paper: 10).
    """

    def __init__(self, dim: int, *, degree: int = 10) -> None:
        super().__init__(dim, beta=1.0)
        positive_int("degree", degree)
        self.degree = degree

    def _step(self, x: Tensor) -> Tensor:
        overlap = torch.matmul(x, self.memories_.transpose(-1, -2))
        log_w = self.degree * torch.log(overlap.clamp_min(0.0))  # -inf where the overlap is <= 0
        weights = separate(log_w, "softmax", dim=-1)
        return torch.matmul(weights, self.memories_)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, degree={self.degree})"


class UHopRetriever(Retriever):
    """U-Hop two-stage memory retrieval (Algorithm 1).

    ``fit``: stage I, ``kernel_steps`` steps of SGD on the separation loss ``L_Phi(Xi)`` w.r.t. the feature
    map ``W`` (run exactly but in the ``M x M`` memory space, see :mod:`hopformer.retrieval.stage_one`),
    then the rows of ``W`` are normalised. ``retrieve``: stage II, ``x <- Xi Sep(beta K(Xi, x))`` with
    ``K(u, v) = <W u, W v>`` (Theorem 2.1, eq. 2.4).

    Args:
        dim: pattern size ``d``.
        kernel_dim: feature size ``D_phi >= d``; defaults to ``d``.
        separation: separation of stage II (``"softmax"``, ``"sparsemax"``, ``"entmax15"``, float alpha).
        beta: inverse temperature of stage II (paper: 1).
        t: separation-loss scale (paper: 2).
        kernel_steps: stage-I SGD steps ``N`` (>= 0; 0 gives the plain model with kernel ``W^T W``).
        lr: stage-I learning rate ``gamma`` (> 0).
        loss: ``"average"`` (Def. 2.2), ``"orthogonal"`` (Def. 3.1) or ``"max"`` (G.2).
        momentum: stage-I SGD momentum (paper: 0).
        init: initial ``W``: ``"identity"`` (default; needs ``kernel_dim == dim``, so that with no stage-I
            step U-Hop *is* the modern Hopfield model), ``"orthogonal"`` (unit rows) or ``"gaussian"``
            (standard normal, the paper's Remark 2.1, scaled by ``init_scale``).
        init_scale: multiplies the initial ``W``. Stage I is scale-free except for the step size: the loss
            sees unit-normalised features, so its gradient scales like ``1 / ||W||`` and
            ``(init_scale, lr)`` behaves like ``(1, lr / init_scale^2)``. The authors' setting, a
            standard-normal ``W`` and ``lr = 1``, is ``(1, 1 / d)`` in these units: it barely moves ``W``
            in 100 steps for CIFAR-sized ``d`` (docs/uhop_retrieval.md).
        seed: seed of the random initialisations.

    The defaults (identity ``W``, ``lr = 0.01``, 100 steps, ``t = 2``) lower the separation loss of
    CIFAR-10 or digits memory sets far below its start (tests/test_retrieval.py). After ``fit``,
    ``weight_`` is the row-normalised ``W`` ``(..., D_phi, d)`` and ``losses_`` the loss before each step.
    """

    def __init__(
        self,
        dim: int,
        *,
        kernel_dim: int | None = None,
        separation="softmax",
        beta: float = 1.0,
        t: float = 2.0,
        kernel_steps: int = 100,
        lr: float = 0.01,
        loss: str = "average",
        momentum: float = 0.0,
        init: str = "identity",
        init_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(dim, beta=beta)
        self.kernel_dim = dim if kernel_dim is None else kernel_dim
        positive_int("kernel_dim", self.kernel_dim)
        if self.kernel_dim < dim:
            raise ValueError(f"kernel_dim must be >= dim (U-Hop Assumption 2.1: W full rank), got {self.kernel_dim} < {dim}")
        self.separation = check_separation(separation)
        positive_float("t", t)
        positive_int("kernel_steps", kernel_steps, minimum=0)
        positive_float("lr", lr)
        positive_float("init_scale", init_scale)
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if loss not in SEPARATION_LOSSES:
            raise ValueError(f"loss must be one of {SEPARATION_LOSSES}, got {loss!r}")
        if init not in FEATURE_INITS:
            raise ValueError(f"init must be one of {FEATURE_INITS}, got {init!r}")
        if init == "identity" and self.kernel_dim != dim:
            raise ValueError(f"init='identity' needs kernel_dim == dim, got kernel_dim={self.kernel_dim}, dim={dim}")
        self.t, self.kernel_steps, self.lr, self.loss, self.momentum = float(t), kernel_steps, float(lr), loss, momentum
        self.init, self.init_scale, self.seed = init, float(init_scale), seed
        self.weight_: Tensor | None = None
        self.losses_: Tensor | None = None

    def initial_weight(self, dtype=torch.float32, device=None) -> Tensor | None:
        """The initial ``W`` ``(D_phi, d)``; ``None`` stands for the identity (``init_scale`` 1)."""
        if self.init == "identity" and self.init_scale == 1.0:
            return None
        gen = torch.Generator().manual_seed(self.seed)
        if self.init == "identity":
            w = torch.eye(self.dim, dtype=torch.float64)
        elif self.init == "gaussian":
            w = torch.randn(self.kernel_dim, self.dim, generator=gen, dtype=torch.float64)
        else:
            a = torch.randn(self.kernel_dim, self.dim, generator=gen, dtype=torch.float64)
            q, r = torch.linalg.qr(a)
            w = row_normalize(q * torch.sign(torch.diagonal(r)))
        return (w * self.init_scale).to(dtype=dtype, device=device)

    @staticmethod
    def _check_pairs(memories: Tensor, steps: int) -> None:
        if memories.shape[-2] < 2 and steps > 0:
            raise ValueError(
                f"U-Hop stage I separates pairs of memories: it needs at least 2 patterns per memory set, "
                f"got shape {tuple(memories.shape)} (use kernel_steps=0 for a single pattern)"
            )

    def _fit(self, memories: Tensor) -> None:
        self._check_pairs(memories, self.kernel_steps)
        w0 = self.initial_weight(memories.dtype, memories.device)
        with torch.enable_grad():
            weight, losses = fit_feature_map(memories, w0, steps=self.kernel_steps, lr=self.lr, t=self.t,
                                             kind=self.loss, momentum=self.momentum)
        self._set_weight(weight, losses)

    def fit_path(self, memories: Tensor, kernel_steps: Sequence[int]) -> dict[int, "UHopRetriever"]:
        """Fit once with ``max(kernel_steps)`` stage-I steps; a fitted copy for every step count in ``kernel_steps``.

        The SGD trajectory is the same for every count, so this equals fitting each separately, at the cost
        of the longest run.
        """
        counts = sorted(set(kernel_steps))
        if not counts:
            raise ValueError("kernel_steps must name at least one step count")
        for n in counts:
            positive_int("kernel_steps", n, minimum=0)
        memories = self._check_memories(memories)
        self._check_pairs(memories, counts[-1])
        with torch.enable_grad():
            _, losses, saved = fit_feature_map(
                memories, self.initial_weight(memories.dtype, memories.device), steps=counts[-1], lr=self.lr,
                t=self.t, kind=self.loss, momentum=self.momentum, snapshots=counts,
            )
        path = {}
        for n in counts:
            fitted = copy.copy(self)
            fitted.kernel_steps, fitted.memories_ = n, memories
            fitted._set_weight(saved[n], losses[:n])
            path[n] = fitted
        return path

    def _set_weight(self, weight: Tensor, losses: Tensor) -> None:
        if not bool(torch.isfinite(weight).all()):
            raise FloatingPointError(f"U-Hop stage I diverged (non-finite W) with lr={self.lr}; lower lr")
        self.weight_, self.losses_ = row_normalize(weight), losses

    def separation_loss(self, memories: Tensor | None = None) -> Tensor:
        """The separation loss of the fitted (row-normalised) feature map over ``memories`` (default: the fitted ones)."""
        memories = self.memories_ if memories is None else self._check_memories(memories)
        return separation_loss(self.features(memories), self.t, self.loss)

    def features(self, patterns: Tensor) -> Tensor:
        """``Phi(u) = W u`` with the fitted, row-normalised ``W``: ``(..., n, d) -> (..., n, D_phi)``."""
        if self.weight_ is None:
            raise RuntimeError("UHopRetriever.features() called before fit(memories)")
        return torch.matmul(patterns, self.weight_.transpose(-1, -2))

    @torch.no_grad()
    def retrieve(self, queries: Tensor, steps: int = 1) -> Tensor:
        """Stage II: ``steps`` kernelized updates ``x <- Xi Sep(beta K(Xi, x))`` from ``queries``.

        Iterating in feature space and reading out ``Xi`` once is exact here because ``Phi`` is linear:
        ``Phi(T_K(x)) = Phi(Xi) Sep(...)``.
        """
        x = self._check_queries(queries, steps)
        keys = self.features(self.memories_)
        return hopfield_retrieve(self.features(x), keys, self.memories_, beta=self.beta,
                                 separation=self.separation, steps=steps)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dim={self.dim}, kernel_dim={self.kernel_dim}, separation={self.separation!r}, "
                f"beta={self.beta}, t={self.t}, kernel_steps={self.kernel_steps}, lr={self.lr}, loss={self.loss!r}, "
                f"init={self.init!r})")
