"""The one-retrieval-core architecture (issue 10): old checkpoints give the same numbers, everything pickles.

``tests/fixtures/layer_oracle.json`` was written by the classes *before* the refactor (variant classes,
``hopfield=``/``hopfield_kwargs`` STanHop vocabulary) with ``tests/fixtures/make_layer_oracle.py``, which runs
only on a checkout of b743f4d (``git worktree add /tmp/old b743f4d``, then
``PYTHONPATH=/tmp/old python tests/fixtures/make_layer_oracle.py``). For every layer configuration and a
small model of every kind it holds the old state dict's keys and shapes, the buffers fixed at construction,
and checksums of the outputs, associations and energies, with every parameter and input set by the closed
forms of ``tests/layer_oracle.py``. Here the same state dict, under the old key names, is loaded (strictly)
into the module built with today's constructor arguments and must give the same checksums in float64.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
from pathlib import Path

import pytest
import timm
import torch
from layer_oracle import DIM, HEADS, STANHOP, VIH, VIT, checksum, filled_state, inputs_for, mismatches, parse_state, run
from torch import nn

import hopformer.layers as L
import hopformer.models  # noqa: F401  (registers the timm models)
from hopformer.layers import Hopfield, HopfieldAttention, MultiheadHopfield
from hopformer.models import STanHopNet

ORACLE = Path(__file__).parent / "fixtures" / "layer_oracle.json"
SEPS = {"softmax": "softmax", "sparsemax": "sparsemax", "entmax15": "entmax15", "alpha1.3": 1.3}


def _builders() -> dict:
    """Oracle case name -> builder with today's constructor arguments (no variant classes)."""
    b = {}
    for key, sep in SEPS.items():
        b[f"hopfield/plain/{key}"] = lambda sep=sep: Hopfield(DIM, HEADS, separation=sep)
        b[f"hopfield/kernelized/{key}"] = lambda sep=sep: Hopfield(DIM, HEADS, separation=sep, kernel_dim=12)
        b[f"attention/plain/{key}"] = lambda sep=sep: HopfieldAttention(DIM, HEADS, qkv_bias=True, separation=sep)
        b[f"attention/kernelized/{key}"] = lambda sep=sep: HopfieldAttention(DIM, HEADS, qkv_bias=True, separation=sep,
                                                                             kernelized=True)
        b[f"multihead/plain/{key}"] = lambda sep=sep: MultiheadHopfield(DIM, HEADS, batch_first=True, separation=sep)
        b[f"multihead/kernelized/{key}"] = lambda sep=sep: MultiheadHopfield(DIM, HEADS, batch_first=True,
                                                                             separation=sep, kernelized=True)
    b.update({
        "hopfield/plain/learnable": lambda: Hopfield(DIM, HEADS, separation="learnable", alpha=1.4),
        "hopfield/plain/learnable_per_head": lambda: Hopfield(DIM, HEADS, separation="learnable", alpha_per_head=True),
        "hopfield/plain/sparse_class": lambda: Hopfield(DIM, HEADS, separation="sparsemax"),
        "hopfield/plain/generalized_fixed": lambda: Hopfield(DIM, HEADS, separation=1.2),
        "hopfield/plain/steps_beta": lambda: Hopfield(DIM, HEADS, separation="entmax15", update_steps=3,
                                                      learnable_beta=True, beta=0.7),
        "hopfield/plain/cross_dims": lambda: Hopfield(DIM, HEADS, stored_dim=6, value_dim=5, head_dim=3, out_dim=7),
        "hopfield/plain/no_project": lambda: Hopfield(DIM, HEADS, separation="sparsemax", project=False),
        "hopfield/kernelized/learnable": lambda: Hopfield(DIM, HEADS, separation="learnable", alpha=1.6, kernel_dim=12),
        "hopfield/kernelized/cross_dims": lambda: Hopfield(DIM, HEADS, stored_dim=6, kernel_dim=10),
        "hopfield/kernelized/no_project": lambda: Hopfield(DIM, HEADS, kernel_dim=12, project=False,
                                                           separation="entmax15", feature_init="gaussian"),
        "hopfield/continuous/softmax": lambda: Hopfield(DIM, HEADS, memory={"num_basis": 3}),
        "hopfield/continuous/gaussian": lambda: Hopfield(DIM, HEADS, update_steps=2, memory=L.ContinuousMemory(
            4, basis="gaussian", num_points=50)),
        "attention/plain/learnable": lambda: HopfieldAttention(DIM, HEADS, separation="learnable", alpha=1.3),
        "attention/plain/qk_norm_beta": lambda: HopfieldAttention(DIM, HEADS, qk_norm=True, norm_layer=nn.LayerNorm,
                                                                  learnable_beta=True, update_steps=2,
                                                                  separation="sparsemax"),
        "attention/kernelized/wide": lambda: HopfieldAttention(DIM, HEADS, qkv_bias=True, kernel_dim=12,
                                                               separation="entmax15"),
        "attention/continuous/softmax": lambda: HopfieldAttention(DIM, HEADS, qkv_bias=True, memory={"num_basis": 3}),
        "multihead/plain/bias_kv_beta": lambda: MultiheadHopfield(DIM, HEADS, batch_first=True, add_bias_kv=True,
                                                                  add_zero_attn=True, learnable_beta=True,
                                                                  update_steps=2, vdim=5),
    })
    for attention, separation in [("hopfield", "softmax"), ("hopfield", "learnable"), ("kernelized", "sparsemax"),
                                  ("continuous", "softmax")]:
        extra = {"num_basis": 4} if attention == "continuous" else {}
        b[f"model/vit/{attention}-{separation}"] = lambda a=attention, s=separation, e=extra: timm.create_model(
            "hopfield_vit_nano_patch2_8", attention=a, separation=s, attn_kwargs=e, **VIT)
    for attention, separation in [("hopfield", "softmax"), ("hopfield", "learnable"), ("kernelized", "entmax15")]:
        b[f"model/vih/{attention}-{separation}"] = lambda a=attention, s=separation: timm.create_model(
            "vih_patch4_32", attention=a, separation=s, **VIH)
    # the old STanHop vocabulary mapped to the new one (docs/ARCHITECTURE.md)
    for old, spec in [("generalized", {}), ("dense", {"separation": "softmax"}),
                      ("sparse", {"separation": "sparsemax"}),
                      ("kernelized", {"attention": "kernelized", "separation": "softmax"}),
                      ("kernelized+learnable", {"attention": "kernelized"}),
                      ("continuous", {"attention": "continuous", "separation": "softmax",
                                      "attn_kwargs": {"num_basis": 2}})]:
        b[f"model/stanhop/{old}"] = lambda spec=spec: STanHopNet(**STANHOP, **spec)
    return b


BUILDERS = _builders()
CASES = json.loads(ORACLE.read_text())["cases"]


def test_every_oracle_case_has_a_builder():
    assert sorted(CASES) == sorted(BUILDERS)
    assert ORACLE.stat().st_size < 150_000


def test_checksums_catch_one_entry_and_a_swap():
    x = torch.sin(torch.arange(24, dtype=torch.float64)).reshape(2, 3, 4)
    expected = checksum(x)
    assert mismatches(checksum(x * (1 + 1e-12)), expected) == []
    nudged, swapped = x.clone(), x.clone()
    nudged[1, 2, 0] += 1e-7
    swapped[0, 1, [0, 3]] = swapped[0, 1, [3, 0]]
    assert mismatches(checksum(nudged), expected) != []
    assert [m for m in mismatches(checksum(swapped), expected) if m.startswith("wsum")]


def _today_names(module: nn.Module, keys_shapes: list[tuple[str, tuple]]) -> dict[str, str]:
    """Old state key -> today's (``retrieval.alpha.logit`` for ``alpha.logit``, ...): load the ``i``-th old
    key filled with ``i`` and read where each number went."""
    module.load_state_dict({key: torch.full(shape, float(i), dtype=torch.float64)
                            for i, (key, shape) in enumerate(keys_shapes)})
    return {keys_shapes[int(value.reshape(-1)[0])][0]: key for key, value in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_old_state_dict_gives_the_same_numbers(name):
    case = CASES[name]
    keys_shapes = parse_state(case["state"])
    kept = {key: torch.tensor(values, dtype=torch.float64).reshape(dict(keys_shapes)[key])
            for key, values in case["kept"].items()}
    torch.manual_seed(0)
    module = BUILDERS[name]().double().eval()
    fresh = {key: value.clone() for key, value in module.state_dict().items()}
    names = _today_names(module, keys_shapes)  # strict: old keys (alpha.logit, beta.log_beta, ...) still load
    assert sorted(names.values()) == sorted(fresh)
    for key, value in kept.items():  # buffers fixed at construction: today's are the old ones
        torch.testing.assert_close(fresh[names[key]], value, atol=0, rtol=0, msg=f"{name}: {key}")
    module.load_state_dict(filled_state(keys_shapes, kept))
    with torch.no_grad():
        outputs = run(name, module, inputs_for(name))
    assert sorted(outputs) == sorted(case["outputs"])
    problems = [f"{key}: {problem}" for key, expected in case["outputs"].items()
                for problem in mismatches(checksum(outputs[key]), expected)]
    assert not problems, f"{name}: " + "; ".join(problems)


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    via_torch = torch.load(buffer, weights_only=False)
    return via_torch, pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_layer_configuration_and_model_pickles(name):
    torch.manual_seed(0)
    module = BUILDERS[name]().double().eval()
    inputs = inputs_for(name)
    with torch.no_grad():
        expected = run(name, module, inputs)
        for copy in _roundtrip(module):
            got = run(name, copy.eval(), inputs)
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)


def _registered_models() -> list[str]:
    return sorted(set(timm.list_models("hopfield_vit_*")) | set(timm.list_models("vih*")))


@pytest.mark.parametrize("model_name", _registered_models())
@pytest.mark.parametrize("attention", ["hopfield", "kernelized", "continuous"])
def test_every_registered_model_pickles(model_name, attention):
    small = (dict(embed_dim=16, depth=1, num_heads=2) if model_name.startswith("hopfield_vit")
             else dict(embed_dim=8, depth=1, num_heads=2))
    separation = "softmax" if attention == "continuous" else "learnable"
    kwargs = {"attn_kwargs": {"num_basis": 4}} if attention == "continuous" else {}
    torch.manual_seed(0)
    model = timm.create_model(model_name, attention=attention, separation=separation, **small, **kwargs).eval()
    x = torch.randn(1, model.in_chans if hasattr(model, "in_chans") else 3,
                    *(model.patch_embed.img_size if hasattr(model.patch_embed, "img_size") else model.img_size))
    with torch.no_grad():
        expected = model(x)
        for copy in _roundtrip(model):
            torch.testing.assert_close(copy.eval()(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("spec", [dict(attention="hopfield"), dict(separation="softmax"), dict(separation="sparsemax"),
                                  dict(attention="kernelized"), dict(attention="kernelized", separation="entmax15"),
                                  dict(attention="continuous", separation="softmax")], ids=repr)
def test_stanhop_pickles_for_every_attention_kind(spec):
    torch.manual_seed(0)
    net = STanHopNet(**STANHOP, **spec).eval()
    x = torch.randn(2, STANHOP["input_len"], STANHOP["num_series"])
    with torch.no_grad():
        expected = net(x)
        for copy in _roundtrip(net):
            torch.testing.assert_close(copy(x), expected, atol=0, rtol=0)


# -- any combination is constructor arguments ------------------------------------------------------------
@pytest.mark.parametrize("interface", ["hopfield", "attention", "multihead"])
@pytest.mark.parametrize("attention", ["hopfield", "kernelized", "continuous"])
@pytest.mark.parametrize("separation", ["softmax", "sparsemax", 1.3, "learnable"])
def test_every_combination_builds_from_one_registry(interface, attention, separation):
    if attention == "continuous" and separation != "softmax":
        with pytest.raises(ValueError, match="separation must be 'softmax'"):
            L.check_spec(attention, separation)
        return
    torch.manual_seed(0)
    x = torch.randn(2, 5, DIM)
    spec = dict(attention=attention, separation=separation, attn_kwargs={"num_basis": 3} if attention == "continuous"
                else None)
    if interface == "hopfield":
        layer = L.hopfield_layer(DIM, HEADS, **spec)
        out = layer(x)
    elif interface == "attention":
        factory = L.attention_layer(**spec)
        assert isinstance(factory, functools.partial) and factory.func is HopfieldAttention
        layer = factory(DIM, HEADS)
        out = layer(x)
    else:
        layer = L.multihead_layer(DIM, HEADS, batch_first=True, **spec)
        out, _ = layer(x, x, x)
    assert type(layer) in (Hopfield, HopfieldAttention, MultiheadHopfield)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (layer.feature_map is not None) == (attention == "kernelized")
    assert (layer.retrieval.memory is not None) == (attention == "continuous")
    assert (layer.retrieval.alpha is not None) == (separation == "learnable")
    out.sum().backward()
    if separation == "learnable":
        assert layer.retrieval.alpha.logit.grad is not None


def test_no_variant_subclasses_and_named_layers_are_factories():
    interfaces = (Hopfield, HopfieldAttention, MultiheadHopfield)
    for name in ("SparseHopfield", "GeneralizedSparseHopfield", "KernelizedHopfield", "ContinuousHopfield",
                 "KernelizedHopfieldAttention", "ContinuousHopfieldAttention", "KernelizedMultiheadHopfield",
                 "ContinuousMultiheadHopfield"):
        factory = getattr(L, name)
        assert not isinstance(factory, type), name
        assert factory.__doc__, name
        layer = factory(DIM, HEADS)
        assert type(layer) in interfaces, name
    assert sorted(L.__all__) == sorted(set(L.__all__))
    assert all(hasattr(L, n) for n in L.__all__)


@pytest.mark.parametrize("kwargs, match", [
    (dict(attention="linear"), r"attention must be one of \['hopfield', 'kernelized', 'continuous'\], got 'linear'"),
    (dict(separation="softmx"), r"separation must be one of .*'learnable'.* got 'softmx'"),
    (dict(separation=2.5), r"separation must be .*alpha in \[1, 2\], got 2.5"),
    (dict(attn_kwargs={"kernel_dim": 8}),
     r"attn_kwargs: unexpected keyword argument 'kernel_dim' \(not an option of attention='hopfield'\)"),
    (dict(attention="continuous", separation="softmax", attn_kwargs={"num_basis": 2, "bases": 3}),
     r"'bases'.*valid: \[.*'num_basis'"),
    (dict(attn_kwargs={"separation": "softmax"}), r"'separation' is set by the spec"),
])
def test_registry_errors_name_the_key_and_the_choices(kwargs, match):
    error = TypeError if "attn_kwargs" in kwargs and "separation" not in kwargs["attn_kwargs"] else ValueError
    with pytest.raises(error, match=match):
        L.check_spec(**kwargs)
    with pytest.raises(error, match=match):
        STanHopNet(**STANHOP, **kwargs)


def test_checks_are_one_module():
    from hopformer.checks import positive_float, positive_int, probability

    assert positive_int("n", 3) == 3 and positive_float("x", 2) == 2.0 and probability("p", 0.5) == 0.5
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=rf"n must be a positive integer, got {bad!r}"):
            positive_int("n", bad)
    with pytest.raises(ValueError, match="k must be an integer >= 2, got 1"):
        positive_int("k", 1, minimum=2)
    with pytest.raises(ValueError, match=r"x must be a positive finite number, got inf"):
        positive_float("x", float("inf"))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        probability("p", 1.0)


def test_architecture_doc_examples_run():
    """docs/ARCHITECTURE.md's Python examples (every combination as arguments; a new memory) run as written."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    for index, block in enumerate(blocks):
        exec(compile(block, f"ARCHITECTURE.md python block {index}", "exec"), {"__name__": "architecture_doc"})  # noqa: S102
