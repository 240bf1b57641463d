"""The Hopfield ViTs and ViH are timm-native: pretrained_cfg, features_only, forward_intermediates, registry."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.data import create_transform, resolve_model_data_config
from timm.models.vision_transformer import VisionTransformer

import hopformer
from hopformer.models import HOPFIELD_VIT_MODELS, load_vit_state_dict
from hopformer.models import vih, vit

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = dict(input_size=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), num_classes=10)
CIFAR100 = dict(input_size=(3, 32, 32), mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), num_classes=100)
TINY = dict(input_size=(3, 64, 64), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=200)
DIGITS = dict(input_size=(1, 8, 8), mean=(0.5,), std=(0.5,), num_classes=10)
# Written out here, not imported: the data config each registered name must report.
EXPECTED = {
    "hopfield_vit_nano_patch2_8": DIGITS,
    "hopfield_vit_mini_patch4_32": CIFAR10,
    "hopfield_vit_tiny_patch4_32": CIFAR10,
    "hopfield_vit_small_patch4_32": CIFAR10,
    "hopfield_vit_tiny_patch8_64": TINY,
    "hopfield_vit_small_patch8_64": TINY,
    "hopfield_vit_tiny_patch4_32.cifar100": CIFAR100,
    "vih_patch4_32": CIFAR10,
    "vih3_patch4_32": CIFAR10,
    "vih_patch8_64": TINY,
    "vih3_patch8_64.cifar100": None,  # no such tag: 64 px models have Tiny ImageNet's only
    "vih_patch4_32.cifar100": CIFAR100,
}
SMALL = dict(depth=1)


def _small(name: str) -> dict:
    return dict(depth=1, embed_dim=32) if name.startswith("vih") else dict(SMALL)


def _run(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` importing this checkout's hopformer (not an installed one)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_resolve_model_data_config(name):
    expected = EXPECTED[name]
    if expected is None:
        with pytest.raises(RuntimeError, match="cifar100"):
            timm.create_model(name, **_small(name))
        return
    model = timm.create_model(name, **_small(name))
    config = resolve_model_data_config(model)
    assert config["input_size"] == expected["input_size"]
    torch.testing.assert_close(torch.tensor(config["mean"]), torch.tensor(expected["mean"]))
    torch.testing.assert_close(torch.tensor(config["std"]), torch.tensor(expected["std"]))
    assert config["crop_pct"] == 1.0
    assert model.num_classes == expected["num_classes"]  # the tag's class count is the default
    assert model.pretrained_cfg["first_conv"] in dict(model.named_modules())
    assert model.pretrained_cfg["classifier"] == "head"


def test_data_config_matches_the_data_modules(tmp_path):
    """Every tag is a data module's name and reports its statistics; timm's eval transform gives its pixels."""
    from PIL import Image

    from hopformer.data.images import CIFAR10DataModule, IMAGE_DATAMODULES

    tags = timm.list_models("hopfield_*", include_tags=True) + timm.list_models("vih*", include_tags=True)
    assert len(tags) == 15
    for name in tags:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        module = IMAGE_DATAMODULES[name.split(".")[1]]
        assert cfg["input_size"] == (module.num_channels, module.image_size, module.image_size), name
        assert (cfg["mean"], cfg["std"], cfg["num_classes"]) == (tuple(module.mean), tuple(module.std), module.num_classes)
    (tmp_path / "cifar-10-batches-py").mkdir()
    data = CIFAR10DataModule(root=str(tmp_path))
    model = timm.create_model("hopfield_vit_tiny_patch4_32", **SMALL)
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    ours = data.eval_transform()(image)
    torch.testing.assert_close(create_transform(**resolve_model_data_config(model))(image), ours)


def test_user_overrides_and_timm_bookkeeping():
    model = timm.create_model("hopfield_vit_tiny_patch4_32", img_size=16, in_chans=1, num_classes=3,
                              pretrained_cfg_overlay=dict(crop_pct=0.5), cache_dir="/nonexistent", **SMALL)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    assert model.pretrained_cfg["crop_pct"] == 0.5
    assert timm.models.get_model_input_config(model)["input_size"] == (1, 16, 16)
    tagged = timm.create_model("hopfield_vit_tiny_patch4_32", pretrained_cfg="cifar100", **SMALL)
    assert tagged.num_classes == 100 and tagged.pretrained_cfg["tag"] == "cifar100"


def test_features_only():
    torch.manual_seed(0)
    feats = timm.create_model("hopfield_vit_tiny_patch4_32", features_only=True, depth=4).eval()
    x = torch.randn(2, 3, 32, 32)
    out = feats(x)
    assert [tuple(o.shape) for o in out] == [(2, 192, 8, 8)] * 3  # the last three blocks, as timm's ViTs
    assert feats.feature_info.channels() == [192] * 3 and feats.feature_info.reduction() == [4] * 3
    assert len(feats.model.blocks) == 4
    full = timm.create_model("hopfield_vit_tiny_patch4_32", depth=4).eval()
    full.load_state_dict(feats.model.state_dict(), strict=False)
    expected = full.forward_intermediates(x, indices=3, intermediates_only=True)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want)
    picked = timm.create_model("hopfield_vit_tiny_patch4_32", features_only=True, out_indices=(0, 2), depth=4)
    assert len(picked(x)) == 2
    nano = timm.create_model("hopfield_vit_nano_patch2_8", features_only=True)  # depth 2: both blocks
    assert [tuple(o.shape) for o in nano(torch.randn(2, 1, 8, 8))] == [(2, 64, 4, 4)] * 2


def test_forward_intermediates_runs_the_hopfield_blocks():
    model = timm.create_model("hopfield_vit_tiny_patch4_32", separation="sparsemax", depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    final, intermediates = model.forward_intermediates(x)
    assert final.shape == (2, 65, 192) and [tuple(t.shape) for t in intermediates] == [(2, 192, 8, 8)] * 2
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(model.forward_head(final), model(x))
    tokens = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=False)
    block = model.blocks[0]
    start = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    torch.testing.assert_close(tokens[0], block(start)[:, 1:])


def test_vih_features_only_says_what_is_supported():
    with pytest.raises(ValueError, match="features_only=True is not supported by vih_patch4_32.*forward_features"):
        timm.create_model("vih_patch4_32", features_only=True)


@pytest.mark.parametrize("name", ["hopfield_vit_tiny_patch4_32", "vih_patch8_64"])
def test_pretrained_true_is_a_clear_error(name):
    with pytest.raises(ValueError, match=f"pretrained=True: no pretrained weights are hosted for '{name}'"):
        timm.create_model(name, pretrained=True)


def test_pretrained_error_recipe_fits():
    """The recipe the error gives: a timm ViT of the same shape loads with load_vit_state_dict."""
    with pytest.raises(ValueError, match="load_vit_state_dict") as err:
        timm.create_model("hopfield_vit_tiny_patch4_32", pretrained=True)
    args = dict(re.findall(r"(img_size|patch_size|num_classes)=(\d+)", str(err.value)))
    plain = timm.create_model("vit_tiny_patch16_224", **{k: int(v) for k, v in args.items()}, **SMALL)
    model = timm.create_model("hopfield_vit_tiny_patch4_32", separation="learnable", **SMALL)
    assert load_vit_state_dict(model, plain.state_dict()) == ["blocks.0.attn.retrieval.alpha.logit"]


def test_import_hopformer_registers_and_imports_no_lightning():
    code = (
        "import sys, hopformer, timm\n"
        "assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules, 'Lightning imported'\n"
        "m = timm.create_model('hopfield_vit_tiny_patch4_32', depth=1)\n"
        "print(type(m).__name__, sorted(timm.list_models('hopfield_*')))\n"
        "from hopformer import (Hopfield, SparseHopfield, GeneralizedSparseHopfield, HopfieldAttention,\n"
        "    MultiheadHopfield, HopfieldPooling, HopfieldLayer, KernelizedHopfield, ContinuousHopfield)\n"
        "assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules, 'Lightning imported'\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(" ", 1) == ["VisionTransformer", f"{sorted(HOPFIELD_VIT_MODELS)}\n"]


def test_top_level_names_are_the_layers():
    import hopformer.layers as layers

    names = getattr(layers, "__all__", None) or [n for n in hopformer.__all__ if n not in ("set_num_workers", "get_num_workers")]
    assert {"Hopfield", "SparseHopfield", "GeneralizedSparseHopfield", "HopfieldAttention", "MultiheadHopfield",
            "HopfieldPooling", "HopfieldLayer", "KernelizedHopfield", "ContinuousHopfield"} <= set(names)
    for name in names:
        assert getattr(hopformer, name) is getattr(layers, name), name
    assert callable(hopformer.set_num_workers) and hopformer.get_num_workers() >= 1


def test_registered_names_are_the_documented_tables():
    rows = re.findall(r"^\| ``(\w+)`` \| (\d+)[^|]*\| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", vit.__doc__, re.M)
    assert {r[0] for r in rows} == set(timm.list_models("hopfield_*")) == set(HOPFIELD_VIT_MODELS)
    for name, image, patch, tokens, dim, depth, heads in rows:
        with torch.device("meta"):  # shapes only
            model = timm.create_model(name)
        assert isinstance(model, VisionTransformer)
        assert (model.patch_embed.img_size, model.patch_embed.patch_size) == ((int(image),) * 2, (int(patch),) * 2)
        assert (model.patch_embed.num_patches, model.embed_dim, len(model.blocks)) == (int(tokens), int(dim), int(depth))
        assert model.blocks[0].attn.num_heads == int(heads)
    documented = set(re.findall(r"``(vih\w+)``", vih.__doc__))
    assert documented == set(timm.list_models("vih*"))


def test_classification_module_reads_the_input_size_from_timm():
    from hopformer.data import DigitsDataModule
    from hopformer.training import ClassificationModule

    data = DigitsDataModule()
    module = ClassificationModule("hopfield_vit_nano_patch2_8")
    assert tuple(module.example_input_array.shape) == (1, 1, 8, 8)
    module.check_datamodule(data)
    resized = ClassificationModule("hopfield_vit_tiny_patch4_32", backbone_kwargs=dict(img_size=8, in_chans=1, patch_size=2, depth=1))
    resized.check_datamodule(data)
    # A fixed-size timm model without a ``patch_embed.img_size``: its pretrained_cfg says 224x224.
    mixer = ClassificationModule("mixer_s16_224")
    assert tuple(mixer.example_input_array.shape) == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="image size mismatch: model 'mixer_s16_224' accepts 224x224 images.*8x8"):
        mixer.check_datamodule(data)
    vit224 = ClassificationModule("vit_tiny_patch16_224", backbone_kwargs=dict(depth=1))
    assert tuple(vit224.example_input_array.shape) == (1, 3, 224, 224)
    resnet = ClassificationModule("resnet18")  # any size: no size check, no example input; 3 channels
    assert resnet.example_input_array is None
    with pytest.raises(ValueError, match="channel mismatch"):
        resnet.check_datamodule(data)


def test_training_docs_timm_example_runs():
    """The python example of docs/training.md's "Models" section runs as written."""
    text = (ROOT / "docs" / "training.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "resolve_model_data_config" in b]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "docs/training.md timm example", "exec"), namespace)  # noqa: S102
    assert [tuple(m.shape) for m in namespace["maps"]] == [(2, 192, 8, 8)] * 2
    assert namespace["config"]["mean"] == (0.5071, 0.4865, 0.4409)
