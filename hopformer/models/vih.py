"""ViH: the U-Hop paper's small vision Hopfield model (U-Hop, Section 4.2 / Table 1).

Patch embedding -> CLS token + learned positions -> Hopfield block(s) -> LayerNorm -> linear head.
The last block lets the CLS token (the query / state pattern) retrieve from the patch tokens (the
stored patterns, i.e. the memories of a U-Hop layer). With ``depth > 1`` the blocks before it are
self-association blocks over all tokens (each token a query over the patch tokens and CLS), so the
three-layer ViH refines the memories before the CLS read-out. Every block is pre-LayerNorm with a
residual connection and an MLP (``dim -> 4 dim -> dim``, GELU).

Patch size: the released code uses patch 32, which gives a 32x32 CIFAR image a single patch token
(the kernel then cannot change anything, U-Hop paper, Wu et al. 2024). Here CIFAR uses patch 4 (64 memories per
image) and Tiny ImageNet patch 8 (64 memories per image).

Registered with timm: ``vih_patch4_32`` (one layer), ``vih3_patch4_32`` (three layers), and
``vih_patch8_64`` / ``vih3_patch8_64`` for 64x64 images; all dim 512 (the paper's width).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from einops import rearrange, repeat
from timm.models import build_model_with_cfg, register_model
from torch import Tensor, nn

from ..layers.registry import hopfield_layer
from ._cfgs import default_cfgs as default_cfgs_for, no_pretrained_weights

__all__ = ["ViH", "make_hopfield_layer"]


def make_hopfield_layer(attention: str, dim: int, num_heads: int, separation: Any, **options: Any) -> nn.Module:
    """A :class:`~hopformer.layers.Hopfield` for a layer spec (:mod:`hopformer.layers.registry`): ``attention``
    ``"hopfield"``, ``"kernelized"`` (U-Hop) or ``"continuous"``, any ``separation`` including ``"learnable"``;
    ``options`` are the spec's ``attn_kwargs``."""
    return hopfield_layer(dim, num_heads, attention, separation, options)


class _Block(nn.Module):
    """Pre-LN residual Hopfield association then MLP, for the CLS query or for every token."""

    def __init__(self, layer: nn.Module, dim: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_state, self.norm_stored, self.hopfield = nn.LayerNorm(dim), nn.LayerNorm(dim), layer
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, state: Tensor, stored: Tensor) -> Tensor:
        state = state + self.hopfield(self.norm_state(state), self.norm_stored(stored))
        return state + self.mlp(self.norm_mlp(state))


class ViH(nn.Module):
    """Vision Hopfield model: CLS query over patch memories.

    Args:
        img_size: side of the (square) input images.
        patch_size: side of the square patches; ``(img_size / patch_size)^2`` memories per image.
        in_chans: input channels.
        num_classes: classes of the linear head.
        embed_dim: token size (paper: 512).
        depth: Hopfield blocks (paper: 1; the three-layer variant: 3).
        num_heads: association heads of each Hopfield layer.
        attention: ``"hopfield"`` (MHM, dense or sparse), ``"kernelized"`` (U-Hop feature map) or
            ``"continuous"`` (continuous-time memory); see :mod:`hopformer.layers.registry`.
        separation: ``"softmax"`` (dense MHM), ``"sparsemax"`` (sparse MHM), ``"entmax15"``, a float
            alpha, or ``"learnable"`` (alpha-entmax with learned alpha).
        mlp_ratio: hidden size of the block MLPs relative to ``embed_dim``.
        dropout: dropout in the MLPs and before the head.
        attn_kwargs: further options of the Hopfield layers (``update_steps``, ``beta``, kernel options), the
            same vocabulary as the ViTs' and STanHop-Net's ``attn_kwargs``.
        layer_kwargs: the former name of ``attn_kwargs`` (still accepted).
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        embed_dim: int = 512,
        depth: int = 1,
        num_heads: int = 1,
        attention: str = "hopfield",
        separation: Any = "softmax",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_kwargs: Mapping[str, Any] | None = None,
        layer_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide img_size={img_size}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.img_size, self.patch_size, self.in_chans = (img_size, img_size), patch_size, in_chans
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches + 1, embed_dim) * 0.02)
        if attn_kwargs is not None and layer_kwargs is not None:
            raise ValueError("pass attn_kwargs or its former name layer_kwargs, not both")
        kw = dict(attn_kwargs if attn_kwargs is not None else layer_kwargs or {})
        self.blocks = nn.ModuleList(
            _Block(make_hopfield_layer(attention, embed_dim, num_heads, separation, **kw), embed_dim, mlp_ratio, dropout)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward_features(self, images: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> CLS token ``(B, dim)`` after the Hopfield blocks."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.in_chans, *self.img_size):
            raise ValueError(
                f"ViH expects images of shape (batch, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), "
                f"got {tuple(images.shape)}"
            )
        patches = rearrange(self.patch_embed(images), "b d h w -> b (h w) d")
        cls = repeat(self.cls_token, "1 1 d -> b 1 d", b=patches.shape[0])
        tokens = torch.cat([cls, patches], dim=1) + self.pos_embed
        for block in self.blocks[:-1]:
            tokens = block(tokens, tokens)
        cls = self.blocks[-1](tokens[:, :1], tokens[:, 1:])
        return rearrange(self.norm(cls), "b 1 d -> b d")

    def forward(self, images: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> logits ``(B, num_classes)``."""
        return self.head(self.head_drop(self.forward_features(images)))


def _vih(variant: str, pretrained: bool = False, **kwargs: Any) -> ViH:
    """Build ``variant`` through timm's ``build_model_with_cfg``: ``pretrained_cfg`` per data-set tag (see
    :mod:`hopformer.models._cfgs`); ``num_classes`` defaults to the tag's. ViH has no multi-scale features:
    ``features_only=True`` is refused with a pointer to what is supported."""
    if pretrained:
        raise no_pretrained_weights(variant)
    if kwargs.get("features_only"):
        raise ValueError(
            f"features_only=True is not supported by {variant}: a ViH reads out a single CLS token; use "
            "model.forward_features(images) for its (batch, embed_dim) features, or a Hopfield ViT "
            "(timm.list_models('hopfield_vit_*')), which supports features_only and forward_intermediates"
        )
    defaults = {k: v for k, v in VIH_MODELS[variant].items() if k != "num_classes"}  # num_classes: the tag's
    return build_model_with_cfg(ViH, variant, pretrained, **{**defaults, **kwargs})


VIH_MODELS: dict[str, dict[str, Any]] = {
    "vih_patch4_32": dict(img_size=32, patch_size=4, depth=1, num_classes=10),
    "vih3_patch4_32": dict(img_size=32, patch_size=4, depth=3, num_classes=10),
    "vih_patch8_64": dict(img_size=64, patch_size=8, depth=1, num_classes=200),
    "vih3_patch8_64": dict(img_size=64, patch_size=8, depth=3, num_classes=200),
}
default_cfgs = default_cfgs_for(VIH_MODELS, first_conv="patch_embed")  # read by timm's register_model


@register_model
def vih_patch4_32(pretrained: bool = False, **kwargs) -> ViH:
    """One-layer ViH (dim 512), 32x32 images, patch 4 (64 memories)."""
    return _vih("vih_patch4_32", pretrained, **kwargs)


@register_model
def vih3_patch4_32(pretrained: bool = False, **kwargs) -> ViH:
    """Three-layer ViH (dim 512), 32x32 images, patch 4."""
    return _vih("vih3_patch4_32", pretrained, **kwargs)


@register_model
def vih_patch8_64(pretrained: bool = False, **kwargs) -> ViH:
    """One-layer ViH (dim 512), 64x64 images (Tiny ImageNet), patch 8 (64 memories)."""
    return _vih("vih_patch8_64", pretrained, **kwargs)


@register_model
def vih3_patch8_64(pretrained: bool = False, **kwargs) -> ViH:
    """Three-layer ViH (dim 512), 64x64 images, patch 8."""
    return _vih("vih3_patch8_64", pretrained, **kwargs)
