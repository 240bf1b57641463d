from .timeseries import DATASETS, TimeSeriesDataModule, WindowDataset  # noqa: F401
from .images import (  # noqa: F401
    IMAGE_DATAMODULES, CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule, ImageDataModule,
    ImageFolderDataModule, TinyImageNetDataModule,
)
