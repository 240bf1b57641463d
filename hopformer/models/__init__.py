from .stanhop import STanHopNet, build_hopfield  # noqa: F401
from .stanhop_memory import PlugAndPlayMemory, TuneAndPlayMemory  # noqa: F401
from .forecast_baselines import DLinear, RepeatLast  # noqa: F401
from .vit import HOPFIELD_VIT_MODELS, hopfield_attn_layer, hopfield_vit, load_vit_state_dict  # noqa: F401
from .vih import ViH  # noqa: F401
