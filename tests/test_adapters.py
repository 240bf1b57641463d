"""Drop-in adapters against the modules they replace, with copied weights."""

import pytest
import torch
from torch import nn
from timm.models.vision_transformer import Attention, VisionTransformer

from hopformer.functional import hopfield_energy, separate
from hopformer.layers import HopfieldAttention, MultiheadHopfield, attention_layer


def _pair(**kwargs):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, **kwargs)
    ours = MultiheadHopfield(16, 4, **kwargs)
    ours.load_state_dict(ref.state_dict())  # strict: the state dicts match key for key
    return ref.eval(), ours.eval()


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(batch_first=True), dict(bias=False), dict(kdim=8, vdim=12), dict(add_bias_kv=True),
     dict(add_zero_attn=True), dict(add_bias_kv=True, add_zero_attn=True, kdim=8, vdim=12)],
)
@pytest.mark.parametrize("need_weights, average", [(True, True), (True, False), (False, True)])
def test_multihead_hopfield_matches_multihead_attention(kwargs, need_weights, average):
    ref, ours = _pair(**kwargs)
    kdim, vdim = kwargs.get("kdim", 16), kwargs.get("vdim", 16)
    batch_first = kwargs.get("batch_first", False)
    shape = lambda n, e: (3, n, e) if batch_first else (n, 3, e)  # noqa: E731
    q, k, v = torch.randn(*shape(5, 16)), torch.randn(*shape(7, kdim)), torch.randn(*shape(7, vdim))
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, -3:] = True
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[0, 0] = True
    args = dict(key_padding_mask=pad, attn_mask=mask, need_weights=need_weights, average_attn_weights=average)
    out_ref, w_ref = ref(q, k, v, **args)
    out, w = ours(q, k, v, **args)
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    else:
        assert w is None and w_ref is None


def test_multihead_hopfield_unbatched_causal_and_float_masks():
    ref, ours = _pair()
    x = torch.randn(6, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    torch.testing.assert_close(ours(x, x, x, attn_mask=causal)[0], ref(x, x, x, attn_mask=causal)[0])
    xb = torch.randn(6, 2, 16)
    torch.testing.assert_close(ours(xb, xb, xb, is_causal=True, need_weights=False)[0],
                               ref(xb, xb, xb, attn_mask=causal, need_weights=False)[0])


def test_multihead_hopfield_sparse_gives_exact_zeros():
    torch.manual_seed(1)
    layer = MultiheadHopfield(16, 2, separation="sparsemax", batch_first=True)
    _, w = layer(*(torch.randn(2, 9, 16) * 4,) * 3, average_attn_weights=False)
    assert (w == 0).any()


def test_transformer_encoder_fast_path_cannot_bypass_the_separation():
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(16, 4, batch_first=True, dropout=0.0)
    layer.self_attn = MultiheadHopfield(16, 4, batch_first=True, separation="sparsemax")
    x = torch.randn(2, 7, 16) * 3
    layer.eval()
    with torch.no_grad():
        inference = layer(x)  # conditions of the softmax fast path hold except for our hook
    layer.train()
    torch.testing.assert_close(inference, layer(x))


def test_hopfield_attention_matches_timm_attention():
    torch.manual_seed(3)
    for kwargs in (dict(), dict(qkv_bias=True), dict(qk_norm=True, norm_layer=nn.LayerNorm)):
        ref = Attention(32, 4, **kwargs).eval()
        ours = HopfieldAttention(32, 4, **kwargs).eval()
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(2, 9, 32)
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours(x, is_causal=True), ref(x, is_causal=True))


def test_hopfield_vit_loads_plain_vit_weights_and_reproduces_it():
    torch.manual_seed(4)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10)
    plain = VisionTransformer(**cfg).eval()
    hop = VisionTransformer(**cfg, attn_layer=HopfieldAttention).eval()
    hop.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(hop(images), plain(images))
    sparse = VisionTransformer(**cfg, attn_layer=attention_layer(separation="sparsemax")).eval()
    sparse.load_state_dict(plain.state_dict())
    assert sparse.blocks[0].attn.separation == "sparsemax"
    assert not torch.allclose(sparse(images), plain(images))


def test_adapter_association_and_energy_access():
    layer = HopfieldAttention(16, 2, separation="entmax15", update_steps=2)
    x = torch.randn(3, 5, 16)
    out, assoc = layer(x, return_association=True)
    assert out.shape == (3, 5, 16) and assoc.shape == (3, 2, 5, 5)
    q, k, v = layer.qkv(x).reshape(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)  # timm's qkv layout
    state = separate(8**-0.5 * q @ k.transpose(-1, -2), "entmax15") @ k  # one update step, then the read-out
    torch.testing.assert_close(assoc, separate(8**-0.5 * state @ k.transpose(-1, -2), "entmax15"), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, layer.proj((assoc @ v).transpose(1, 2).reshape(3, 5, 16)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.energy(x), hopfield_energy(q, k, beta=8**-0.5, separation="entmax15"))


def test_adapter_bad_options():
    with pytest.raises(TypeError, match="unexpected"):
        MultiheadHopfield(16, 4, sepration="sparsemax")
    with pytest.raises(ValueError, match="separation"):
        HopfieldAttention(16, 4, separation="nope")
    with pytest.raises(ValueError, match="update_steps"):
        MultiheadHopfield(16, 4, update_steps=0)
