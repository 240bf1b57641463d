"""U-Hop kernelized layers: FeatureMap, KernelizedHopfield and the adapters, and the U-Hop protocol."""

from __future__ import annotations

import math

import pytest
import torch

from hopformer.layers import (
    FeatureMap,
    Hopfield,
    HopfieldAttention,
    KernelizedHopfield,
    KernelizedHopfieldAttention,
    KernelizedMultiheadHopfield,
    MultiheadHopfield,
    UHopFeatureMap,
    attention_layer,
    uhop_modules,
)


def _identity_(fmap: FeatureMap) -> None:
    with torch.no_grad():
        fmap.weight.copy_(torch.eye(fmap.kernel_dim, fmap.dim))


# -- FeatureMap -------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["orthogonal", "gaussian", "identity"])
def test_feature_map_full_rank(init):
    torch.manual_seed(0)
    kernel_dim = 12 if init == "identity" else 20
    fmap = FeatureMap(12, kernel_dim, init=init)
    assert fmap.weight.shape == (kernel_dim, 12)
    assert torch.linalg.matrix_rank(fmap.weight.double()).item() == 12
    assert fmap(torch.randn(2, 3, 12)).shape == (2, 3, kernel_dim)


def test_feature_map_orthogonal_init_has_unit_rows_and_row_normalize():
    fmap = FeatureMap(6, 10)
    torch.testing.assert_close(fmap.weight.norm(dim=1), torch.ones(10))
    with torch.no_grad():
        fmap.weight.mul_(torch.arange(1.0, 11.0)[:, None])
    assert fmap.row_normalize_() is fmap
    torch.testing.assert_close(fmap.weight.norm(dim=1), torch.ones(10))


def test_feature_map_bad_input():
    with pytest.raises(ValueError, match="kernel_dim must be >= dim"):
        FeatureMap(8, 4)
    with pytest.raises(ValueError, match="init must be one of"):
        FeatureMap(8, init="xavier")
    with pytest.raises(ValueError, match="kernel_dim == dim"):
        FeatureMap(8, 10, init="identity")
    with pytest.raises(ValueError, match="last dimension 8"):
        FeatureMap(8)(torch.randn(3, 5))


# -- KernelizedHopfield -------------------------------------------------------------------------
@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax15", 1.3])
def test_identity_kernel_is_the_plain_layer(separation):
    """With Phi = I and the same projections, the kernelized layer is the Hopfield layer (drop-in)."""
    torch.manual_seed(1)
    plain = Hopfield(16, 4, separation=separation, update_steps=2)
    kern = KernelizedHopfield(16, 4, separation=separation, update_steps=2)
    missing = kern.load_state_dict(plain.state_dict(), strict=False)
    assert missing.missing_keys == ["feature_map.weight"]
    _identity_(kern.feature_map)
    x, y = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    torch.testing.assert_close(kern(x, y), plain(x, y))
    torch.testing.assert_close(kern.energy(x, y), plain.energy(x, y))


def test_project_false_is_the_retrieval_dynamics():
    """project=False computes T_K(x) = Xi Sep(beta <W Xi, W x>) (eq. 2.4)."""
    torch.manual_seed(2)
    layer = KernelizedHopfield(6, 1, kernel_dim=9, project=False, separation="sparsemax", beta=0.5)
    x, xi = torch.randn(2, 3, 6), torch.randn(2, 5, 6)
    w = layer.feature_map.weight
    scores = 0.5 * (x @ w.T) @ (xi @ w.T).transpose(-1, -2)
    from hopformer.functional import sparsemax

    expected = sparsemax(scores, dim=-1) @ xi
    torch.testing.assert_close(layer(x, xi), expected)


def test_kernelized_energy_decreases_along_updates():
    torch.manual_seed(3)
    layer = KernelizedHopfield(8, 1, project=False, beta=2.0, separation="softmax")
    xi = torch.randn(1, 6, 8)
    x = torch.randn(1, 4, 8)
    energies = []
    for _ in range(5):
        energies.append(layer.energy(x, xi))
        x = layer(x, xi)
    energies = torch.stack(energies)
    assert (energies[1:] <= energies[:-1] + 1e-5).all()


def test_sparsemax_association_has_exact_zeros():
    torch.manual_seed(4)
    layer = KernelizedHopfield(16, 2, separation="sparsemax", beta=4.0)
    _, assoc = layer(torch.randn(2, 5, 16), torch.randn(2, 9, 16), return_association=True)
    assert (assoc == 0).any()
    soft = KernelizedHopfield(16, 2, separation="softmax")
    _, assoc = soft(torch.randn(2, 5, 16), torch.randn(2, 9, 16), return_association=True)
    assert (assoc > 0).all()


def test_cross_association_with_different_dims():
    layer = KernelizedHopfield(8, 2, stored_dim=12, value_dim=5)
    assert layer.kernel_dim == 12 and layer.query_feature_map is not None
    out = layer(torch.randn(3, 4, 8), torch.randn(3, 6, 12), torch.randn(3, 6, 5))
    assert out.shape == (3, 4, 8)
    assert len(layer.feature_parameters()) == 2


def test_protocol_cache_and_separation_loss():
    torch.manual_seed(5)
    layer = KernelizedHopfield(8, 2, t=1.0, loss="orthogonal")
    assert isinstance(layer.feature_map, UHopFeatureMap) and layer.cache_memories is False
    with pytest.raises(RuntimeError, match="cache_memories"):
        layer.separation_loss()
    x = torch.randn(3, 5, 8)
    layer(x)
    assert layer.cached_memories is None
    layer.cache_memories = True
    with torch.no_grad():
        layer(x)
    assert layer.cached_memories.shape == (3, 5, 8) and not layer.cached_memories.requires_grad
    from hopformer.functional import separation_loss

    expected = separation_loss(layer.feature_map(x), 1.0, "orthogonal").mean()
    torch.testing.assert_close(layer.separation_loss(), expected)
    torch.testing.assert_close(layer.separation_loss(x[0]), separation_loss(layer.feature_map(x[0]), 1.0, "orthogonal"))
    assert layer.feature_parameters() == [layer.feature_map.weight]


def test_stage_one_on_layer_lowers_loss_and_task_gradient_reaches_phi():
    torch.manual_seed(6)
    layer = KernelizedHopfield(16, 2)
    memories = torch.randn(4, 10, 16) + 2.0  # crowded memories
    opt = torch.optim.SGD(layer.feature_parameters(), lr=0.1)
    start = layer.separation_loss(memories).item()
    for _ in range(50):
        opt.zero_grad()
        layer.separation_loss(memories).backward()
        opt.step()
    assert layer.separation_loss(memories).item() < start - 1.0
    layer.zero_grad()
    layer(memories).square().mean().backward()
    assert layer.feature_map.weight.grad.abs().sum() > 0


def test_uhop_modules_in_a_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(7)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=3,
                            attn_layer=attention_layer("kernelized", "sparsemax", {"kernel_dim": 48}))
    mods = uhop_modules(vit)
    assert len(mods) == 2
    for m in mods:
        m.cache_memories = True
    with torch.no_grad():
        assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert mods[0].cached_memories.shape == (2, 17, 32)
    assert torch.isfinite(sum(m.separation_loss() for m in mods))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_attention_identity_kernel_matches_hopfield_attention(qkv_bias):
    torch.manual_seed(8)
    plain = HopfieldAttention(32, num_heads=4, qkv_bias=qkv_bias, separation="entmax15")
    kern = KernelizedHopfieldAttention(32, num_heads=4, qkv_bias=qkv_bias, separation="entmax15")
    result = kern.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == ["feature_map.weight"]
    _identity_(kern.feature_map)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(kern(x), plain(x))
    torch.testing.assert_close(kern.energy(x), plain.energy(x))


def test_attention_wider_kernel_and_gradients():
    torch.manual_seed(9)
    attn = KernelizedHopfieldAttention(16, num_heads=2, kernel_dim=24, qkv_bias=True)
    assert not hasattr(attn, "qkv") and attn.qk.in_features == 24
    x = torch.randn(2, 5, 16, requires_grad=True)
    attn(x).sum().backward()
    assert attn.feature_map.weight.grad is not None and x.grad is not None


def test_multihead_identity_kernel_matches_multihead_hopfield():
    torch.manual_seed(10)
    plain = MultiheadHopfield(16, 4, batch_first=True, separation="sparsemax")
    kern = KernelizedMultiheadHopfield(16, 4, batch_first=True, separation="sparsemax")
    kern.load_state_dict(plain.state_dict(), strict=False)
    _identity_(kern.feature_map)
    q, k = torch.randn(2, 3, 16), torch.randn(2, 6, 16)
    out_k, w_k = kern(q, k, k)
    out_p, w_p = plain(q, k, k)
    torch.testing.assert_close(out_k, out_p)
    torch.testing.assert_close(w_k, w_p)
    kern.cache_memories = True
    kern(q, k, k)
    assert kern.cached_memories.shape == (2, 6, 16)
    with pytest.raises(ValueError, match="kdim must equal embed_dim"):
        KernelizedMultiheadHopfield(16, 4, kdim=8)


def test_layer_bad_options():
    with pytest.raises(ValueError, match="t .*positive"):
        KernelizedHopfield(8, t=0.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        KernelizedHopfield(8, loss="min")
    with pytest.raises(ValueError, match="kernel_dim must be >= dim"):
        KernelizedHopfield(8, kernel_dim=4)
    with pytest.raises(ValueError, match="memories must have shape"):
        KernelizedHopfield(8).separation_loss(torch.randn(5))


# -- issue 12: default beta, rank guard, entropy, one memory per sample ---------------------
def test_project_false_default_beta_uses_each_heads_kernel_space():
    layer = KernelizedHopfield(8, 2, kernel_dim=16, project=False)
    assert layer.beta() == pytest.approx((16 / 2) ** -0.5)  # not (dim / heads) ** -0.5
    assert KernelizedHopfield(8, 2, kernel_dim=16, project=False, beta=0.3).beta() == 0.3
    assert KernelizedHopfield(8, 2, kernel_dim=16).beta() == pytest.approx(4 ** -0.5)  # projected: head_dim


def test_clamp_condition_restores_full_rank_and_keeps_singular_vectors():
    torch.manual_seed(0)
    fmap = FeatureMap(6, 8)
    with torch.no_grad():
        fmap.weight[:, 0] = 0.0  # rank 5 of 6
    assert fmap.condition_number() > 1e6
    u0, _, v0 = torch.linalg.svd(fmap.weight.detach())
    assert fmap.clamp_condition_(10.0)
    assert fmap.condition_number() == pytest.approx(10.0, rel=1e-4)
    u1, _, v1 = torch.linalg.svd(fmap.weight.detach())
    torch.testing.assert_close(u0[:, :5].abs(), u1[:, :5].abs(), atol=1e-4, rtol=0)
    assert not fmap.clamp_condition_(10.0)  # already within the bound: untouched
    with pytest.raises(ValueError, match="max_condition"):
        fmap.clamp_condition_(0.5)


@pytest.mark.parametrize("kind", ["hopfield", "attention"])
def test_track_entropy_records_association_entropy(kind):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    layer = KernelizedHopfield(8, 2) if kind == "hopfield" else KernelizedHopfieldAttention(8, 2)
    out = layer(x)
    assert layer.last_entropy is None
    layer.track_entropy = True
    torch.testing.assert_close(layer(x), out)  # same output, entropy recorded on the side
    assert 0.0 < float(layer.last_entropy) <= torch.log(torch.tensor(5.0)).item() + 1e-6
    with torch.no_grad():
        layer.feature_map.weight.mul_(1e3)  # sharp association -> entropy near 0
    layer(x)
    assert float(layer.last_entropy) < 0.1


def test_one_memory_per_sample_uses_the_batch_as_memory_set():
    torch.manual_seed(0)
    layer = KernelizedHopfield(8)
    memories = torch.randn(6, 1, 8)
    torch.testing.assert_close(layer.separation_loss(memories), layer.separation_loss(memories.transpose(0, 1)))


def test_cache_with_grad_keeps_the_graph():
    layer = KernelizedHopfield(8)
    x = torch.randn(2, 4, 8, requires_grad=True)
    layer.cache_memories = True
    layer(x)
    assert not layer.cached_memories.requires_grad
    layer.cache_with_grad = True
    layer(x)
    layer.separation_loss().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_clamp_condition_names_a_diverged_w_and_survives_an_svd_failure(monkeypatch):
    """A NaN W is named (not LAPACK's 'failed to converge'); a float32 SVD failure on a finite W retries in float64."""
    fmap = FeatureMap(8)
    with torch.no_grad():
        fmap.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="stage I diverged"):
        fmap.clamp_condition_(10.0)
    assert math.isnan(fmap.condition_number())

    fmap = FeatureMap(8)
    with torch.no_grad():
        fmap.weight[0] *= 1e-3  # condition number 1000
    svd = torch.linalg.svd

    def flaky(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    assert fmap.clamp_condition_(10.0)
    monkeypatch.undo()
    assert fmap.condition_number() == pytest.approx(10.0, rel=1e-4)
