"""Hopfield vision transformers: timm's ``VisionTransformer`` with its attention swapped for a Hopfield layer.

Registered with timm, so ``timm.create_model("hopfield_vit_tiny_patch4_32", separation="sparsemax",
num_classes=10)`` works. Every entry point takes

- ``attention``: ``"hopfield"`` (:class:`hopformer.layers.HopfieldAttention`, dense/sparse/entmax),
  ``"kernelized"`` (U-Hop feature map, ``HopfieldAttention(kernelized=True)``) or ``"continuous"``
  (continuous-time memory, ``HopfieldAttention(memory=...)``), mapped by :mod:`hopformer.layers.registry`;
- ``separation``: ``"softmax"``, ``"sparsemax"``, ``"entmax15"``, a float alpha in [1, 2], or
  ``"learnable"`` (alpha-entmax with alpha = 1 + sigmoid(a) learned per layer, Wu et al. 2024, eq. 3.3);
- ``attn_kwargs``: further options of the attention layer (``update_steps``, ``beta``,
  ``learnable_beta``, ``alpha``, kernel and memory options, ...);
- every other ``VisionTransformer`` argument (``img_size``, ``in_chans``, ``depth``, ``drop_rate``, ...).

The adapters keep timm's parameter names (``qkv``, ``proj``), so a plain timm ViT state dict loads
into a Hopfield ViT of the same shape: strictly for fixed separations, with
:func:`load_vit_state_dict` when the Hopfield layer adds parameters (learnable alpha/beta, U-Hop
feature maps), which then keep their initial values.

| name | image | patch | tokens | dim | depth | heads |
| --- | --- | --- | --- | --- | --- | --- |
| ``hopfield_vit_nano_patch2_8`` | 8 (1 channel, digits) | 2 | 16 | 64 | 2 | 4 |
| ``hopfield_vit_mini_patch4_32`` | 32 | 4 | 64 | 128 | 6 | 4 |
| ``hopfield_vit_tiny_patch4_32`` | 32 | 4 | 64 | 192 | 12 | 3 |
| ``hopfield_vit_small_patch4_32`` | 32 | 4 | 64 | 384 | 12 | 6 |
| ``hopfield_vit_tiny_patch8_64`` | 64 | 8 | 64 | 192 | 12 | 3 |
| ``hopfield_vit_small_patch8_64`` | 64 | 8 | 64 | 384 | 12 | 6 |
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..layers.registry import ATTENTIONS, attention_layer
from ._cfgs import default_cfgs as default_cfgs_for, no_pretrained_weights

__all__ = ["hopfield_attn_layer", "hopfield_vit", "load_vit_state_dict", "HOPFIELD_VIT_MODELS", "ATTENTIONS"]

HOPFIELD_ONLY_KEYS = ("retrieval", "alpha", "beta", "feature", "phi", "kernel")


def hopfield_attn_layer(attention: str = "hopfield", separation: Any = "softmax", **options: Any):
    """The ``attn_layer`` for ``VisionTransformer(attn_layer=...)``: a picklable
    ``functools.partial(HopfieldAttention, ...)`` built by :func:`hopformer.layers.registry.attention_layer`.

    Args:
        attention: ``"hopfield"``, ``"kernelized"`` (U-Hop) or ``"continuous"``.
        separation: ``"softmax"``, ``"sparsemax"``, ``"entmax15"``, a float alpha in [1, 2] or ``"learnable"``.
        **options: the spec's ``attn_kwargs`` (``update_steps``, ``beta``, ``alpha``, ``kernel_dim``, ``num_basis``, ...).
    """
    return attention_layer(attention, separation, options)


def hopfield_vit(
    attention: str = "hopfield",
    separation: Any = "softmax",
    attn_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> VisionTransformer:
    """A ``VisionTransformer`` whose every attention is a Hopfield layer (see the module docstring)."""
    return VisionTransformer(attn_layer=attention_layer(attention, separation, attn_kwargs), **kwargs)


def _hopfield_only(key: str) -> bool:
    """Whether ``key`` names a parameter that only a Hopfield attention layer has."""
    inner = key.split(".attn.", 1)[1] if ".attn." in key else ""
    return any(t in inner for t in HOPFIELD_ONLY_KEYS)


def load_vit_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a plain timm ViT ``state_dict`` into a Hopfield ViT of the same shape.

    Parameters that only the Hopfield layer has (learnable alpha/beta, U-Hop feature maps) keep their
    initial values; their names are returned. Any other missing or unexpected key is an error.
    """
    result = model.load_state_dict(state_dict, strict=False)
    bad_missing = [k for k in result.missing_keys if not _hopfield_only(k)]
    if bad_missing or result.unexpected_keys:
        raise ValueError(
            f"state dict does not fit the model: missing {bad_missing}, unexpected {list(result.unexpected_keys)}"
        )
    return list(result.missing_keys)


def _build(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Build ``variant`` through timm's ``build_model_with_cfg`` (as timm's ``_create_vision_transformer``).

    The ``pretrained_cfg`` (size, mean, std, classes of the tag's data set) comes from ``default_cfgs``;
    ``num_classes`` defaults to the tag's (``.cifar100``: 100); ``features_only=True`` wraps the model
    in timm's ``FeatureGetterNet`` over :meth:`VisionTransformer.forward_intermediates`.
    """
    if pretrained:
        args, size = HOPFIELD_VIT_MODELS[variant], variant.split("_")[2]  # size: nano, mini, tiny, small
        how = ("load the weights of a plain timm ViT of the same shape with "
               "hopformer.models.load_vit_state_dict(model, vit.state_dict())")
        if size in ("tiny", "small"):
            how += (f", e.g. vit = timm.create_model('vit_{size}_patch16_224', pretrained=True, img_size={args['img_size']}, "
                    f"patch_size={args['patch_size']}, num_classes={args['num_classes']}) (timm resamples the patch "
                    "and position embeddings)")
        raise no_pretrained_weights(variant, how)
    defaults = {k: v for k, v in HOPFIELD_VIT_MODELS[variant].items() if k != "num_classes"}  # num_classes: the tag's
    out_indices = kwargs.pop("out_indices", min(3, kwargs.get("depth", defaults["depth"])))
    return build_model_with_cfg(
        hopfield_vit, variant, pretrained, feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **{**defaults, **kwargs},
    )


_CIFAR = dict(img_size=32, patch_size=4, num_classes=10)
_TINY = dict(img_size=64, patch_size=8, num_classes=200)
HOPFIELD_VIT_MODELS: dict[str, dict[str, Any]] = {
    "hopfield_vit_nano_patch2_8": dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=2,
                                       num_heads=4, mlp_ratio=2.0),
    "hopfield_vit_mini_patch4_32": dict(**_CIFAR, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0),
    "hopfield_vit_tiny_patch4_32": dict(**_CIFAR, embed_dim=192, depth=12, num_heads=3),
    "hopfield_vit_small_patch4_32": dict(**_CIFAR, embed_dim=384, depth=12, num_heads=6),
    "hopfield_vit_tiny_patch8_64": dict(**_TINY, embed_dim=192, depth=12, num_heads=3),
    "hopfield_vit_small_patch8_64": dict(**_TINY, embed_dim=384, depth=12, num_heads=6),
}
default_cfgs = default_cfgs_for(HOPFIELD_VIT_MODELS, first_conv="patch_embed.proj")  # read by timm's register_model


@register_model
def hopfield_vit_nano_patch2_8(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Hopfield ViT-Nano, 8x8 one-channel images (scikit-learn digits), patch 2: the default model."""
    return _build("hopfield_vit_nano_patch2_8", pretrained, **kwargs)


@register_model
def hopfield_vit_mini_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Hopfield ViT-Mini (dim 128, depth 6), 32x32 images, patch 4: a CPU-sized CIFAR model."""
    return _build("hopfield_vit_mini_patch4_32", pretrained, **kwargs)


@register_model
def hopfield_vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Hopfield ViT-Tiny (dim 192, depth 12), 32x32 images (CIFAR), patch 4."""
    return _build("hopfield_vit_tiny_patch4_32", pretrained, **kwargs)


@register_model
def hopfield_vit_small_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Hopfield ViT-Small (dim 384, depth 12), 32x32 images (CIFAR), patch 4."""
    return _build("hopfield_vit_small_patch4_32", pretrained, **kwargs)


@register_model
def hopfield_vit_tiny_patch8_64(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Hopfield ViT-Tiny (dim 192, depth 12), 64x64 images (Tiny ImageNet), patch 8."""
    return _build("hopfield_vit_tiny_patch8_64", pretrained, **kwargs)


@register_model
def hopfield_vit_small_patch8_64(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Hopfield ViT-Small (dim 384, depth 12), 64x64 images (Tiny ImageNet), patch 8."""
    return _build("hopfield_vit_small_patch8_64", pretrained, **kwargs)
