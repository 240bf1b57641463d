from .timeseries import DATASETS, TimeSeriesDataModule, WindowDataset  # noqa: F401
