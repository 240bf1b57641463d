"""STanHop-Net: shapes for odd lengths, Hopfield variants by config, initialised patterns, memory plugins."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hopformer.layers import GeneralizedSparseHopfield, Hopfield, LearnableAlpha, SparseHopfield
from hopformer.models import DLinear, RepeatLast, STanHopNet, build_hopfield
from hopformer.models.stanhop_memory import PlugAndPlayMemory, TuneAndPlayMemory

SMALL = dict(d_model=16, num_heads=2, d_ff=32, num_router=3, dropout=0.0)


def small_net(input_len=50, horizon=37, num_series=5, **kw) -> STanHopNet:
    torch.manual_seed(0)
    return STanHopNet(num_series, input_len, horizon, **{**SMALL, "seg_len": 12, "win_size": 2, **kw}).eval()


def test_shapes_through_every_block_for_odd_lengths():
    net = small_net(input_len=50, horizon=37, num_layers=3)  # 50 = 4*12 + 2, 37 = 3*12 + 1
    x = torch.randn(3, 50, 5)
    tokens = net.embedding(x)
    assert tokens.shape == (3, 5, 5, 16)  # ceil(50 / 12) = 5 patches
    scales = net.encode(x)
    assert [s.shape[2] for s in scales] == [5, 5, 3, 2]  # coarse-graining ceil(5/2)=3, ceil(3/2)=2
    assert all(s.shape[:2] == (3, 5) and s.shape[-1] == 16 for s in scales)
    queries = net.decoder_position.expand(3, -1, -1, -1)
    for layer, cross in zip(net.decoder, scales):
        queries, patches = layer(queries, cross)
        assert queries.shape == (3, 5, 4, 16) and patches.shape == (3, 5, 4, 12)  # ceil(37/12) = 4
    assert net(x).shape == (3, 37, 5)


@settings(max_examples=12, deadline=None)
@given(input_len=st.integers(5, 60), horizon=st.integers(1, 40), seg_len=st.integers(1, 12),
       win_size=st.integers(1, 3), num_layers=st.integers(1, 3), num_series=st.integers(1, 4))
def test_any_lengths_give_finite_forecasts(input_len, horizon, seg_len, win_size, num_layers, num_series):
    seg_len = min(seg_len, input_len)
    net = small_net(input_len, horizon, num_series, seg_len=seg_len, win_size=win_size, num_layers=num_layers)
    out = net(torch.randn(2, input_len, num_series))
    assert out.shape == (2, horizon, num_series) and torch.isfinite(out).all()


def test_every_parameter_gets_a_gradient_and_alpha_is_per_layer():
    net = small_net(num_layers=2).train()
    net(torch.randn(4, 50, 5)).pow(2).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    alphas = [m for m in net.modules() if isinstance(m, LearnableAlpha)]
    # 3 associations per block (time, router sender, receiver); 2 encoder + 3 decoder blocks; +1 cross per decoder layer
    assert len(alphas) == 3 * 5 + 3 and all(a.logit.shape == (1,) for a in alphas)
    per_head = small_net(attn_kwargs={"alpha_per_head": True})
    assert per_head.encoder[0].time_hopfield.alpha.logit.shape == (2, 1, 1)


def test_router_and_positions_are_initialised():
    net = small_net(num_layers=2)
    for block in net.encoder:
        r = block.router
        assert torch.isfinite(r).all() and 0.005 < r.std() < 0.05 and (r != 0).all()
    assert torch.isfinite(net.embedding.position).all() and torch.isfinite(net.decoder_position).all()


def test_cross_series_stage_tells_patch_positions_apart():
    """Crossformer keeps one router set per segment: identical tokens at two positions give different outputs."""
    net = small_net(num_layers=2)  # 5 patches, then ceil(5/2) = 3 after coarse-graining; 4 output patches
    block = net.encoder[0]
    x = torch.randn(2, 5, 1, 16).expand(-1, -1, 5, -1).contiguous()  # every position holds the same token
    out = block(x)
    assert not torch.allclose(out[:, :, 0], out[:, :, 1], atol=1e-4)
    assert [b.router.shape for b in net.encoder] == [(5, 3, 16), (3, 3, 16)]
    assert all(layer.block.router.shape == (4, 3, 16) for layer in net.decoder)
    with pytest.raises(ValueError, match="num_segments"):
        block(x[:, :, :4])
    shared = small_net(num_layers=2, router_per_segment=False).encoder[0]  # the earlier, shared-router variant
    assert shared.router.shape == (3, 16)
    out = shared(x)
    torch.testing.assert_close(out[:, :, 0], out[:, :, 1])


@pytest.mark.parametrize("affine", [True, False])
def test_revin_makes_the_forecast_equivariant_to_level_and_scale(affine):
    """RevIN (Kim et al. 2022): forecasting ``a x + b`` per series gives ``a f(x) + b``."""
    net = small_net(num_layers=2, revin=True, revin_affine=affine)
    with torch.no_grad():  # move the affine map away from the identity
        for p in net.revin.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 50, 5)
    a, b = torch.rand(1, 1, 5) * 3 + 0.5, torch.randn(1, 1, 5) * 10
    torch.testing.assert_close(net(a * x + b), a * net(x) + b, atol=1e-4, rtol=1e-4)
    plain = small_net(num_layers=2)
    assert not torch.allclose(plain(a * x + b), a * plain(x) + b, atol=1e-2)
    net.train()(x).pow(2).mean().backward()
    assert not affine or all(p.grad is not None for p in net.revin.parameters())
    with pytest.raises(ValueError, match="num_series=5"):
        net.revin.normalize(torch.randn(2, 50, 4))


def test_revin_round_trip_and_memory_fill():
    from hopformer.models.revin import RevIN

    norm = RevIN(4)
    x = torch.randn(2, 30, 4) * 5 + 3
    z, stats = norm.normalize(x)
    torch.testing.assert_close(z.mean(1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.denormalize(z, stats), x, atol=1e-4, rtol=1e-4)
    net = small_net(revin=True, memory="plug", memory_kwargs={"size": 20})
    net.fill_memory(torch.randn(8, 50, 5) * 100 + 50)  # stored tokens come from normalised windows
    assert torch.isfinite(net(torch.randn(2, 50, 5))).all()


def test_factory_maps_names_to_layers():
    gsh = build_hopfield("hopfield", 16, 2)  # STanHop's default: GSH, learned alpha-entmax
    assert type(gsh) is Hopfield and isinstance(gsh.alpha, LearnableAlpha)
    assert type(GeneralizedSparseHopfield(16, 2)) is Hopfield and isinstance(GeneralizedSparseHopfield(16, 2).alpha, LearnableAlpha)
    dense = build_hopfield("hopfield", 16, 2, separation="softmax")
    assert type(dense) is Hopfield and dense.alpha is None and dense.separation == "softmax"
    assert build_hopfield("hopfield", 16, 2, separation="sparsemax").separation == SparseHopfield(16, 2).separation == "sparsemax"
    with pytest.raises(ValueError, match="attention must be one of"):
        build_hopfield("quantum", 16, 2)
    with pytest.raises(ValueError, match="attention must be one of"):
        STanHopNet(3, 24, 12, attention="quantum")


@pytest.mark.parametrize("attention, separation", [("hopfield", "softmax"), ("hopfield", "sparsemax"),
                                                   ("kernelized", "softmax"), ("kernelized", "learnable"),
                                                   ("continuous", "softmax")])
def test_variants_run_in_the_net(attention, separation):
    net = small_net(attention=attention, separation=separation)
    out = net(torch.randn(2, 50, 5))
    assert out.shape == (2, 37, 5) and torch.isfinite(out).all()
    if attention == "kernelized" and separation == "learnable":  # U-Hop's kernel on GSH keeps a learnable alpha in (1, 2)
        alpha = net.encoder[0].time_hopfield.current_separation()
        assert alpha.requires_grad and 1 < float(alpha) < 2
    if separation == "sparsemax":  # sparsemax associations really are sparse (not softmax in disguise)
        z = torch.randn(2, 5, 16)
        _, assoc = net.encoder[0].time_hopfield(z, return_association=True)
        assert (assoc == 0).any()


def test_memory_changes_output_only_when_attached():
    net = small_net(num_layers=2)
    x, bank = torch.randn(3, 50, 5), torch.randn(16, 50, 5)
    plain = net(x)
    net.attach_memory("plug", size=40)
    with pytest.raises(RuntimeError, match="fill_memory"):
        net(x)
    net.fill_memory(bank)
    assert all(int(b.memory.count) == 40 for b in net.encoder)
    plugged = net(x)
    assert plugged.shape == plain.shape and not torch.allclose(plugged, plain, atol=1e-4)
    assert sum(p.numel() for b in net.encoder for p in b.memory.parameters()) == 0  # train-less
    net.detach_memory()
    torch.testing.assert_close(net(x), plain)

    net.attach_memory("tune", size=6)
    tuned = net(x)
    assert not torch.allclose(tuned, plain, atol=1e-4)
    tuned.pow(2).mean().backward()
    assert all(b.memory.patterns.grad is not None for b in net.encoder)
    before = net.encoder[0].memory.patterns.clone()
    net.fill_memory(bank)  # data initialisation of the learned patterns
    assert not torch.allclose(before, net.encoder[0].memory.patterns)
    net.detach_memory()
    torch.testing.assert_close(net(x), plain)


def test_memory_modules_reject_bad_tokens_and_kinds():
    with pytest.raises(ValueError, match="tokens"):
        PlugAndPlayMemory(8)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="tokens"):
        TuneAndPlayMemory(8, 2)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="memory="):
        small_net(memory="cloud")


def test_bad_inputs_raise_clear_errors():
    net = small_net()
    with pytest.raises(ValueError, match=r"input_len=50"):
        net(torch.randn(2, 49, 5))
    with pytest.raises(ValueError, match=r"num_series=5"):
        net(torch.randn(2, 50, 4))
    with pytest.raises(ValueError, match="seg_len"):
        STanHopNet(3, 10, 5, seg_len=12)
    with pytest.raises(ValueError, match="d_model"):
        STanHopNet(3, 24, 5, d_model=0)


def test_seeded_construction_is_deterministic():
    x = torch.randn(2, 50, 5)
    torch.testing.assert_close(small_net()(x), small_net()(x))


def test_baselines():
    x = torch.randn(4, 30, 3)
    naive = RepeatLast(30, 11, 3)(x)
    assert naive.shape == (4, 11, 3) and torch.equal(naive[:, 5], x[:, -1])
    for individual in (False, True):
        lin = DLinear(30, 11, 3, individual=individual)
        out = lin(x)
        assert out.shape == (4, 11, 3)
        # initial weights 1/L on both components: the forecast is the window mean
        torch.testing.assert_close(out, x.mean(1, keepdim=True).expand(-1, 11, -1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kernel_size"):
        DLinear(30, 11, 3, kernel_size=4)
    with pytest.raises(ValueError, match="input_len=30"):
        DLinear(30, 11, 3)(torch.randn(4, 29, 3))


def test_forecast_is_the_sum_of_each_decoder_layer_on_its_own_scale():
    """Decoder layer i cross-associates with encoder output i (embedding, then each scale); the per-layer
    patch predictions are summed (not averaged). Reference written out step by step from the paper's sec. 4.4."""
    net = small_net(input_len=48, horizon=30, num_layers=2)
    x = torch.randn(2, 48, 5)
    with torch.no_grad():
        z = net.embedding(x)
        scales = [z]
        for coarse, block in zip(net.coarse, net.encoder):
            z = block(coarse(z))
            scales.append(z)
        assert len(scales) == len(net.decoder) == 3
        assert [s.shape[2] for s in scales] == [4, 4, 2] and not torch.allclose(scales[0], scales[1])
        queries = net.decoder_position.expand(2, -1, -1, -1)
        total = torch.zeros(())
        for i in range(3):
            queries, patches = net.decoder[i](queries, scales[i])
            total = total + patches
        expected = total.permute(0, 2, 3, 1).reshape(2, -1, 5)[:, :30]
        torch.testing.assert_close(net(x), expected)
