"""Image data modules on generated data in each layout (digits, ImageFolder, Tiny ImageNet, CIFAR pickles)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hopformer.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    TinyImageNetDataModule,
)
from hopformer.data.images import EpochSeededSampler, split_indices
from shared_data import SHARED_DATA



def _write_images(folder: Path, n: int, size: int, ext: str, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.{ext}")


def _labels(dm, split):
    return [int(y) for _, y in getattr(dm, split)]


def test_split_indices_are_seeded_and_disjoint():
    a_train, a_val = split_indices(100, 20, seed=3)
    b_train, b_val = split_indices(100, 20, seed=3)
    assert (a_train, a_val) == (b_train, b_val)
    assert len(a_val) == 20 and not set(a_train) & set(a_val) and len(a_train) + len(a_val) == 100
    assert split_indices(100, 0.25, seed=0)[1].__len__() == 25
    assert split_indices(100, 20, seed=4)[1] != a_val
    with pytest.raises(ValueError, match="val_size"):
        split_indices(10, 10, seed=0)


def test_epoch_seeded_sampler_is_reproducible_per_epoch():
    s = EpochSeededSampler(50, seed=1)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    s.set_epoch(0)
    assert list(s) == first and second != first and sorted(second) == list(range(50))


def test_digits_datamodule():
    dm = DigitsDataModule(batch_size=32, seed=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1797 - 360 - 180, 180, 360)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert len(set(_labels(dm, "test_set"))) == 10
    dm2 = DigitsDataModule(seed=0, train_subset=100)
    dm2.setup()
    assert len(dm2.train_set) == 100
    assert torch.equal(dm2.val_set[0][0], dm.val_set[0][0])  # same seeded validation split


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_imagefolder_datamodule(tmp_path, ext):
    for c, name in enumerate(["cat", "dog", "emu"]):
        _write_images(tmp_path / "train" / name, 10, 16, ext, seed=c)
    _write_images(tmp_path / "test" / "cat", 2, 20, ext, seed=9)  # other size: resized
    for name in ("dog", "emu"):
        _write_images(tmp_path / "test" / name, 2, 16, ext, seed=10)
    dm = ImageFolderDataModule(str(tmp_path / "train"), test_root=str(tmp_path / "test"), image_size=16,
                               val_size=6, batch_size=4, seed=1)
    assert dm.num_classes == 3 and dm.image_size == 16 and dm.num_channels == 3
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 6, 6)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and set(y.tolist()) <= {0, 1, 2}
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 16, 16)
    # Held-out images are not augmented: the same item twice gives the same tensor.
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


def test_imagefolder_without_test_root_uses_validation(tmp_path):
    for c in range(2):
        _write_images(tmp_path / f"c{c}", 5, 8, "png", seed=c)
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, val_size=0.2, batch_size=2)
    with pytest.warns(UserWarning, match="validation split"):
        dm.setup()
    assert dm.test_set is dm.val_set and len(dm.val_set) == 2


def test_tinyimagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    for i, w in enumerate(wnids):
        _write_images(root / "train" / w / "images", 6, 64, "JPEG", seed=i)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    _write_images(root / "val" / "images", 4, 64, "JPEG", seed=7)
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"img{i}.JPEG\t{wnids[i % 2]}\t0\t0\t63\t63\n" for i in range(4)))
    (root / "wnids.txt").write_text("\n".join(wnids))
    dm = TinyImageNetDataModule(str(root), val_size=2, batch_size=3)
    assert dm.num_classes == 2 and dm.image_size == 64
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (10, 2, 4)
    assert _labels(dm, "test_set") == [0, 1, 0, 1]
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 64, 64)


def _fake_cifar(root: Path, folder: str, n_train: int, n_test: int, classes: int) -> None:
    d = root / folder
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key = "labels" if classes == 10 else "fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    for name in names:
        batch = {"data": rng.integers(0, 255, (n_train, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, classes, n_train).tolist()}
        (d / name).write_bytes(pickle.dumps(batch))
    test = {"data": rng.integers(0, 255, (n_test, 3072), dtype=np.uint8), label_key: rng.integers(0, classes, n_test).tolist()}
    (d / ("test_batch" if classes == 10 else "test")).write_bytes(pickle.dumps(test))
    meta_name, meta_key = ("batches.meta", "label_names") if classes == 10 else ("meta", "fine_label_names")
    (d / meta_name).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(classes)]}))


@pytest.mark.parametrize("cls,folder,classes", [(CIFAR10DataModule, "cifar-10-batches-py", 10),
                                                (CIFAR100DataModule, "cifar-100-python", 100)])
def test_cifar_datamodules_on_generated_pickles(tmp_path, monkeypatch, cls, folder, classes):
    from torchvision import datasets

    _fake_cifar(tmp_path, folder, 8, 6, classes)
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    dm = cls(str(tmp_path), val_size=4, batch_size=5)
    dm.setup()
    n_train = 8 * (5 if classes == 10 else 1)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (n_train - 4, 4, 6)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (min(5, n_train - 4), 3, 32, 32) and dm.num_classes == classes


@pytest.mark.parametrize("make", [
    lambda p: CIFAR10DataModule(str(p)),
    lambda p: CIFAR100DataModule(str(p)),
    lambda p: ImageFolderDataModule(str(p / "nowhere")),
    lambda p: TinyImageNetDataModule(str(p / "tiny")),
])
def test_missing_data_directory_is_a_clear_error(tmp_path, make):
    with pytest.raises(FileNotFoundError, match="looked in|not found") as err:
        make(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_cifar_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    dm = CIFAR10DataModule(str(tmp_path), download=True)
    with pytest.raises(RuntimeError, match="download .* failed"):
        dm.prepare_data()


@pytest.mark.skipif(not (SHARED_DATA / "cifar10" / "train").is_dir(), reason="../shared/data/cifar10 not present")
def test_shared_cifar10_folder_split():
    dm = ImageFolderDataModule(str(SHARED_DATA / "cifar10" / "train"), val_size=5000, train_subset=1000, batch_size=8)
    with pytest.warns(UserWarning, match="no test_root given"):
        dm.setup()
    assert dm.num_classes == 10 and len(dm.val_set) == 5000 and len(dm.train_set) == 1000
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 32, 32)


def test_test_root_with_other_classes_is_rejected(tmp_path):
    """ImageFolder labels by sorted position: a test `cat` folder would silently become train `airplane`."""
    for name in ("airplane", "automobile"):
        _write_images(tmp_path / "train" / name, 3, 8, "png", 0)
    for name in ("cat", "dog"):
        _write_images(tmp_path / "test" / name, 3, 8, "png", 1)
    with pytest.raises(ValueError, match=r"same class folders.*\['airplane', 'automobile'\].*\['cat', 'dog'\]"):
        ImageFolderDataModule(root=str(tmp_path / "train"), test_root=str(tmp_path / "test"), val_size=2)


@pytest.mark.parametrize("val_size", [1.5, 1.0, -0.2, -3, 0.0])
def test_val_size_that_is_neither_a_count_nor_a_fraction_is_rejected(tmp_path, val_size):
    _write_images(tmp_path / "a", 4, 8, "png", 0)
    with pytest.raises(ValueError, match=f"val_size.*{val_size}"):
        ImageFolderDataModule(root=str(tmp_path), val_size=val_size)
    with pytest.raises(ValueError, match="val_size"):
        split_indices(10, val_size, seed=0)


def test_corrupt_image_error_names_the_file(tmp_path):
    _write_images(tmp_path / "a", 4, 8, "png", 0)
    bad = tmp_path / "a" / "img1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    dm = ImageFolderDataModule(root=str(tmp_path), val_size=1, image_size=8, augment=False, shuffle=False)
    dm.setup("fit")
    with pytest.raises(OSError, match="cannot read image '.*img1.png'"):
        for _ in dm.train_dataloader():
            pass


def test_validation_prefix_is_shuffled_across_classes():
    """ImageFolder data is class-sorted: any prefix of the validation split must still hold every class."""
    _, val = split_indices(1000, 200, seed=0)
    labels = {i // 100 for i in val[:40]}  # 10 class folders of 100 items each, in folder order
    assert len(labels) >= 8 and val != sorted(val)
