from .stanhop import STanHopNet, build_hopfield  # noqa: F401
from .stanhop_memory import PlugAndPlayMemory, TuneAndPlayMemory  # noqa: F401
from .forecast_baselines import DLinear, RepeatLast  # noqa: F401
