"""U-Hop kernelized Hopfield layers (Wu, Hu et al. 2024, "Uniform Memory Retrieval with Larger Capacity
for Modern Hopfield Models"; Wu et al. 2024, arXiv 2404.03827).

A linear feature map ``Phi(u) = W u`` (eq. 2.1, ``W`` of shape ``D_phi x d``, ``D_phi >= d``, full rank,
Assumption 2.1) defines the kernel ``K(u, v) = <Phi(u), Phi(v)>``. The kernelized layer (eq. 3.1 / 4.1)
associates queries ``W_Q Phi(x)`` with keys ``W_K Phi(Xi)`` and reads out values ``W_V Xi``; with
``project=False`` it is the retrieval dynamics ``T_K(x) = Xi Sep(beta K(Xi, x))`` of eq. (2.4).

Every module here follows the U-Hop protocol of docs/ARCHITECTURE.md (:class:`SeparationLossMixin`):
stage I of the two-stage optimisation (Algorithm 2) minimises :meth:`SeparationLossMixin.separation_loss`
over :meth:`SeparationLossMixin.feature_parameters` only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..functional.separation_loss import SEPARATION_LOSSES, separation_loss
from .adapters import HopfieldAttention, MultiheadHopfield
from .hopfield import Hopfield, InverseTemperature, _positive_int

__all__ = [
    "FEATURE_MAP_INITS",
    "FeatureMap",
    "SeparationLossMixin",
    "association_entropy",
    "uhop_modules",
    "KernelizedHopfield",
    "KernelizedHopfieldAttention",
    "KernelizedMultiheadHopfield",
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
        self.dim = _positive_int("dim", dim)
        self.kernel_dim = _positive_int("kernel_dim", kernel_dim if kernel_dim is not None else dim)
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
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"t (separation-loss RBF scale) must be a positive finite number, got {t!r}")
    if loss not in SEPARATION_LOSSES:
        raise ValueError(f"loss must be one of {SEPARATION_LOSSES}, got {loss!r}")


def association_entropy(weights: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of association rows ``(..., n, m)``: 0 = one memory retrieved, ``log m`` = uniform."""
    return -torch.special.xlogy(weights, weights).sum(-1).mean()


class SeparationLossMixin:
    """The U-Hop protocol (docs/ARCHITECTURE.md) for an ``nn.Module`` that owns ``self.feature_map``.

    Attributes:
        cache_memories: when ``True``, ``forward`` stores the stored patterns that entered it in
            ``cached_memories`` ``(B, M, dim)``; stage I reads them from a forward pass.
        cache_with_grad: keep the cached memories attached to the graph (stage I then also moves the
            parameters that produced them, e.g. the patch embedding); default: detached.
        cached_memories: the last cached memories, or ``None``.
        track_entropy: when ``True``, ``forward`` also stores the mean entropy of its association
            weights in ``last_entropy`` (a collapse onto one memory shows as entropy near 0).
        last_entropy: the last recorded entropy (a 0-dim tensor, nats), or ``None``.
        separation_t: the loss's ``t`` (eq. 2.5).
        separation_kind: ``"average"`` (Def. 2.2), ``"orthogonal"`` (Def. 3.1) or ``"max"`` (G.2).
    """

    cache_memories: bool = False
    cache_with_grad: bool = False
    cached_memories: Tensor | None = None
    track_entropy: bool = False
    last_entropy: Tensor | None = None
    separation_t: float = 2.0
    separation_kind: str = "average"

    def _init_separation(self, t: float, loss: str) -> None:
        _check_loss_options(t, loss)
        self.separation_t, self.separation_kind = float(t), loss
        self.cache_memories, self.cache_with_grad, self.cached_memories = False, False, None
        self.track_entropy, self.last_entropy = False, None

    def _cache(self, memories: Tensor) -> None:
        if self.cache_memories:
            self.cached_memories = memories if self.cache_with_grad else memories.detach()

    def _record_entropy(self, weights: Tensor) -> None:
        self.last_entropy = association_entropy(weights.detach().float())

    def feature_parameters(self) -> list[nn.Parameter]:
        """The parameters stage I updates: the feature map(s) ``W``."""
        seen, params = set(), []
        for module in self.modules():  # type: ignore[attr-defined]
            if isinstance(module, FeatureMap) and id(module.weight) not in seen:
                seen.add(id(module.weight))
                params.append(module.weight)
        return params

    def separation_loss(self, memories: Tensor | None = None) -> Tensor:
        """The separation loss of ``Phi`` over the memories, averaged over independent memory sets.

        Args:
            memories: ``(B, M, dim)`` or ``(M, dim)`` stored patterns; ``None`` uses ``cached_memories``.

        Returns:
            A scalar: the mean over the ``B`` memory sets of ``separation_loss(Phi(memories), t, kind)``.

        With one memory per sample (``(B, 1, dim)``, e.g. the authors' ViH with patch 32 on 32x32 images)
        there is no pair to separate within a sample, so the ``B`` memories of the batch form one set.
        """
        if memories is None:
            memories = self.cached_memories
            if memories is None:
                raise RuntimeError(
                    f"{type(self).__name__}.separation_loss() has no memories: pass them, or set "
                    "cache_memories = True and run a forward pass first"
                )
        if memories.dim() not in (2, 3):
            raise ValueError(f"memories must have shape (B, M, dim) or (M, dim), got {tuple(memories.shape)}")
        if memories.dim() == 3 and memories.shape[1] == 1:
            memories = rearrange(memories, "b 1 d -> 1 b d")
        features = self.feature_map(memories)  # type: ignore[attr-defined]
        return separation_loss(features, self.separation_t, self.separation_kind).mean()


def uhop_modules(model: nn.Module) -> list[nn.Module]:
    """Every submodule of ``model`` (itself included) that follows the U-Hop protocol."""
    return [m for m in model.modules() if isinstance(m, SeparationLossMixin)]


class KernelizedHopfield(SeparationLossMixin, Hopfield):
    """U-Hop kernelized Hopfield layer: queries ``W_Q Phi(x)``, keys ``W_K Phi(Xi)``, values ``W_V Xi`` (eq. 3.1, 4.1).

    A drop-in for :class:`hopformer.layers.Hopfield`: same constructor and ``forward``/``energy``, plus

    Args:
        kernel_dim: feature size ``D_phi`` of ``Phi``; defaults to ``max(dim, stored_dim)``.
        t: separation-loss scale (eq. 2.5; paper ``t = 2``).
        loss: separation loss used by stage I: ``"average"`` (Def. 2.2), ``"orthogonal"`` (Def. 3.1)
            or ``"max"`` (G.2).
        feature_init: initialisation of ``Phi`` (see :class:`FeatureMap`).

    When ``stored_dim != dim`` the queries get their own feature map ``query_feature_map`` (a kernel needs one
    ``Phi`` per input space; otherwise ``query_feature_map`` is ``None`` and ``feature_map`` serves both); the
    separation loss always uses the stored patterns' ``feature_map``.
    With ``project=False`` this is exactly the retrieval dynamics ``T_K`` of eq. (2.4) (the head split then
    applies to ``kernel_dim``, which ``num_heads`` must divide, and the default ``beta`` is
    ``(kernel_dim / num_heads) ** -0.5``, the size of each head's association space). ``energy`` is the kernelized energy
    ``-(1/beta) Psi*(beta K(Xi, x)) + 0.5 K(x, x)`` in each head's association space.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        *,
        kernel_dim: int | None = None,
        t: float = 2.0,
        loss: str = "average",
        feature_init: str = "orthogonal",
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        kernel_dim = kernel_dim if kernel_dim is not None else max(self.dim, self.stored_dim)
        self.feature_map = FeatureMap(self.stored_dim, kernel_dim, init=feature_init)
        self.query_feature_map = (
            None if self.stored_dim == self.dim else FeatureMap(self.dim, kernel_dim, init=feature_init)
        )
        self.kernel_dim = self.feature_map.kernel_dim
        inner = self.head_dim * self.num_heads
        if self.project:
            bias = self.q_proj.bias is not None
            self.q_proj = nn.Linear(self.kernel_dim, inner, bias=bias)
            self.k_proj = nn.Linear(self.kernel_dim, inner, bias=bias)
        else:
            if self.kernel_dim % self.num_heads:
                raise ValueError(f"project=False splits Phi's kernel_dim={self.kernel_dim} into num_heads={self.num_heads}; "
                                 "num_heads must divide it")
            if kwargs.get("beta") is None:  # each head associates in kernel_dim / num_heads features
                self.beta = InverseTemperature((self.kernel_dim // self.num_heads) ** -0.5, self.num_heads,
                                               kwargs.get("learnable_beta", False))
        self._init_separation(t, loss)

    def _split_kernel(self, x: Tensor) -> Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)

    def project_query(self, state: Tensor) -> Tensor:
        """``W_Q Phi(x)`` split into heads: ``(B, Lq, dim) -> (B, H, Lq, head_dim)``."""
        phi = (self.query_feature_map or self.feature_map)(state)
        return self._split_kernel(self.q_proj(phi) if self.project else phi)

    def project_keys(self, stored: Tensor) -> Tensor:
        """``W_K Phi(Xi)`` split into heads: ``(B, Lk, stored_dim) -> (B, H, Lk, head_dim)``."""
        phi = self.feature_map(stored)
        return self._split_kernel(self.k_proj(phi) if self.project else phi)

    def forward(self, state: Tensor, stored: Tensor | None = None, values: Tensor | None = None, **kwargs):
        """As :meth:`Hopfield.forward`; caches the stored patterns when ``cache_memories`` is set."""
        self._cache(state if stored is None else stored)
        if self.track_entropy and not kwargs.get("return_association", False):
            kwargs.pop("return_association", None)
            out, weights = super().forward(state, stored, values, return_association=True, **kwargs)
            self._record_entropy(weights)
            return out
        return super().forward(state, stored, values, **kwargs)


class KernelizedHopfieldAttention(SeparationLossMixin, HopfieldAttention):
    """timm ViT ``Attention`` (``x -> x``) with U-Hop kernelized self-association of the tokens (eq. 4.1).

    Queries ``W_Q Phi(x)``, keys ``W_K Phi(x)``, values ``W_V x``; the tokens entering the layer are its
    memories. Same constructor as timm's ``Attention`` / :class:`HopfieldAttention`, plus

    Args:
        kernel_dim: feature size of ``Phi``; defaults to ``dim``. With ``kernel_dim == dim`` the timm
            ``qkv`` projection is kept (a plain ViT checkpoint loads; only ``feature_map.weight`` is new);
            otherwise ``qkv`` is replaced by ``qk`` (``kernel_dim -> 2 attn_dim``) and ``v`` (``dim -> attn_dim``).
        t, loss, feature_init: as :class:`KernelizedHopfield`.

    Use ``KernelizedHopfieldAttention.configure(separation=..., kernel_dim=...)`` as ``attn_layer``.
    """

    def __init__(self, dim: int, num_heads: int = 8, *args, **kwargs):
        options = dict(kwargs)
        kernel_dim = options.pop("kernel_dim", None)
        t, loss = options.pop("t", 2.0), options.pop("loss", "average")
        feature_init = options.pop("feature_init", "orthogonal")
        super().__init__(dim, num_heads, *args, **options)
        self.feature_map = FeatureMap(dim, kernel_dim, init=feature_init)
        self.kernel_dim = self.feature_map.kernel_dim
        if self.kernel_dim != dim:
            bias = self.qkv.bias is not None
            attn_dim = self.num_heads * self.head_dim
            del self.qkv
            self.qk = nn.Linear(self.kernel_dim, 2 * attn_dim, bias=bias)
            self.v = nn.Linear(dim, attn_dim, bias=bias)
        self._init_separation(t, loss)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        phi = self.feature_map(x)
        if self.kernel_dim == self.feature_map.dim:
            w_qk, w_v = self.qkv.weight.split([2 * self.attn_dim, self.attn_dim])
            b_qk, b_v = (None, None) if self.qkv.bias is None else self.qkv.bias.split([2 * self.attn_dim, self.attn_dim])
            qk, v = F.linear(phi, w_qk, b_qk), F.linear(x, w_v, b_v)
        else:
            qk, v = self.qk(phi), self.v(x)
        q, k = rearrange(qk, "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        v = rearrange(v, "b n (h d) -> b h n d", h=self.num_heads)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                return_association: bool = False):
        """As :meth:`HopfieldAttention.forward`; caches the tokens when ``cache_memories`` is set."""
        self._cache(x)
        if self.track_entropy and not return_association:
            out, weights = super().forward(x, attn_mask, is_causal, return_association=True)
            self._record_entropy(weights)
            return out
        return super().forward(x, attn_mask, is_causal, return_association)


class KernelizedMultiheadHopfield(SeparationLossMixin, MultiheadHopfield):
    """``nn.MultiheadAttention`` signature with U-Hop kernelized association (eq. 3.1).

    Queries ``W_q Phi(query)``, keys ``W_k Phi(key)``, values ``W_v value``; the keys are the memories.
    Same constructor as :class:`MultiheadHopfield` plus ``t``, ``loss``, ``feature_init``
    (see :class:`KernelizedHopfield`). ``Phi`` is square (``kernel_dim == embed_dim``) and shared by
    queries and keys, so ``kdim`` must equal ``embed_dim``; the state dict is ``nn.MultiheadAttention``'s
    plus ``feature_map.weight``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *args, t: float = 2.0, loss: str = "average",
                 feature_init: str = "orthogonal", **kwargs):
        super().__init__(embed_dim, num_heads, *args, **kwargs)
        if self.kdim != embed_dim:
            raise ValueError(f"KernelizedMultiheadHopfield shares Phi between queries and keys: kdim must equal "
                             f"embed_dim, got kdim={self.kdim}, embed_dim={embed_dim}")
        self.feature_map = FeatureMap(embed_dim, embed_dim, init=feature_init)
        self._init_separation(t, loss)

    def _projections(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._cache(key)
        return super()._projections(self.feature_map(query), self.feature_map(key), value)
