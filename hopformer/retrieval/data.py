"""Image sets for the retrieval experiments: flattened images with pixel values in [0, 1].

Sources: ``"digits"`` (scikit-learn's 8x8 digits, shipped with scikit-learn: always available),
``"mnist"`` and ``"cifar10"`` (torchvision datasets already on disk under ``root``; ``download=True``
fetches them), and ``"folder"`` (any torchvision ``ImageFolder`` directory, e.g. the CIFAR-10 training
split as JPEG files). Only the sampled images of a folder are decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

__all__ = ["ImageSet", "SOURCES", "load_images"]

SOURCES = ("digits", "mnist", "cifar10", "folder")


@dataclass
class ImageSet:
    """Flattened images ``(N, C*H*W)`` in [0, 1] (channel-major, as ``ToTensor`` gives) and their shape.

    Attributes:
        images: ``(N, d)`` float32 tensor.
        shape: ``(C, H, W)`` of one image.
        name: a short name for plots and the CSV.
    """

    images: Tensor
    shape: tuple[int, int, int]
    name: str

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))


def _pick(n_total: int, n: int | None, seed: int) -> np.ndarray:
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))


def _from_uint8(array: np.ndarray, name: str) -> ImageSet:
    x = torch.from_numpy(np.ascontiguousarray(array)).float() / 255.0
    if x.dim() == 3:  # (N, H, W) grayscale
        x = rearrange(x, "n h w -> n 1 h w")
    else:  # (N, H, W, C)
        x = rearrange(x, "n h w c -> n c h w")
    shape = tuple(x.shape[1:])
    return ImageSet(rearrange(x, "n c h w -> n (c h w)").contiguous(), shape, name)


def _digits(n: int | None, seed: int) -> ImageSet:
    from sklearn.datasets import load_digits

    data = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8), values 0..16
    x = torch.from_numpy(data[_pick(len(data), n, seed)])
    return ImageSet(rearrange(x, "n h w -> n (h w)").contiguous(), (1, 8, 8), "digits")


def _torchvision(source: str, root: Path, n: int | None, seed: int, download: bool) -> ImageSet:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[source]
    try:
        dataset = cls(str(root), train=True, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True ..."
        raise FileNotFoundError(
            f"{source} not found under {root.resolve()} ({err}); pass --root to where torchvision stored it, "
            f"or --download to fetch it"
        ) from None
    data = dataset.data.numpy() if isinstance(dataset.data, Tensor) else np.asarray(dataset.data)
    return _from_uint8(data[_pick(len(data), n, seed)], source)


def _folder(root: Path, n: int | None, seed: int) -> ImageSet:
    import torchvision

    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root.resolve()} does not exist (expected ImageFolder layout root/<class>/<image>)")
    dataset = torchvision.datasets.ImageFolder(str(root))
    picked = _pick(len(dataset), n, seed)
    first = np.asarray(dataset.loader(dataset.samples[picked[0]][0]).convert("RGB"))
    array = np.empty((len(picked),) + first.shape, dtype=np.uint8)
    for i, index in enumerate(picked):
        image = np.asarray(dataset.loader(dataset.samples[index][0]).convert("RGB"))
        if image.shape != first.shape:
            raise ValueError(f"images in {root} differ in size: {image.shape} vs {first.shape}; resize them first")
        array[i] = image
    return _from_uint8(array, "/".join(p for p in (root.parent.name, root.name) if p) or "folder")


def load_images(
    source: str = "digits",
    root: str | Path | None = None,
    *,
    n: int | None = None,
    seed: int = 0,
    download: bool = False,
) -> ImageSet:
    """Load ``n`` images (all if ``None``), drawn at random with ``seed``, as an :class:`ImageSet`.

    Args:
        source: ``"digits"``, ``"mnist"``, ``"cifar10"`` or ``"folder"``.
        root: directory of the torchvision dataset (default ``./data``) or of the ``ImageFolder``.
        n: number of images to draw without replacement.
        seed: seed of the draw.
        download: let torchvision download MNIST / CIFAR-10 into ``root`` when missing.

    Raises:
        FileNotFoundError: the data is not where it was looked for (the message names the path).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    if source == "digits":
        return _digits(n, seed)
    if source == "folder" and root is None:
        raise ValueError("source='folder' needs root, the ImageFolder directory")
    root = Path(root) if root is not None else Path("data")
    if source == "folder":
        return _folder(root, n, seed)
    return _torchvision(source, root, n, seed, download)
