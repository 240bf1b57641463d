"""Normalisation statistics of the image data sets (pure Python; the one place they are written).

The data modules (:mod:`hopformer.data.images`) normalise with these values and the timm
``pretrained_cfg`` of every registered model (:mod:`hopformer.models.vit`, :mod:`hopformer.models.vih`)
reports them, so ``timm.data.create_transform(**timm.data.resolve_model_data_config(model))`` gives
the same pixels as the data module. Values are per channel, for images scaled to [0, 1].
"""

from __future__ import annotations

__all__ = [
    "DIGITS_MEAN", "DIGITS_STD", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_DATASETS",
]

DIGITS_MEAN, DIGITS_STD = (0.5,), (0.5,)  # scikit-learn's 8x8 digits, grey levels 0..16 scaled to [0, 1]
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # also used for Tiny ImageNet

# data set -> the input a model trained on it takes: input_size (C, H, W), num_classes, mean, std.
IMAGE_DATASETS: dict[str, dict] = {
    "digits": dict(input_size=(1, 8, 8), num_classes=10, mean=DIGITS_MEAN, std=DIGITS_STD),
    "cifar10": dict(input_size=(3, 32, 32), num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD),
    "cifar100": dict(input_size=(3, 32, 32), num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD),
    "tinyimagenet": dict(input_size=(3, 64, 64), num_classes=200, mean=IMAGENET_MEAN, std=IMAGENET_STD),
}
