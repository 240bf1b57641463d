from .forecasting import ForecastingModule  # noqa: F401
