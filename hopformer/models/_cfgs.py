"""timm ``pretrained_cfg`` entries of the registered image models (data configs; no weights are hosted).

Each model is registered once per data set its input fits (:data:`hopformer.constants.IMAGE_DATASETS`),
as timm tags: ``hopfield_vit_tiny_patch4_32`` is ``hopfield_vit_tiny_patch4_32.cifar10`` (the first,
default tag) and ``hopfield_vit_tiny_patch4_32.cifar100`` selects the CIFAR-100 statistics and 100
classes. ``timm.data.resolve_model_data_config(model)`` then reports the size, mean and std the
hopformer data modules use.
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs

from ..constants import IMAGE_DATASETS


def datasets_for(in_chans: int, img_size: int) -> list[str]:
    """The data sets of :data:`IMAGE_DATASETS` whose images are ``in_chans x img_size x img_size``."""
    found = [name for name, d in IMAGE_DATASETS.items() if d["input_size"] == (in_chans, img_size, img_size)]
    if not found:
        raise ValueError(f"no data set in hopformer.constants.IMAGE_DATASETS has {in_chans}x{img_size}x{img_size} images")
    return found


def default_cfgs(models: dict[str, dict[str, Any]], first_conv: str) -> dict:
    """``generate_default_cfgs`` for ``{name: constructor defaults}`` (``img_size``, ``in_chans``), tagged by data set.

    ``crop_pct=1.0``: timm's eval transform then neither resizes nor crops an image of the model's
    size, as the data modules do (``ToTensor`` and ``Normalize`` only).
    """
    cfgs = {}
    for name, args in models.items():
        for dataset in datasets_for(args.get("in_chans", 3), args["img_size"]):
            cfgs[f"{name}.{dataset}"] = dict(
                url="", **IMAGE_DATASETS[dataset], pool_size=None, crop_pct=1.0, crop_mode="center",
                interpolation="bicubic", fixed_input_size=True, first_conv=first_conv, classifier="head",
                license="mit",
            )
    return generate_default_cfgs(cfgs)


def no_pretrained_weights(variant: str, how: str = "") -> ValueError:
    """The error of ``timm.create_model(variant, pretrained=True)``: no weights are hosted."""
    return ValueError(
        f"pretrained=True: no pretrained weights are hosted for {variant!r}; create it with pretrained=False"
        + (f", then {how}" if how else "")
    )
