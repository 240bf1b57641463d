"""Drop-in ``nn.Module`` Hopfield layers (pure torch, no Lightning)."""

from .hopfield import GeneralizedSparseHopfield, Hopfield, InverseTemperature, LearnableAlpha, SparseHopfield
from .pooling import HopfieldLayer, HopfieldPooling
from .adapters import HopfieldAttention, MultiheadHopfield
