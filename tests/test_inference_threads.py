"""Every layer kind x every separation x {train, no_grad, inference_mode} x {1, 2 threads}, and Lightning's
validate/test/predict (which run under ``torch.inference_mode``) with 2 threads.

The CPU separation kernels spread their blocks over worker threads when torch has more than one
thread. Inference mode is per thread, so a worker that did not carry the caller's mode over wrote
into inference tensors from outside inference mode and raised "Inplace update to inference tensor
outside InferenceMode" (issue 9, item 1). The block size is shrunk here so that small inputs split
into several blocks, as large ones do in real runs.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import hopformer.functional._separated_attention as core
import hopformer.functional._separation_kernels as kernels
from hopformer.layers import (
    ContinuousHopfield,
    GeneralizedSparseHopfield,
    Hopfield,
    HopfieldAttention,
    HopfieldLayer,
    HopfieldPooling,
    KernelizedHopfield,
    KernelizedHopfieldAttention,
    KernelizedMultiheadHopfield,
    MultiheadHopfield,
    SparseHopfield,
    attention_layer,
)

SEPARATIONS = ["softmax", "sparsemax", "entmax15", 1.3, "learnable"]
DIM, HEADS = 8, 2


def _kw(separation) -> dict:
    return {} if separation == "learnable" else {"separation": separation}


def _layer(kind: str, separation) -> tuple[nn.Module, callable]:
    """The layer and a function that runs it on a batch (tokens ``(B, L, DIM)``)."""
    if separation == "learnable" and kind not in ("GeneralizedSparseHopfield",):
        pytest.skip("a learnable alpha is GeneralizedSparseHopfield's option")
    if kind == "Hopfield":
        m = Hopfield(DIM, HEADS, **_kw(separation))
        return m, lambda x: m(x, return_association=True)[0] + m(x)
    if kind == "SparseHopfield":
        if separation != "sparsemax":
            pytest.skip("SparseHopfield is sparsemax only")
        m = SparseHopfield(DIM, HEADS)
        return m, m
    if kind == "GeneralizedSparseHopfield":
        if separation in ("softmax", "sparsemax"):
            pytest.skip("alpha strictly inside (1, 2)")
        alpha = {"entmax15": 1.5, 1.3: 1.3, "learnable": 1.7}[separation]
        m = GeneralizedSparseHopfield(DIM, HEADS, alpha=alpha, learnable_alpha=separation == "learnable",
                                      alpha_per_head=True)
        return m, m
    if kind == "HopfieldPooling":
        m = HopfieldPooling(DIM, HEADS, num_queries=3, **_kw(separation))
        return m, m
    if kind == "HopfieldLayer":
        m = HopfieldLayer(DIM, HEADS, num_patterns=40, **_kw(separation))
        return m, m
    if kind == "MultiheadHopfield":
        m = MultiheadHopfield(DIM, HEADS, batch_first=True, **_kw(separation))
        return m, lambda x: m(x, x, x)[0]
    if kind == "KernelizedMultiheadHopfield":
        m = KernelizedMultiheadHopfield(DIM, HEADS, batch_first=True, **_kw(separation))
        return m, lambda x: m(x, x, x)[0]
    if kind == "HopfieldAttention":
        m = HopfieldAttention(DIM, HEADS, **_kw(separation))
        return m, m
    if kind == "KernelizedHopfieldAttention":
        m = KernelizedHopfieldAttention(DIM, HEADS, **_kw(separation))
        return m, m
    if kind == "KernelizedHopfield":
        m = KernelizedHopfield(DIM, HEADS, update_steps=2, **_kw(separation))
        return m, lambda x: m(x) + m.energy(x).sum()
    if kind == "ContinuousHopfield":
        if separation != "softmax":
            pytest.skip("continuous memories are softmax only")
        m = ContinuousHopfield(DIM, HEADS, num_basis=4)
        return m, m
    raise AssertionError(kind)


KINDS = ["Hopfield", "SparseHopfield", "GeneralizedSparseHopfield", "HopfieldPooling", "HopfieldLayer",
         "MultiheadHopfield", "KernelizedMultiheadHopfield", "HopfieldAttention", "KernelizedHopfieldAttention",
         "KernelizedHopfield", "ContinuousHopfield"]


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 400 scores: a (4, 40, 40) input splits into 16 blocks over the worker threads."""
    monkeypatch.setattr(core, "_CHUNK_ELEMS", 400)
    monkeypatch.setattr(kernels, "_CHUNK_ELEMS", 400)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["train", "no_grad", "inference_mode"])
@pytest.mark.parametrize("separation", SEPARATIONS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_every_layer_every_separation_every_mode(kind, separation, mode, threads, small_blocks):
    torch.manual_seed(0)
    layer, run = _layer(kind, separation)
    x = torch.randn(4, 40, DIM)
    layer.eval()
    with torch.no_grad():
        reference = run(x)  # in eval mode every mode must give the same numbers
    if mode == "train":
        out = run(x)
        out.sum().backward()
        grads = [p.grad for p in layer.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    else:
        with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
            out = run(x)
        assert out.is_inference() == (mode == "inference_mode")
    torch.testing.assert_close(out.detach().clone(), reference, atol=1e-5, rtol=1e-5)


class _TinyHopfieldClassifier(L.LightningModule):
    """A one-layer Hopfield ViT on random 8x8 images: enough for validate/test/predict."""

    def __init__(self, separation) -> None:
        super().__init__()
        self.net = VisionTransformer(img_size=8, patch_size=1, in_chans=1, embed_dim=DIM, depth=1, num_heads=HEADS,
                                     num_classes=3, attn_layer=attention_layer(**_kw(separation)))

    def _step(self, batch, name):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log(name, loss)
        return loss

    def training_step(self, batch, _):
        return self._step(batch, "train_loss")

    def validation_step(self, batch, _):
        return self._step(batch, "val_loss")

    def test_step(self, batch, _):
        return self._step(batch, "test_loss")

    def predict_step(self, batch, _):
        return self.net(batch[0]).argmax(-1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax15", 1.3], ids=str)
def test_lightning_validate_test_predict_with_two_threads(separation, tmp_path, small_blocks):
    """What `python train.py fit --config configs/forecast/base.yaml --config configs/forecast/small.yaml` does after fit, in miniature."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        model = _TinyHopfieldClassifier(separation)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        assert trainer.validate(model, loader, verbose=False)[0]["val_loss"] > 0
        assert trainer.test(model, loader, verbose=False)[0]["test_loss"] > 0
        predictions = trainer.predict(model, loader)
        assert torch.cat(predictions).shape == (16,)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("separation", ["sparsemax", "entmax15"])  # supports under a tenth of the keys here
def test_long_rows_on_their_supports_under_inference_mode(separation, monkeypatch):
    """Rows of 300 keys take the row kernels and read out through their supports (`readout_support`), in several
    blocks spread over the worker threads: with 2 threads, inference mode gives what no_grad gives."""
    from hopformer.functional import _native
    from hopformer.functional.separation import separated_attention

    if _native.load() is None:
        pytest.skip(f"native kernels not built: {_native.error()}")
    calls = []
    real = _native.readout_support
    monkeypatch.setattr(_native, "readout_support", lambda *a: calls.append(real(*a)) or calls[-1])
    monkeypatch.setattr(core, "_CHUNK_ELEMS", 300 * 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 2, n, DIM, generator=gen) for n in (40, 300, 300))
        with torch.no_grad():
            ref = separated_attention(q, k, v, separation=separation)
        with torch.inference_mode():
            out = separated_attention(q, k, v, separation=separation)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) >= 2 * 4 and all(calls)  # several blocks each call, all on the supports
    assert torch.equal(out, ref)
