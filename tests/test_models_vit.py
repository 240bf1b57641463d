"""Hopfield ViTs (timm registry) and ViH."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from hopformer.functional import separate
from hopformer.layers import Hopfield, HopfieldAttention, UHopFeatureMap, uhop_modules
from hopformer.models import HOPFIELD_VIT_MODELS, ViH, load_vit_state_dict
from hopformer.models.vit import hopfield_attn_layer

SMALL = dict(depth=2)  # keep the 12-block models cheap in tests


@pytest.mark.parametrize("name", sorted(HOPFIELD_VIT_MODELS))
def test_registered_and_sized(name):
    cfg = HOPFIELD_VIT_MODELS[name]
    model = timm.create_model(name, num_classes=7, **SMALL).eval()
    x = torch.randn(2, cfg.get("in_chans", 3), cfg["img_size"], cfg["img_size"])
    assert model(x).shape == (2, 7)
    assert isinstance(model.blocks[0].attn, HopfieldAttention)
    tokens = (cfg["img_size"] // cfg["patch_size"]) ** 2
    assert model.patch_embed.num_patches == tokens


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax15", 1.3, "learnable"])
def test_separations(separation):
    model = timm.create_model("hopfield_vit_tiny_patch4_32", separation=separation, num_classes=10, **SMALL)
    attn = model.blocks[0].attn
    x = torch.randn(2, 65, 192)
    out, assoc = attn(x, return_association=True)
    assert out.shape == (2, 65, 192)
    # The association is the configured separation of the scaled scores (reference: the map itself on
    # q k^T / sqrt(d) computed here from the qkv projection), and the output reads out the values with it.
    q, k, v = attn.qkv(x).reshape(2, 65, 3, 3, 64).permute(2, 0, 3, 1, 4)
    alpha = {"softmax": 1.0, "sparsemax": 2.0, "entmax15": 1.5, 1.3: 1.3}.get(separation)
    expected = separate(q @ k.transpose(-1, -2) / 8.0, attn.current_separation() if alpha is None else alpha)
    torch.testing.assert_close(assoc, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, attn.proj((assoc @ v).transpose(1, 2).reshape(2, 65, 192)), atol=1e-5, rtol=1e-4)
    if separation in ("softmax", "sparsemax", "entmax15"):  # alpha near 1 need not reach exact zeros
        assert bool((assoc == 0).any()) == (separation != "softmax")
    if separation == "learnable":
        assert 1.0 < float(attn.current_separation().detach()) < 2.0
        out.sum().backward()
        assert attn.alpha.logit.grad is not None


def test_plain_timm_vit_checkpoint_loads_and_matches():
    torch.manual_seed(0)
    cfg = {**HOPFIELD_VIT_MODELS["hopfield_vit_tiny_patch4_32"], **SMALL}
    plain = VisionTransformer(**cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    hop = timm.create_model("hopfield_vit_tiny_patch4_32", **SMALL).eval()
    hop.load_state_dict(plain.state_dict())  # strict
    torch.testing.assert_close(hop(x), plain(x), rtol=1e-5, atol=1e-5)
    sparse = timm.create_model("hopfield_vit_tiny_patch4_32", separation="sparsemax", **SMALL)
    sparse.load_state_dict(plain.state_dict())
    for kwargs, new in [({"separation": "learnable"}, "alpha.logit"), ({"attention": "kernelized"}, "feature_map.weight"),
                        ({"attn_kwargs": {"learnable_beta": True}}, "beta.log_beta")]:
        model = timm.create_model("hopfield_vit_tiny_patch4_32", **kwargs, **SMALL)
        missing = load_vit_state_dict(model, plain.state_dict())
        assert missing and all(k.endswith(new) for k in missing)
        torch.testing.assert_close(model.blocks[1].attn.qkv.weight, plain.blocks[1].attn.qkv.weight)


def test_load_vit_state_dict_rejects_other_shapes():
    plain = VisionTransformer(**{**HOPFIELD_VIT_MODELS["hopfield_vit_tiny_patch4_32"], **SMALL})
    model = timm.create_model("hopfield_vit_tiny_patch4_32", depth=3)
    with pytest.raises(ValueError, match="missing"):
        load_vit_state_dict(model, plain.state_dict())


def test_kernelized_vit_has_uhop_layers():
    model = timm.create_model("hopfield_vit_tiny_patch4_32", attention="kernelized", separation="sparsemax", **SMALL)
    assert len(uhop_modules(model)) == 2
    assert isinstance(model.blocks[0].attn, HopfieldAttention)
    assert isinstance(model.blocks[0].attn.feature_map, UHopFeatureMap)
    model.blocks[0].attn.cache_memories = True
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    assert model.blocks[0].attn.cached_memories.shape == (3, 65, 192)
    assert model.blocks[0].attn.separation_loss().dim() == 0


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="attention"):
        hopfield_attn_layer("quantum")
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("hopfield_vit_tiny_patch4_32", pretrained=True)
    with pytest.raises(ValueError, match="separation"):
        timm.create_model("hopfield_vit_nano_patch2_8", separation="softermax")


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("attention", ["hopfield", "kernelized"])
def test_vih(depth, attention):
    model = timm.create_model("vih_patch4_32" if depth == 1 else "vih3_patch4_32", attention=attention,
                              separation="sparsemax", num_classes=10, embed_dim=64)
    assert isinstance(model, ViH) and model.num_patches == 64 and len(model.blocks) == depth
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    if attention == "kernelized":
        layers = uhop_modules(model)
        assert len(layers) == depth and all(isinstance(m, Hopfield) and isinstance(m.feature_map, UHopFeatureMap) for m in layers)
        layers[-1].cache_memories = True
        model(torch.randn(2, 3, 32, 32))
        assert layers[-1].cached_memories.shape == (2, 64, 64)  # the 64 patch tokens are the memories


def test_vih_tiny_imagenet_and_shape_errors():
    model = timm.create_model("vih_patch8_64", embed_dim=32)
    assert model.num_patches == 64 and model(torch.randn(1, 3, 64, 64)).shape == (1, 200)
    with pytest.raises(ValueError, match=r"\(batch, 3, 64, 64\)"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="patch_size"):
        ViH(img_size=32, patch_size=5)


def test_vih_learns_a_toy_task():
    """CLS-query retrieval can read out which patch holds a bright square (loss drops clearly)."""
    torch.manual_seed(0)
    model = ViH(img_size=8, patch_size=4, in_chans=1, num_classes=4, embed_dim=32)
    x = torch.zeros(64, 1, 8, 8)
    y = torch.randint(0, 4, (64,))
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 1.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
