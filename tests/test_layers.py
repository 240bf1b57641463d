"""Hopfield layers: the named variants, pooling and lookup forms, masks, energies, bad input."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from hopformer.functional import separate
from hopformer.layers import (
    GeneralizedSparseHopfield,
    Hopfield,
    HopfieldLayer,
    HopfieldPooling,
    LearnableAlpha,
    SparseHopfield,
)


def test_one_step_softmax_layer_is_multihead_sdpa():
    torch.manual_seed(0)
    layer = Hopfield(16, 4).eval()
    state, stored = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=4)  # noqa: E731
    q, k, v = split(layer.q_proj(state)), split(layer.k_proj(stored)), split(layer.v_proj(stored))
    ref = layer.out_proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))
    torch.testing.assert_close(layer(state, stored), ref)


def test_variants_dispatch_to_their_own_map():
    torch.manual_seed(1)
    x = torch.randn(2, 12, 32) * 3
    _, dense = Hopfield(32, 2)(x, return_association=True)
    _, sparse = SparseHopfield(32, 2)(x, return_association=True)
    _, gen = GeneralizedSparseHopfield(32, 2, alpha=1.9)(x, return_association=True)
    assert (dense > 0).all()
    assert (sparse == 0).any() and (gen == 0).any()
    for w in (dense, sparse, gen):
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))


def test_cross_association_with_distinct_dims_and_values():
    layer = Hopfield(8, 2, stored_dim=6, value_dim=10, out_dim=3, head_dim=5, separation="entmax15", update_steps=3)
    state, stored, values = torch.randn(4, 2, 8), torch.randn(4, 9, 6), torch.randn(4, 9, 10)
    out, assoc = layer(state, stored, values, return_association=True)
    assert out.shape == (4, 2, 3) and assoc.shape == (4, 2, 2, 9)
    # Reference written out: 2 steps x <- entmax15(beta x K^T) K in the projected key space, then the read-out.
    heads = lambda t: t.reshape(4, -1, 2, 5).transpose(1, 2)  # noqa: E731
    x, k, v = heads(layer.q_proj(state)), heads(layer.k_proj(stored)), heads(layer.v_proj(values))
    for _ in range(2):
        x = separate(5**-0.5 * x @ k.transpose(-1, -2), "entmax15") @ k
    weights = separate(5**-0.5 * x @ k.transpose(-1, -2), "entmax15")
    torch.testing.assert_close(assoc, weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, layer.out_proj((weights @ v).transpose(1, 2).reshape(4, 2, 10)), atol=1e-5, rtol=1e-4)


def test_pure_retrieval_without_projections_recovers_stored_patterns():
    torch.manual_seed(2)
    patterns = F.normalize(torch.randn(1, 10, 32), dim=-1) * 6
    layer = Hopfield(32, 1, project=False, separation="sparsemax", beta=1.0, update_steps=3)
    noisy = patterns + 0.2 * torch.randn_like(patterns)
    assert torch.equal(layer(noisy, patterns), patterns)


def test_key_padding_mask_matches_removing_padded_keys():
    torch.manual_seed(3)
    layer = SparseHopfield(8, 2).eval()
    state, stored = torch.randn(1, 3, 8), torch.randn(1, 6, 8)
    pad = torch.tensor([[False, False, True, False, True, True]])
    torch.testing.assert_close(layer(state, stored, key_padding_mask=pad), layer(state, stored[:, ~pad[0]]))


def test_attn_mask_bool_and_float_agree():
    torch.manual_seed(4)
    layer = Hopfield(8, 2).eval()
    x = torch.randn(2, 4, 8)
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
    additive = torch.zeros(4, 4).masked_fill(causal, float("-inf"))
    torch.testing.assert_close(layer(x, attn_mask=causal), layer(x, attn_mask=additive))


def test_learnable_beta_and_alpha_have_live_gradients():
    layer = GeneralizedSparseHopfield(8, 2, alpha=1.5, alpha_per_head=True, learnable_beta=True)
    layer(torch.randn(2, 5, 8)).pow(2).sum().backward()
    assert layer.beta.log_beta.grad.abs().sum() > 0
    assert layer.alpha.logit.grad.abs().sum() > 0


def test_learnable_alpha_stays_in_range_with_gradient_at_extremes():
    alpha = LearnableAlpha(1.5)
    with torch.no_grad():
        alpha.logit.fill_(12.0)  # alpha ~ 2 - 6e-6: a clamp would kill the gradient here
    value = alpha()
    assert 1.0 < value.item() < 2.0
    value.sum().backward()
    assert alpha.logit.grad.item() > 0


def test_energy_decreases_through_layer_steps():
    torch.manual_seed(5)
    layer = Hopfield(16, 1, project=False, separation=1.5, beta=0.5)
    stored = torch.randn(1, 8, 16)
    x = torch.randn(1, 3, 16)
    energies = []
    for _ in range(5):
        energies.append(layer.energy(x, stored))
        x = layer(x, stored)
    e = torch.stack(energies)
    assert torch.all(e[1:] <= e[:-1] + 1e-5)


def test_pooling_and_lookup_forms():
    torch.manual_seed(6)
    pool = HopfieldPooling(16, 2, num_queries=3, separation="sparsemax")
    assert torch.isfinite(pool.queries).all() and pool.queries.abs().sum() > 0
    stored = torch.randn(4, 10, 16)
    out, assoc = pool(stored, return_association=True)
    assert out.shape == (4, 3, 16) and assoc.shape == (4, 2, 3, 10)
    queries = pool.queries.expand(4, -1, -1)  # pooling = association of the learned queries with the input
    torch.testing.assert_close(out, pool.hopfield(queries, stored))
    torch.testing.assert_close(pool.energy(stored), pool.hopfield.energy(queries, stored))
    assert not torch.allclose(out[0], out[1])  # each set pooled on its own
    lookup = HopfieldLayer(16, 2, num_patterns=12)
    x = torch.randn(4, 5, 16)
    y = lookup(x)
    torch.testing.assert_close(y, lookup.hopfield(x, lookup.patterns.expand(4, -1, -1)))  # lookup in the learned memory
    y.sum().backward()
    assert lookup.patterns.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Hopfield(10, 3), "num_heads"),
        (lambda: Hopfield(0), "dim"),
        (lambda: Hopfield(8, 2, beta=0.0), "beta"),
        (lambda: Hopfield(8, 2, beta=-2.0), "beta"),
        (lambda: Hopfield(8, 2, separation="maxsoft"), "separation"),
        (lambda: Hopfield(8, 2, separation=0.5), "alpha|separation"),
        (lambda: Hopfield(8, 2, update_steps=0), "update_steps"),
        (lambda: Hopfield(8, 2, dropout=1.5), "dropout"),
        (lambda: GeneralizedSparseHopfield(8, 2, alpha=2.0), "alpha"),
        (lambda: GeneralizedSparseHopfield(8, 2, alpha=0.9, learnable_alpha=False), "alpha|separation"),
        (lambda: Hopfield(8, 2, stored_dim=4, project=False), "project=False"),
        (lambda: HopfieldPooling(8, 2, num_queries=0), "num_queries"),
    ],
)
def test_bad_construction_names_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda l: l(torch.randn(5, 8)), r"state must have shape \(batch, length, 8\)"),
        (lambda l: l(torch.randn(2, 5, 7)), "state"),
        (lambda l: l(torch.randn(2, 5, 8), torch.randn(3, 4, 8)), "batch"),
        (lambda l: l(torch.randn(2, 5, 8), torch.randn(2, 4, 8), torch.randn(2, 3, 8)), "values"),
        (lambda l: l(torch.randn(2, 5, 8), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), "key_padding_mask"),
        (lambda l: l(torch.randn(2, 5, 8), attn_mask=torch.zeros(5, 4, dtype=torch.bool)), "attn_mask"),
    ],
)
def test_bad_forward_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(Hopfield(8, 2))
