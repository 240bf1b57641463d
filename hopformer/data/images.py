"""Image-classification LightningDataModules: digits (embedded default), CIFAR-10/100, Tiny ImageNet,
any ``ImageFolder`` directory.

Every module holds a validation split out of its training data, chosen with a seeded permutation
(``val_size`` images, or a fraction when < 1), optionally keeps a seeded ``train_subset`` of the
rest, and exposes ``num_classes``, ``image_size`` and ``num_channels`` so the training CLI can
check the model before training starts. Training batches are shuffled by :class:`EpochSeededSampler`
(a permutation seeded with ``seed + epoch``), so a run resumed from a checkpoint sees the same
batches as an uninterrupted one.

Test splits: digits, a seeded held-out set; CIFAR, the official test set; Tiny ImageNet, the
official ``val/`` folder (its ``test/`` has no labels); ``ImageFolder``, ``test_root`` when given,
else the validation split (a warning says so).
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import numpy as np
import torch
from einops import rearrange
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from ..constants import (  # noqa: F401  (re-exported: the statistics the models' pretrained_cfg report)
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD,
)
from .errors import DownloadError, remove_if_created_empty

__all__ = [
    "EpochSeededSampler",
    "ImageDataModule",
    "DigitsDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "TinyImageNetDataModule",
    "ImageFolderDataModule",
    "IMAGE_DATAMODULES",
]



class EpochSeededSampler(Sampler[int]):
    """Random permutation of ``range(n)`` seeded with ``seed + epoch`` (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _check_val_size(val_size: int | float) -> None:
    """A count (an integer >= 0) or a fraction strictly between 0 and 1; 1.5 is neither (it is not 1 image)."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ValueError(f"val_size must be an image count (int >= 0) or a fraction in (0, 1), got {val_size!r}")
    if isinstance(val_size, int) and val_size < 0:
        raise ValueError(f"val_size must be an image count >= 0 or a fraction in (0, 1), got {val_size!r}")
    if isinstance(val_size, float) and not 0.0 < val_size < 1.0:
        raise ValueError(f"val_size={val_size!r}: a float is a fraction of the training images and must lie in "
                         f"(0, 1); pass an integer for a count of images")


def split_indices(n: int, val_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, val) index split of ``range(n)``; ``val_size`` a count or a fraction < 1.

    The training indices are sorted (the sampler shuffles them per epoch); the validation indices keep
    the seeded permutation's order, so any prefix of the validation split (``limit_val_batches``) is a
    random sample of all classes, not the first class folders.
    """
    _check_val_size(val_size)
    n_val = int(round(val_size * n)) if isinstance(val_size, float) else val_size
    if not 0 <= n_val < n:
        raise ValueError(f"val_size={val_size!r} must leave training data: got {n_val} of {n} images")
    perm = np.random.default_rng(seed).permutation(n).tolist()
    return sorted(perm[n_val:]), perm[:n_val]


class _ResizeTo:
    """Resize a PIL image to ``size x size`` unless it already has that size (picklable)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image):
        return image if image.size == (self.size, self.size) else image.resize((self.size, self.size))


class ImageDataModule(L.LightningDataModule):
    """Base class: splits, samplers and loaders shared by every image data module.

    Args:
        root: data directory (ignored by digits).
        batch_size: images per training batch (per process under DDP).
        eval_batch_size: images per validation/test batch (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory (``None``: only when CUDA is available).
        val_size: images held out of the training data for validation (a count, or a fraction < 1).
        train_subset: keep only this many (seeded) training images, e.g. for short CPU runs.
        seed: seed of the validation split, the subset and the shuffling.
        augment: standard augmentation of the training images (random crop with padding, flip).
        shuffle: shuffle the training data (off for exact-order tests).
    """

    num_classes: int = 0
    image_size: int = 0
    num_channels: int = 3
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    how_to_get = ""

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        val_size: int | float = 5000,
        train_subset: int | None = None,
        seed: int = 0,
        augment: bool = True,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"train_subset must be >= 1 or None, got {train_subset}")
        _check_val_size(val_size)
        self.root = None if root is None else Path(os.path.expanduser(root))
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.val_size = val_size
        self.train_subset = train_subset
        self.seed = seed
        self.augment = augment
        self.shuffle = shuffle
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # -- helpers for subclasses
    def _require_dir(self, path: Path, what: str) -> None:
        if not path.is_dir():
            raise FileNotFoundError(
                f"{type(self).__name__}: {what} not found: looked in '{path.resolve()}'. {self.how_to_get}"
            )

    def train_transform(self) -> Callable:
        from torchvision import transforms as T

        steps: list[Callable] = []
        if self.augment:
            steps += [T.RandomCrop(self.image_size, padding=self.image_size // 8), T.RandomHorizontalFlip()]
        return T.Compose(steps + [T.ToTensor(), T.Normalize(self.mean, self.std)])

    def eval_transform(self) -> Callable:
        from torchvision import transforms as T

        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def _split(self, train_view: Dataset, val_view: Dataset, n: int) -> None:
        """Hold out the validation split from ``n`` training items; optional seeded subset."""
        train_idx, val_idx = split_indices(n, self.val_size, self.seed)
        if self.train_subset is not None and self.train_subset < len(train_idx):
            keep = np.random.default_rng(self.seed + 1).permutation(len(train_idx))[: self.train_subset]
            train_idx = sorted(train_idx[i] for i in keep)
        self.train_set = Subset(train_view, train_idx)
        self.val_set = Subset(val_view, val_idx)

    # -- loaders
    def _loader(self, dataset: Dataset | None, batch_size: int, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        sampler = EpochSeededSampler(len(dataset), self.seed) if (train and self.shuffle) else None  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), used at 8x8, one channel; no download.

    The images (grey levels 0..16) are scaled to [0, 1] and normalised with mean 0.5, std 0.5.
    ``test_size`` images are held out as the test set, then ``val_size`` of the rest for validation,
    both seeded. ``augment`` is ignored (no augmentation for digits).
    """

    num_classes, image_size, num_channels = 10, 8, 1
    mean, std = DIGITS_MEAN, DIGITS_STD

    def __init__(self, val_size: int | float = 180, test_size: int = 360, batch_size: int = 64, **kwargs) -> None:
        super().__init__(val_size=val_size, batch_size=batch_size, **kwargs)
        self.test_size = test_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
        x = (rearrange(x, "n (c h w) -> n c h w", c=1, h=8, w=8) - self.mean[0]) / self.std[0]
        y = torch.as_tensor(digits.target, dtype=torch.long)
        rest, test = split_indices(len(y), self.test_size, self.seed + 1000)
        self.test_set = TensorDataset(x[test], y[test])
        pool = TensorDataset(x[rest], y[rest])
        self._split(pool, pool, len(rest))


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 through torchvision: 45,000 / 5,000 train / val from the training batches, official test.

    Args:
        root: directory holding (or receiving) ``cifar-10-batches-py``.
        download: download when absent (needs network); otherwise a missing directory is an error.
    """

    num_classes, image_size = 10, 32
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    folder = "cifar-10-batches-py"
    how_to_get = ("Set data.init_args.download=true (needs network), copy the torchvision CIFAR files there, or "
                  "train from an ImageFolder copy (one folder per class) with configs/images/cifar10_folder.yaml.")

    def __init__(self, root: str = "data", download: bool = False, **kwargs) -> None:
        super().__init__(root=root, **kwargs)
        self.download = download
        assert self.root is not None
        if not download:
            self._require_dir(self.root / self.folder, f"{self.folder}")

    def _dataset_class(self):
        from torchvision.datasets import CIFAR10

        return CIFAR10

    def prepare_data(self) -> None:
        if self.download:
            existed = self.root.exists()
            try:
                self._dataset_class()(str(self.root), train=True, download=True)
                self._dataset_class()(str(self.root), train=False, download=True)
            except Exception as err:  # URLError, socket errors, ...
                remove_if_created_empty(self.root, existed)
                raise DownloadError(
                    f"{type(self).__name__}: download to '{self.root}' failed ({err!r}). Without network, "
                    f"copy the torchvision files to '{self.root / self.folder}' and set download=false"
                    + (" (or use configs/images/cifar10_folder.yaml with an ImageFolder copy)." if self.num_classes == 10 else ".")
                ) from None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        cls = self._dataset_class()
        train_view = cls(str(self.root), train=True, transform=self.train_transform())
        val_view = cls(str(self.root), train=True, transform=self.eval_transform())
        self._split(train_view, val_view, len(train_view))
        self.test_set = cls(str(self.root), train=False, transform=self.eval_transform())


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 through torchvision (same splits as :class:`CIFAR10DataModule`)."""

    num_classes = 100
    mean, std = CIFAR100_MEAN, CIFAR100_STD
    folder = "cifar-100-python"
    how_to_get = "Set data.init_args.download=true (needs network) or copy the torchvision CIFAR files there."

    def _dataset_class(self):
        from torchvision.datasets import CIFAR100

        return CIFAR100


class ImageFolderDataModule(ImageDataModule):
    """Any ``ImageFolder`` directory (``root/<class>/<image>``), e.g. ``../shared/data/cifar10/train``.

    Args:
        root: the training folder; ``val_size`` images are held out of it for validation (seeded).
        test_root: an optional folder with the same classes for the test set; when absent the test
            set is the validation split (a warning says so).
        image_size: side the images are resized to (no resize when they already have it).
        mean, std: normalisation statistics per channel.
    """

    how_to_get = "Point data.init_args.root at a folder laid out as <root>/<class>/<image>."

    def __init__(
        self,
        root: str,
        test_root: str | None = None,
        image_size: int = 32,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        **kwargs,
    ) -> None:
        super().__init__(root=root, **kwargs)
        assert self.root is not None
        self._require_dir(self.root, "image folder")
        self.test_root = None if test_root is None else Path(os.path.expanduser(test_root))
        if self.test_root is not None:
            self._require_dir(self.test_root, "test image folder")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"ImageFolderDataModule: no class folders in '{self.root.resolve()}'. {self.how_to_get}")
        if self.test_root is not None:  # ImageFolder labels classes by sorted position: the lists must match
            test_classes = sorted(e.name for e in os.scandir(self.test_root) if e.is_dir())
            if test_classes != self.classes:
                raise ValueError(
                    f"ImageFolderDataModule: test_root '{self.test_root}' must have the same class folders as root "
                    f"'{self.root}' (labels are their sorted positions); root has {self.classes}, "
                    f"test_root has {test_classes}"
                )
        self.num_classes, self.image_size = len(self.classes), image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_channels = len(self.mean)

    def _folder(self, root: Path, transform: Callable):
        from torchvision import transforms as T
        from torchvision.datasets import ImageFolder

        mode = "L" if self.num_channels == 1 else "RGB"
        return ImageFolder(str(root), transform=T.Compose([_ResizeTo(self.image_size), transform]),
                           loader=partial(_open_image, mode=mode))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_view = self._folder(self.root, self.train_transform())  # type: ignore[arg-type]
        val_view = self._folder(self.root, self.eval_transform())  # type: ignore[arg-type]
        self._split(train_view, val_view, len(train_view))
        if self.test_root is not None:
            self.test_set = self._folder(self.test_root, self.eval_transform())
        else:
            warnings.warn("ImageFolderDataModule: no test_root given, the test set is the validation split", stacklevel=2)
            self.test_set = self.val_set


def _open_image(path: str, mode: str):
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    except (OSError, ValueError, SyntaxError) as err:  # PIL: truncated/corrupt files, unknown formats
        raise OSError(f"cannot read image '{path}': {err}") from err


class _TinyImageNetVal(Dataset):
    """Tiny ImageNet's ``val/images`` labelled by ``val/val_annotations.txt``."""

    def __init__(self, root: Path, class_to_idx: dict[str, int], transform: Callable) -> None:
        rows = [line.split("\t") for line in (root / "val" / "val_annotations.txt").read_text().splitlines() if line.strip()]
        self.samples = [(root / "val" / "images" / r[0], class_to_idx[r[1]]) for r in rows]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(_open_image(str(path), "RGB")), label


class TinyImageNetDataModule(ImageDataModule):
    """Tiny ImageNet (200 classes, 64x64) in its released layout.

    ``root/train/<wnid>/images/*.JPEG`` for training (``val_size`` images held out for validation,
    seeded), ``root/val/images`` + ``root/val/val_annotations.txt`` as the test set.
    """

    num_classes, image_size = 200, 64
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    how_to_get = (
        "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzip it and set data.init_args.root "
        "to the tiny-imagenet-200 folder."
    )

    def __init__(self, root: str = "data/tiny-imagenet-200", val_size: int | float = 10000, **kwargs) -> None:
        super().__init__(root=root, val_size=val_size, **kwargs)
        assert self.root is not None
        self._require_dir(self.root / "train", "Tiny ImageNet train/ folder")
        if not (self.root / "val" / "val_annotations.txt").is_file():
            raise FileNotFoundError(
                f"TinyImageNetDataModule: '{(self.root / 'val' / 'val_annotations.txt').resolve()}' not found. {self.how_to_get}"
            )
        self.wnids = sorted(e.name for e in os.scandir(self.root / "train") if e.is_dir())
        self.num_classes = len(self.wnids)

    def _train_folder(self, transform: Callable):
        from torchvision.datasets import ImageFolder

        return ImageFolder(str(self.root / "train"), transform=transform, loader=partial(_open_image, mode="RGB"))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_view = self._train_folder(self.train_transform())
        val_view = self._train_folder(self.eval_transform())
        self._split(train_view, val_view, len(train_view))
        self.test_set = _TinyImageNetVal(self.root, train_view.class_to_idx, self.eval_transform())  # type: ignore[arg-type]


IMAGE_DATAMODULES: dict[str, type[ImageDataModule]] = {
    "digits": DigitsDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "tinyimagenet": TinyImageNetDataModule,
    "imagefolder": ImageFolderDataModule,
}
