"""The one map from a layer spec to Hopfield modules, with one vocabulary for every model and the CLI.

A spec is three values:

- ``attention``: ``"hopfield"`` (discrete memory), ``"kernelized"`` (U-Hop feature map on queries and keys,
  Wu, Hu et al. 2024, eq. 3.1) or ``"continuous"`` (continuous-time memory, Santos et al. 2025);
- ``separation``: ``"softmax"`` (Ramsauer et al. 2021, eq. 10), ``"sparsemax"`` (Hu et al. 2023, eq. 3.4),
  ``"entmax15"``, a float alpha in [1, 2], or ``"learnable"`` (alpha-entmax with alpha = 1 + sigmoid(a)
  learned, Wu et al. 2024, eq. 3.3);
- ``attn_kwargs``: further options of the layer (``beta``, ``learnable_beta``, ``update_steps``, ``eps``,
  ``alpha`` (initial learnable alpha), ``alpha_per_head``, ``kernel_dim``, ``feature_init``, ``t``, ``loss``,
  and for ``"continuous"`` the :class:`~hopformer.layers.continuous.ContinuousMemory` options
  ``num_basis``, ``basis``, ``ridge``, ``num_points``, ``integration``, ``clip_basis``).

:func:`layer_options` turns a spec into constructor arguments of any of the three interfaces;
:func:`hopfield_layer`, :func:`attention_layer` (a picklable ``attn_layer`` for timm) and
:func:`multihead_layer` build them. The named layers of the literature (:func:`SparseHopfield`,
:func:`GeneralizedSparseHopfield`, :func:`KernelizedHopfield`, ...) are small factories over the same
interfaces.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Mapping

from .adapters import HOPFIELD_OPTIONS, HopfieldAttention, MultiheadHopfield
from .continuous import MEMORY_OPTIONS
from .hopfield import Hopfield

__all__ = [
    "ATTENTIONS",
    "SEPARATION_NAMES",
    "check_spec",
    "layer_options",
    "hopfield_layer",
    "attention_layer",
    "AttentionLayer",
    "multihead_layer",
    "SparseHopfield",
    "GeneralizedSparseHopfield",
    "KernelizedHopfield",
    "KernelizedHopfieldAttention",
    "KernelizedMultiheadHopfield",
    "ContinuousHopfield",
    "ContinuousHopfieldAttention",
    "ContinuousMultiheadHopfield",
]

ATTENTIONS = ("hopfield", "kernelized", "continuous")
SEPARATION_NAMES = ("softmax", "sparsemax", "entmax15", "learnable")
# options the spec itself sets: not allowed in attn_kwargs
_SPEC_KEYS = ("separation", "kernelized", "memory")
_HOPFIELD_ARGS = tuple(p for p in inspect.signature(Hopfield.__init__).parameters
                       if p not in ("self", "dim", "num_heads"))


def _valid_options(attention: str) -> tuple[str, ...]:
    shared = tuple(k for k in dict.fromkeys(_HOPFIELD_ARGS + HOPFIELD_OPTIONS) if k not in _SPEC_KEYS)
    if attention != "kernelized":
        shared = tuple(k for k in shared if k not in ("kernel_dim", "feature_init", "t", "loss"))
    return shared + (MEMORY_OPTIONS if attention == "continuous" else ())


def check_spec(attention: str = "hopfield", separation: Any = "softmax",
               attn_kwargs: Mapping[str, Any] | None = None) -> None:
    """Check a layer spec before any layer is built.

    Raises ``ValueError`` for a bad ``attention``/``separation`` value and ``TypeError`` for an unknown
    ``attn_kwargs`` key (as Python does for an unexpected keyword argument), each naming the bad key or value
    and the valid choices; returns nothing when the spec is valid.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {list(ATTENTIONS)}, got {attention!r}")
    if isinstance(separation, str):
        if separation not in SEPARATION_NAMES:
            raise ValueError(f"separation must be one of {list(SEPARATION_NAMES)} or a float alpha in [1, 2], "
                             f"got {separation!r}")
    elif isinstance(separation, bool) or not isinstance(separation, numbers.Real) or not 1.0 <= separation <= 2.0:
        raise ValueError(f"separation must be one of {list(SEPARATION_NAMES)} or a float alpha in [1, 2], "
                         f"got {separation!r}")
    if attention == "continuous" and separation != "softmax":
        raise ValueError(f"attention='continuous' retrieves with the Gibbs density (a continuous softmax): "
                         f"separation must be 'softmax', got {separation!r}")
    if attn_kwargs is None:
        return
    if not isinstance(attn_kwargs, Mapping):
        raise ValueError(f"attn_kwargs must be a dict of layer options, got {type(attn_kwargs).__name__}")
    for key in attn_kwargs:
        if key in _SPEC_KEYS:
            raise ValueError(f"attn_kwargs: {key!r} is set by the spec (attention=/separation=), not attn_kwargs")
        if key not in _valid_options(attention):  # TypeError, as Python's own unexpected keyword argument
            raise TypeError(f"attn_kwargs: unexpected keyword argument {key!r} (not an option of "
                            f"attention={attention!r}); valid: {sorted(_valid_options(attention))}")


def layer_options(attention: str = "hopfield", separation: Any = "softmax",
                  attn_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The constructor keyword arguments of a Hopfield interface for a spec (checked by :func:`check_spec`)."""
    check_spec(attention, separation, attn_kwargs)
    options = dict(attn_kwargs or {})
    options["separation"] = separation
    if attention == "kernelized":
        options["kernelized"] = True
    elif attention == "continuous":
        options["memory"] = {k: options.pop(k) for k in MEMORY_OPTIONS if k in options}
    return options


def hopfield_layer(dim: int, num_heads: int = 1, attention: str = "hopfield", separation: Any = "softmax",
                   attn_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> Hopfield:
    """A :class:`Hopfield` (own projections) for a spec; ``kwargs`` are further :class:`Hopfield` arguments
    the model sets itself (e.g. ``dropout``)."""
    return Hopfield(dim, num_heads, **kwargs, **layer_options(attention, separation, attn_kwargs))


class AttentionLayer(functools.partial):
    """``functools.partial(HopfieldAttention, **options)`` that timm's ``VisionTransformer(attn_layer=...)`` accepts.

    timm asks ``issubclass(attn_layer, DiffAttention)`` before calling it; Python's abstract subclass protocol
    answers that for any object with a ``__bases__`` tuple (here empty: a subclass of nothing), so the partial
    stands in for a class without a class being generated per configuration. Module-level, so a model built
    with it pickles.
    """

    __bases__ = ()


def attention_layer(attention: str = "hopfield", separation: Any = "softmax",
                    attn_kwargs: Mapping[str, Any] | None = None) -> AttentionLayer:
    """``AttentionLayer(HopfieldAttention, ...)`` (a ``functools.partial``) for a spec: timm's
    ``VisionTransformer(attn_layer=...)``; picklable."""
    options = layer_options(attention, separation, attn_kwargs)
    for key in ("stored_dim", "value_dim", "head_dim", "out_dim", "dropout", "bias", "project"):
        if key in options:
            raise ValueError(f"attn_kwargs: {key!r} is a Hopfield (own projections) option; timm's attention "
                             "takes its sizes, bias and dropout from the VisionTransformer")
    return AttentionLayer(HopfieldAttention, **options)


def multihead_layer(embed_dim: int, num_heads: int, attention: str = "hopfield", separation: Any = "softmax",
                    attn_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> MultiheadHopfield:
    """A :class:`MultiheadHopfield` for a spec; ``kwargs`` are ``nn.MultiheadAttention`` arguments."""
    return MultiheadHopfield(embed_dim, num_heads, **kwargs, **layer_options(attention, separation, attn_kwargs))


# -- the named layers of the literature: configured interfaces --------------------------------------------
def _no_separation(name: str, kwargs: Mapping[str, Any]) -> None:
    if "separation" in kwargs:
        raise TypeError(f"{name} sets its own separation; use Hopfield(..., separation=...) for another one")


def SparseHopfield(dim: int, num_heads: int = 1, **kwargs: Any) -> Hopfield:  # noqa: N802 (a layer's name)
    """Sparse modern Hopfield layer (Hu et al. 2023): ``Hopfield(..., separation="sparsemax")`` (eq. 3.4).

    Takes the arguments of :class:`Hopfield` except ``separation``.
    """
    _no_separation("SparseHopfield", kwargs)
    return Hopfield(dim, num_heads, separation="sparsemax", **kwargs)


def GeneralizedSparseHopfield(dim: int, num_heads: int = 1, *, alpha: float = 1.5, learnable_alpha: bool = True,
                              alpha_per_head: bool = False, **kwargs: Any) -> Hopfield:  # noqa: N802
    """Generalized sparse Hopfield layer (Wu et al. 2024, STanHop, eq. 3.3): alpha-entmax separation.

    ``Hopfield(..., separation="learnable", alpha=alpha)`` (alpha = 1 + sigmoid(a) learned, stays in (1, 2)),
    or ``Hopfield(..., separation=alpha)`` with ``learnable_alpha=False``. ``alpha_per_head``: one alpha per
    head. Other arguments: those of :class:`Hopfield` except ``separation``.
    """
    _no_separation("GeneralizedSparseHopfield", kwargs)
    if not learnable_alpha:
        return Hopfield(dim, num_heads, separation=float(alpha), **kwargs)
    return Hopfield(dim, num_heads, separation="learnable", alpha=alpha, alpha_per_head=alpha_per_head, **kwargs)


def KernelizedHopfield(dim: int, num_heads: int = 1, **kwargs: Any) -> Hopfield:  # noqa: N802
    """U-Hop kernelized Hopfield layer (Wu, Hu et al. 2024, eq. 3.1, 4.1): ``Hopfield(..., kernelized=True)``.

    Queries ``W_Q Phi(x)``, keys ``W_K Phi(Xi)``, values ``W_V Xi`` with the feature map ``Phi``
    (``kernel_dim``, ``feature_init``, ``t``, ``loss``); any :class:`Hopfield` argument, any separation.
    """
    return Hopfield(dim, num_heads, kernelized=True, **kwargs)


def ContinuousHopfield(dim: int, num_heads: int = 1, *, num_basis: int = 16, basis: Any = "rectangular",
                       ridge: float = 1e-3, num_points: int = 500, integration: str = "auto",
                       clip_basis: bool = True, **kwargs: Any) -> Hopfield:  # noqa: N802
    """Multi-head Hopfield association with a continuous-time memory (Santos et al. 2025, eqs. 5-8).

    ``Hopfield(..., memory=ContinuousMemory(num_basis, basis, ridge, num_points, integration, clip_basis))``;
    ``separation`` must be ``"softmax"`` (the Gibbs density is a continuous softmax).
    """
    memory = dict(num_basis=num_basis, basis=basis, ridge=ridge, num_points=num_points, integration=integration,
                  clip_basis=clip_basis)
    return Hopfield(dim, num_heads, memory=memory, **kwargs)


def KernelizedHopfieldAttention(dim: int, num_heads: int = 8, **kwargs: Any) -> HopfieldAttention:  # noqa: N802
    """timm ViT attention with U-Hop kernelized self-association: ``HopfieldAttention(..., kernelized=True)``."""
    return HopfieldAttention(dim, num_heads, kernelized=True, **kwargs)


def ContinuousHopfieldAttention(dim: int, num_heads: int = 8, **kwargs: Any) -> HopfieldAttention:  # noqa: N802
    """timm ViT attention with a continuous-time memory: ``HopfieldAttention(..., memory={...})``; the
    :class:`~hopformer.layers.continuous.ContinuousMemory` options (``num_basis``, ...) are keyword arguments."""
    memory = {k: kwargs.pop(k) for k in MEMORY_OPTIONS if k in kwargs}
    return HopfieldAttention(dim, num_heads, memory=memory, **kwargs)


def KernelizedMultiheadHopfield(embed_dim: int, num_heads: int, **kwargs: Any) -> MultiheadHopfield:  # noqa: N802
    """``nn.MultiheadAttention`` signature with U-Hop kernelized association: ``MultiheadHopfield(..., kernelized=True)``."""
    return MultiheadHopfield(embed_dim, num_heads, kernelized=True, **kwargs)


def ContinuousMultiheadHopfield(embed_dim: int, num_heads: int, **kwargs: Any) -> MultiheadHopfield:  # noqa: N802
    """``nn.MultiheadAttention`` signature with a continuous-time memory: ``MultiheadHopfield(..., memory={...})``."""
    memory = {k: kwargs.pop(k) for k in MEMORY_OPTIONS if k in kwargs}
    return MultiheadHopfield(embed_dim, num_heads, memory=memory, **kwargs)
