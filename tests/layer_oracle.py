"""The layer oracle's closed forms: parameters, inputs, the outputs compared, and their checksums.

Shared by ``tests/fixtures/make_layer_oracle.py`` (which ran on the classes before the one-retrieval-core
refactor and wrote ``tests/fixtures/layer_oracle.json``) and ``tests/test_architecture.py`` (which runs
today's classes). No random numbers: every parameter and input is a formula of its position, so the same
module gets the same numbers on any torch version (up to the last bit of ``sin``), and the oracle stores
checksums instead of tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DIM, HEADS = 8, 2
VIT = dict(embed_dim=16, depth=1, num_heads=2, mlp_ratio=1.0)
VIH = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=8, num_heads=2, depth=2, num_classes=3)
STANHOP = dict(num_series=2, input_len=12, horizon=6, seg_len=6, d_model=8, num_heads=2, d_ff=8, num_router=2,
               dropout=0.0)
GOLDEN = math.pi * (3.0 - math.sqrt(5.0))  # golden angle: sin(GOLDEN * i) spreads evenly over [-1, 1]
GAIN = 1.2  # sparse maps: zeros in most configurations, yet more than one entry in most rows
FEATURE_MAP_GAIN = 2.0  # U-Hop feature maps (keys with "feature_map"): otherwise kernelized scores are flat
RTOL = 1e-9  # float64; today's classes reproduce the old checksums to 3e-16 (rounding of reordered sums)


def wave(index: int, shape) -> torch.Tensor:
    """``sin(GOLDEN * i + 0.7 * index + 1)`` over the flat position ``i``, reshaped (float64, in [-1, 1])."""
    shape = tuple(shape)
    flat = torch.sin(GOLDEN * torch.arange(math.prod(shape), dtype=torch.float64) + 0.7 * index + 1.0)
    return flat.reshape(shape)


def formula(index: int, shape, gain: float) -> torch.Tensor:
    """The ``index``-th state entry: ``gain * wave(index, shape) / sqrt(fan_in)``, ``fan_in`` the last dimension
    of a tensor with two or more (1 for vectors), so projections keep activations near unit scale."""
    shape = tuple(shape)
    fan_in = shape[-1] if len(shape) >= 2 else 1
    return (gain / math.sqrt(fan_in)) * wave(index, shape)


def filled_state(keys_shapes: list[tuple[str, tuple]], kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of the oracle: the ``i``-th key in sorted order is ``formula(i, shape, gain)`` unless kept
    (``gain`` is ``GAIN``, times ``FEATURE_MAP_GAIN`` for a feature map)."""
    return {key: kept[key] if key in kept else
            formula(i, shape, GAIN * (FEATURE_MAP_GAIN if "feature_map" in key else 1.0))
            for i, (key, shape) in enumerate(sorted(keys_shapes))}


def state_line(key: str, shape) -> str:
    """``"key 8x8"``: a state entry's line in the oracle (``"key "`` for a scalar)."""
    return f"{key} {'x'.join(map(str, shape))}"


def parse_state(lines: list[str]) -> list[tuple[str, tuple]]:
    """The ``(key, shape)`` pairs of ``state_line`` lines."""
    pairs = [line.rpartition(" ") for line in lines]
    return [(key, tuple(int(d) for d in dims.split("x")) if dims else ()) for key, _, dims in pairs]


def inputs_for(name: str) -> list[torch.Tensor]:
    """The inputs of case ``name``: ``wave(1000 + k, shape)`` for the ``k``-th."""
    if name.startswith("hopfield/"):
        stored_dim = 6 if "cross_dims" in name else DIM
        value_dim = 5 if name == "hopfield/plain/cross_dims" else stored_dim
        shapes = [(2, 4, DIM), (2, 5, stored_dim), (2, 5, value_dim)]
    elif name.startswith("attention/"):
        shapes = [(2, 5, DIM)]
    elif name.startswith("multihead/"):
        shapes = [(2, 4, DIM), (2, 5, DIM), (2, 5, 5 if "bias_kv" in name else DIM)]
    elif name.startswith("model/vit") or name.startswith("model/vih"):
        shapes = [(2, 1, 8, 8)]
    else:
        shapes = [(2, STANHOP["input_len"], STANHOP["num_series"])]
    return [wave(1000 + k, shape) for k, shape in enumerate(shapes)]


def run(name: str, module: nn.Module, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The outputs compared: forward output, association (where there is one) and energy."""
    if name.startswith("hopfield/"):
        state, stored, values = inputs
        out, assoc = module(state, stored, values, return_association=True)
        return {"out": out, "association": assoc, "energy": module.energy(state, stored)}
    if name.startswith("attention/"):
        out, assoc = module(inputs[0], return_association=True)
        return {"out": out, "association": assoc, "energy": module.energy(inputs[0])}
    if name.startswith("multihead/"):
        out, weights = module(*inputs, average_attn_weights=False)
        return {"out": out, "association": weights}
    return {"out": module(inputs[0])}


def checksum(x: torch.Tensor) -> dict:
    """Shape, sum, sum of |x|, sum of squares, max |x|, ``sum(x * cos(GOLDEN * i))`` (catches permutations)
    and four sampled entries ``[i, x_i]`` of the flattened float64 tensor."""
    flat = x.detach().to(torch.float64).reshape(-1)
    n = flat.numel()
    weight = torch.cos(GOLDEN * torch.arange(n, dtype=torch.float64))
    picks = sorted({0, n // 3, (2 * n) // 3, n - 1})
    return {"shape": list(x.shape), "sum": flat.sum().item(), "abs": flat.abs().sum().item(),
            "sq": flat.square().sum().item(), "max": flat.abs().max().item(), "wsum": (flat * weight).sum().item(),
            "samples": [[i, flat[i].item()] for i in picks]}


def mismatches(got: dict, expected: dict, rtol: float = RTOL) -> list[str]:
    """The checksum fields of ``got`` farther than ``rtol`` from ``expected``: linear fields relative to
    ``sum |x|``, entries relative to ``max |x|``, the sum of squares relative to itself."""
    if got["shape"] != expected["shape"]:
        return [f"shape {got['shape']} != {expected['shape']}"]
    scale = {"sum": expected["abs"], "abs": expected["abs"], "wsum": expected["abs"], "sq": 2 * expected["sq"],
             "max": expected["max"]}
    bad = [f"{k} {got[k]!r} != {expected[k]!r}" for k, s in scale.items()
           if not abs(got[k] - expected[k]) <= rtol * s + 1e-12]
    for (i, value), (j, want) in zip(got["samples"], expected["samples"]):
        if i != j or not abs(value - want) <= rtol * expected["max"] + 1e-12:
            bad.append(f"entry {j}: {value!r} != {want!r}")
    return bad
