"""Drop-in ``nn.Module`` Hopfield layers (pure torch, no Lightning)."""

from .hopfield import GeneralizedSparseHopfield, Hopfield, InverseTemperature, LearnableAlpha, SparseHopfield
from .pooling import HopfieldLayer, HopfieldPooling
from .adapters import HopfieldAttention, MultiheadHopfield
from .continuous import ContinuousHopfield, ContinuousHopfieldAttention, ContinuousMemory, GaussianBasis, RectangularBasis
from .sequence_memory import TemporalSequenceMemory
from .kernel import (
    FeatureMap,
    KernelizedHopfield,
    KernelizedHopfieldAttention,
    KernelizedMultiheadHopfield,
    SeparationLossMixin,
    uhop_modules,
)
