"""Drop-in ``nn.Module`` Hopfield layers (pure torch + timm, no Lightning); docs/ARCHITECTURE.md has the map.

Three interfaces (:class:`Hopfield`, :class:`HopfieldAttention`, :class:`MultiheadHopfield`) around one
retrieval core (:class:`HopfieldRetrieval`); every variant is constructor arguments, the named layers of the
literature (:func:`SparseHopfield`, :func:`KernelizedHopfield`, ...) are factories returning configured
interfaces, and :mod:`hopformer.layers.registry` maps a spec (``attention``, ``separation``, ``attn_kwargs``)
to modules.
"""

from .retrieval import HopfieldRetrieval, InverseTemperature, LearnableAlpha
from .kernel import FeatureMap, UHopFeatureMap, association_entropy, named_uhop_modules, uhop_modules
from .continuous import ContinuousMemory, GaussianBasis, RectangularBasis
from .hopfield import Hopfield
from .adapters import HopfieldAttention, MultiheadHopfield
from .pooling import HopfieldLayer, HopfieldPooling
from .sequence_memory import TemporalSequenceMemory
from .registry import (
    ContinuousHopfield,
    ContinuousHopfieldAttention,
    ContinuousMultiheadHopfield,
    GeneralizedSparseHopfield,
    KernelizedHopfield,
    KernelizedHopfieldAttention,
    KernelizedMultiheadHopfield,
    SparseHopfield,
    attention_layer,
    check_spec,
    hopfield_layer,
    layer_options,
    multihead_layer,
)

__all__ = [
    "HopfieldRetrieval", "InverseTemperature", "LearnableAlpha",
    "FeatureMap", "UHopFeatureMap", "association_entropy", "named_uhop_modules", "uhop_modules",
    "ContinuousMemory", "GaussianBasis", "RectangularBasis",
    "Hopfield", "HopfieldAttention", "MultiheadHopfield", "HopfieldLayer", "HopfieldPooling",
    "TemporalSequenceMemory",
    "SparseHopfield", "GeneralizedSparseHopfield", "KernelizedHopfield", "ContinuousHopfield",
    "KernelizedHopfieldAttention", "ContinuousHopfieldAttention",
    "KernelizedMultiheadHopfield", "ContinuousMultiheadHopfield",
    "attention_layer", "check_spec", "hopfield_layer", "layer_options", "multihead_layer",
]
