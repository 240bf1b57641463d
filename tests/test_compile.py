"""`torch.compile` on the Hopfield layers and models: same outputs and gradients as eager.

Under `torch.compile` the sparse attention core is a `torch.library` custom op (one opaque node in the
compiled graph, CPU worker threads included); in eager mode the same implementation runs through a plain
autograd function (no dispatcher cost), so every comparison here is also one between those two paths. The
separation maps on materialised scores run eagerly behind a graph break. Compiling on CPU is slow, so the default suite compiles one tiny layer; every registered
model configuration is compiled in the tests marked slow.
"""

from __future__ import annotations

from typing import Callable

import pytest
import timm
import torch
from torch import nn

import hopformer.models  # noqa: F401  (registers the timm models)
from hopformer.functional._separated_attention import _EagerCore, _forward_op
import hopformer.functional._separated_attention as sa
from hopformer.layers import (
    ContinuousHopfield,
    GeneralizedSparseHopfield,
    HopfieldLayer,
    HopfieldPooling,
    KernelizedHopfield,
    MultiheadHopfield,
    SparseHopfield,
)
from hopformer.models import STanHopNet


def _compare(module: nn.Module, make_input: Callable[[], torch.Tensor], atol: float = 1e-5) -> None:
    """Forward and parameter gradients of `torch.compile(module)` equal the eager ones."""
    torch._dynamo.reset()
    x = make_input()
    eager = module(x)
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    compiled = torch.compile(module, dynamic=False)
    out = compiled(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, atol=atol, rtol=1e-4)
    assert grads, "no parameter received a gradient"
    for name, grad in grads.items():
        torch.testing.assert_close(dict(module.named_parameters())[name].grad, grad, atol=atol, rtol=1e-4, msg=name)


def test_custom_op_registration():
    """The block-wise sparse core passes torch.library's own checks (fake tensor, autograd, schema)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    beta = torch.full((2, 1, 1), 0.5, dtype=torch.float64, requires_grad=True)
    alpha = torch.full((2, 1, 1), 1.4, dtype=torch.float64, requires_grad=True)
    for a_t, a_f, kind in ((None, 2.0, "sparsemax"), (alpha, 0.0, "entmax")):
        torch.library.opcheck(_forward_op, (q, k, v, beta, a_t, a_f, None, kind, 1e-12, 60, 1.0),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("keep", [False, True], ids=["recomputed", "kept-weights"])
@pytest.mark.parametrize("kind", ["sparsemax", "entmax", "float alpha"])
def test_eager_core_equals_custom_op(kind, keep, monkeypatch):
    """The eager autograd function and the custom op (the compiled path) give the same output and gradients of
    q, k, v, beta and alpha (float64; bitwise when the eager forward keeps no weights: one implementation; to
    rounding when its backward reads the kept weights); a second derivative raises on both. "float alpha": a float
    beta and alpha, taken on the score matmuls (`q_scale`), no beta input."""
    kept = []
    if keep:
        real = sa._kept_weights
        monkeypatch.setattr(sa, "_kept_weights", lambda *a: kept.append(real(*a)) or kept[-1])
    else:
        monkeypatch.setattr(sa, "_kept_weights", lambda *a: None)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(3, 6, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    inputs += [torch.full((3, 1, 1), 0.7, dtype=torch.float64), torch.full((3, 1, 1), 1.4, dtype=torch.float64)]
    g = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    results = []
    for path in (lambda *a: _forward_op(*a)[0], _EagerCore.apply):
        q, k, v, beta, alpha = (t.clone().requires_grad_(True) for t in inputs)
        args = {"sparsemax": (beta, None, 2.0, "sparsemax", 1.0), "entmax": (beta, alpha, 0.0, "entmax", 1.0),
                "float alpha": (None, None, 1.4, "entmax", 0.7 * 0.4)}[kind]
        out = path(q, k, v, args[0], args[1], args[2], None, args[3], 1e-12, 60, args[4])
        wrt = [q, k, v] + [t for t in args[:2] if t is not None]
        grads = torch.autograd.grad(out, wrt, g, create_graph=True)
        results.append([out.detach()] + [t.detach() for t in grads])
        with pytest.raises(RuntimeError):
            torch.autograd.grad(grads[0].sum(), q)
    if keep:
        assert len(kept) == 1 and kept[0] is not None and kept[0].shape == (3, 6, 6)
    for a, b in zip(*results):
        if keep:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        else:
            assert torch.equal(a, b)


def test_compile_sparse_layer_matches_eager():
    """The smallest real case: a sparsemax layer, compiled, forward and backward (kept tiny: CPU compile)."""
    torch.manual_seed(0)
    layer = SparseHopfield(16, 2)
    _compare(layer, lambda: torch.randn(2, 7, 16))


LAYERS = {
    "entmax15": lambda: GeneralizedSparseHopfield(16, 2, learnable_alpha=False),
    "learnable_alpha": lambda: GeneralizedSparseHopfield(16, 2, alpha=1.3),
    "learnable_alpha_per_head_3_steps": lambda: GeneralizedSparseHopfield(16, 2, alpha=1.3, alpha_per_head=True,
                                                                          update_steps=3),
    "sparse_pooling": lambda: HopfieldPooling(16, 2, num_queries=2, separation="sparsemax"),
    "sparse_lookup": lambda: HopfieldLayer(16, 2, num_patterns=5, separation="entmax15"),
    "multihead_sparse": lambda: _SelfAttention(MultiheadHopfield(16, 2, batch_first=True, separation="sparsemax")),
    "kernelized_sparse": lambda: KernelizedHopfield(16, 2, separation="sparsemax"),
    "continuous": lambda: ContinuousHopfield(16, 2),
}


class _SelfAttention(nn.Module):
    """``nn.MultiheadAttention``-style call ``(x, x, x)`` -> output."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, x, x, need_weights=False)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_compile_layers(name):
    torch.manual_seed(0)
    _compare(LAYERS[name](), lambda: torch.randn(2, 7, 16))


VIT_CONFIGS = {
    "softmax": dict(separation="softmax"),
    "sparsemax": dict(separation="sparsemax"),
    "entmax15": dict(separation="entmax15"),
    "learnable": dict(separation="learnable"),
    "kernelized": dict(attention="kernelized"),
    "kernelized_sparsemax": dict(attention="kernelized", separation="sparsemax"),
    "continuous": dict(attention="continuous"),
}


@pytest.mark.parametrize("config", ["sparsemax", "learnable", "kernelized"])
def test_sparse_vit_traces_without_graph_breaks(config):
    """One graph for the whole model: no data-dependent check (alpha range, alpha == 1) breaks it while
    compiling (tracing only, no code generation: fast)."""
    torch._dynamo.reset()
    model = timm.create_model("hopfield_vit_nano_patch2_8", depth=1, **VIT_CONFIGS[config])
    explained = torch._dynamo.explain(model)(torch.randn(2, 1, 8, 8))
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(VIT_CONFIGS))
def test_compile_hopfield_vit(config):
    torch.manual_seed(0)
    model = timm.create_model("hopfield_vit_nano_patch2_8", depth=1, **VIT_CONFIGS[config])
    _compare(model, lambda: torch.randn(2, 1, 8, 8), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["hopfield", "kernelized"])
def test_compile_vih(attention):
    torch.manual_seed(0)
    model = timm.create_model("vih_patch4_32", img_size=8, patch_size=2, in_chans=1, embed_dim=16,
                              attention=attention, separation="sparsemax" if attention == "hopfield" else "softmax")
    _compare(model, lambda: torch.randn(2, 1, 8, 8), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("attention, separation", [("hopfield", "learnable"), ("hopfield", "softmax"),
                                                   ("hopfield", "sparsemax"), ("kernelized", "softmax"),
                                                   ("continuous", "softmax")])
def test_compile_stanhop(attention, separation):
    torch.manual_seed(0)
    net = STanHopNet(3, 24, 12, d_model=16, num_heads=2, d_ff=32, num_router=2, dropout=0.0, seg_len=6,
                     win_size=2, num_layers=1, attention=attention, separation=separation)
    _compare(net, lambda: torch.randn(2, 24, 3), atol=1e-4)


def test_training_modules_compile_option_keeps_parameter_names():
    """`compile: true` wraps the model's forward (nn.Module.compile); checkpoints keep their keys."""
    from hopformer.models import DLinear
    from hopformer.training.classification import ClassificationModule
    from hopformer.training.forecasting import ForecastingModule

    plain = ClassificationModule("hopfield_vit_nano_patch2_8")
    compiled = ClassificationModule("hopfield_vit_nano_patch2_8", compile=True)
    assert compiled.model._compiled_call_impl is not None and plain.model._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())
    forecaster = ForecastingModule(DLinear(24, 12, 3), compile=True)
    assert forecaster.model._compiled_call_impl is not None
    assert all("_orig_mod" not in key for key in forecaster.state_dict())
