from .forecasting import ForecastingModule  # noqa: F401
from .two_stage import UHopSeparation, find_uhop_modules  # noqa: F401
from .classification import ClassificationModule  # noqa: F401
from .predictions import PredictionWriter  # noqa: F401
from .progress import PlainProgressBar  # noqa: F401
