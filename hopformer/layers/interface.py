"""What the three Hopfield interfaces share: a :class:`HopfieldRetrieval` and an optional U-Hop feature map.

:class:`~hopformer.layers.Hopfield` (own projections), :class:`~hopformer.layers.HopfieldAttention` (timm ViT
``Attention``) and :class:`~hopformer.layers.MultiheadHopfield` (``nn.MultiheadAttention``) differ only in
their projections and call signature. Each holds

- ``retrieval``: the :class:`~hopformer.layers.retrieval.HopfieldRetrieval` (separation, beta, steps,
  dropout, memory), and
- ``feature_map``: ``None`` or a :class:`~hopformer.layers.kernel.UHopFeatureMap` (U-Hop, applied to the
  query/key patterns before the association).

:class:`HopfieldInterface` gives them the same read-only views (``alpha``, ``beta``, ``separation``,
``memory``, ...), the U-Hop protocol by delegation to ``feature_map`` and the loading of state dicts
written before ``retrieval`` existed (``beta.log_beta``, ``alpha.logit``, ``memory.*`` and
``query_feature_map.weight`` at the layer's top level).
"""

from __future__ import annotations

from torch import Tensor, nn

from .kernel import UHopFeatureMap
from .retrieval import HopfieldRetrieval

__all__ = ["HopfieldInterface"]

# pre-refactor state-dict prefixes -> where those entries live now
_LEGACY_PREFIXES = {"beta.": "retrieval.beta.", "alpha.": "retrieval.alpha.", "memory.": "retrieval.memory.",
                    "query_feature_map.": "feature_map.query_map."}


def _delegate(name: str, default=None):
    """A property forwarding ``name`` to ``self.feature_map`` (``default`` when there is none)."""

    def get(self):
        return default if self.feature_map is None else getattr(self.feature_map, name)

    def set_(self, value):
        if self.feature_map is None:
            raise AttributeError(f"{type(self).__name__} has no U-Hop feature map: cannot set {name}")
        setattr(self.feature_map, name, value)

    return property(get, set_, doc=f"``feature_map.{name}`` (the U-Hop protocol, docs/ARCHITECTURE.md).")


class HopfieldInterface:
    """Mixin of the three Hopfield interfaces (each an ``nn.Module`` holding ``retrieval`` and ``feature_map``)."""

    retrieval: HopfieldRetrieval
    feature_map: UHopFeatureMap | None

    # -- the retrieval, with entropy recording for U-Hop diagnostics --------------------------------
    def _retrieve(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *,
                  key_padding_mask: Tensor | None = None, return_association: bool = False,
                  dropout: float | None = None) -> tuple[Tensor, Tensor | None]:
        record = self.feature_map is not None and self.feature_map.track_entropy and not return_association
        out, association = self.retrieval(q, k, v, mask, key_padding_mask=key_padding_mask,
                                          return_association=return_association or record, dropout=dropout)
        if record:
            self.feature_map.record(association)
            association = None
        return out, association

    def current_separation(self):
        """The separation of this forward (a learnable alpha is a tensor)."""
        return self.retrieval.current_separation()

    # -- read-only views of the retrieval ----------------------------------------------------------
    alpha = property(lambda self: self.retrieval.alpha, doc="The :class:`LearnableAlpha`, or ``None``.")
    beta = property(lambda self: self.retrieval.beta, doc="The :class:`InverseTemperature`.")
    separation = property(lambda self: self.retrieval.separation, doc="The fixed separation (initial alpha if learned).")
    memory = property(lambda self: self.retrieval.memory, doc="The continuous memory, or ``None`` (discrete).")
    update_steps = property(lambda self: self.retrieval.update_steps)
    eps = property(lambda self: self.retrieval.eps)

    # -- the U-Hop protocol, delegated to the feature map ------------------------------------------
    cache_memories = _delegate("cache_memories", False)
    cache_with_grad = _delegate("cache_with_grad", False)
    cached_memories = _delegate("cached_memories")
    track_entropy = _delegate("track_entropy", False)
    last_entropy = _delegate("last_entropy")

    @property
    def kernel_dim(self) -> int | None:
        """Feature size ``D_phi`` of the U-Hop feature map (``None`` without one)."""
        return None if self.feature_map is None else self.feature_map.kernel_dim

    @property
    def query_feature_map(self) -> nn.Module | None:
        """The state patterns' own feature map (when their space differs from the stored patterns')."""
        return None if self.feature_map is None else self.feature_map.query_map

    def feature_parameters(self) -> list[nn.Parameter]:
        """The parameters stage I of U-Hop updates (the feature maps' ``W``); empty without a feature map."""
        return [] if self.feature_map is None else self.feature_map.feature_parameters()

    def separation_loss(self, memories: Tensor | None = None) -> Tensor:
        """U-Hop's separation loss of this layer's ``Phi`` (see :meth:`UHopFeatureMap.separation_loss`)."""
        if self.feature_map is None:
            raise AttributeError(f"{type(self).__name__} has no U-Hop feature map (build it with kernel_dim/kernelized)")
        return self.feature_map.separation_loss(memories, owner=type(self).__name__)

    # -- checkpoints written before the retrieval component ------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            for old, new in _LEGACY_PREFIXES.items():
                if rest.startswith(old) and prefix + new + rest[len(old):] not in state_dict:
                    state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                    break
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
