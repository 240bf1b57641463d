"""U-Hop separation losses (Def. 2.2, Def. 3.1, G.2): values, gradients, invariances, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hopformer.functional import separation_loss
from hopformer.functional.separation_loss import (
    SEPARATION_LOSSES,
    min_pairwise_distance,
    pairwise_sq_distances,
    separation_loss_from_gram,
)

KINDS = SEPARATION_LOSSES


def _three_vectors() -> torch.Tensor:
    s = 1.0 / math.sqrt(2.0)
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [s, s, 0.0]], dtype=torch.float64)


def test_orthogonal_pair_values():
    phi = torch.eye(2, dtype=torch.float64)
    t = 2.0
    # ||u - v||^2 = 2, K = 0: every form gives -2t.
    for kind in KINDS:
        assert separation_loss(phi, t, kind).item() == pytest.approx(-2 * t)


def test_hand_computed_three_vectors():
    t = 1.5
    phi = _three_vectors()
    # squared distances: e1-e2: 2; e1-s, e2-s: 2 - sqrt(2); cosines 0, 1/sqrt2, 1/sqrt2.
    d_far, d_near = 2.0, 2.0 - math.sqrt(2.0)
    avg = math.log((2 * math.exp(-t * d_far) + 4 * math.exp(-t * d_near)) / 6)
    orth = math.log((2 * math.exp(2 * t * (0.0 - 1)) + 4 * math.exp(2 * t * (0.5 - 1))) / 6)
    assert separation_loss(phi, t, "average").item() == pytest.approx(avg, rel=1e-12)
    assert separation_loss(phi, t, "orthogonal").item() == pytest.approx(orth, rel=1e-12)
    assert separation_loss(phi, t, "max").item() == pytest.approx(-t * d_near, rel=1e-12)


def test_average_equals_kernel_form_on_sphere():
    """On the unit sphere log mean exp(-t ||u - v||^2) = log mean exp(2t (K - 1)) (U-Hop, Wu et al. 2024)."""
    torch.manual_seed(0)
    phi = torch.nn.functional.normalize(torch.randn(7, 5, dtype=torch.float64), dim=-1)
    k = phi @ phi.T
    off = ~torch.eye(7, dtype=torch.bool)
    expected = torch.logsumexp(2 * 2.0 * (k[off] - 1), 0) - math.log(42)
    assert separation_loss(phi, 2.0).item() == pytest.approx(expected.item(), rel=1e-12)


def test_identical_features_give_zero_loss():
    phi = torch.ones(4, 3, dtype=torch.float64)
    for kind in KINDS:
        assert separation_loss(phi, 2.0, kind).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_scale_invariance(kind):
    torch.manual_seed(1)
    phi = torch.randn(3, 6, 4, dtype=torch.float64)
    ref = separation_loss(phi, 2.0, kind)
    scales = torch.rand(3, 6, 1, dtype=torch.float64) * 100 + 1e-3  # per-feature scale
    torch.testing.assert_close(separation_loss(phi * 37.0, 2.0, kind), ref)
    torch.testing.assert_close(separation_loss(phi * scales, 2.0, kind), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_per_set(kind):
    torch.manual_seed(2)
    phi = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    out = separation_loss(phi, 2.0, kind)
    assert out.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert out[i, j].item() == pytest.approx(separation_loss(phi[i, j], 2.0, kind).item(), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(kind, normalize):
    torch.manual_seed(3)
    phi = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: separation_loss(p, 0.7, kind, normalize=normalize), (phi,))
    assert torch.autograd.gradgradcheck(lambda p: separation_loss(p, 0.7, kind, normalize=normalize), (phi,))


@pytest.mark.parametrize("kind", KINDS)
def test_gram_form_matches_features(kind):
    torch.manual_seed(4)
    phi = torch.randn(3, 6, 8, dtype=torch.float64)
    gram = phi @ phi.transpose(-1, -2)
    torch.testing.assert_close(separation_loss_from_gram(gram, 2.0, kind), separation_loss(phi, 2.0, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_stable_for_large_t_and_scale(kind):
    torch.manual_seed(5)
    phi = torch.randn(6, 4) * 1e4
    for t in (1e-6, 1e3, 1e6):
        out = separation_loss(phi, t, kind)
        assert torch.isfinite(out)
    phi.requires_grad_(True)
    separation_loss(phi, 1e3, kind).backward()
    assert torch.isfinite(phi.grad).all()


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 6),
    d=st.integers(1, 5),
    t=st.floats(0.05, 10.0),
    seed=st.integers(0, 10_000),
)
def test_bounds_property(m, d, t, seed):
    """On the unit sphere dist^2 <= 4, so -4t <= average <= max <= 0; the orthogonal form lies in [-2t, 0]."""
    gen = torch.Generator().manual_seed(seed)
    phi = torch.randn(m, d, generator=gen, dtype=torch.float64)
    avg, mx = separation_loss(phi, t, "average").item(), separation_loss(phi, t, "max").item()
    orth = separation_loss(phi, t, "orthogonal").item()
    assert -4 * t - 1e-9 <= avg <= mx + 1e-9 <= 1e-9
    assert -2 * t - 1e-9 <= orth <= 1e-9


def test_min_pairwise_distance_and_sq_distances():
    phi = _three_vectors()
    dist = pairwise_sq_distances(phi)
    assert dist[0, 1].item() == pytest.approx(2.0)
    assert min_pairwise_distance(phi).item() == pytest.approx(math.sqrt(2 - math.sqrt(2)))
    assert min_pairwise_distance(phi * 3, normalize=False).item() == pytest.approx(3 * math.sqrt(2 - math.sqrt(2)))


def test_minimising_average_loss_separates():
    torch.manual_seed(6)
    phi = (torch.randn(8, 4) + 3.0).requires_grad_(True)  # crowded around one direction
    start = min_pairwise_distance(phi.detach()).item()
    opt = torch.optim.SGD([phi], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        separation_loss(phi).backward()
        opt.step()
    assert min_pairwise_distance(phi.detach()).item() > start + 0.3


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(1, 4),), "at least 2 patterns"),
        ((torch.randn(4),), r"shape \(\.\.\., M, D_phi\)"),
        ((torch.randn(3, 4), 0.0), "t .* positive"),
        ((torch.randn(3, 4), -1.0), "t .* positive"),
        ((torch.randn(3, 4), float("nan")), "t .* positive"),
        ((torch.randn(3, 4), 2.0, "mean"), "kind must be one of"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        separation_loss(*args)


def test_bad_types():
    with pytest.raises(TypeError, match="floating-point"):
        separation_loss(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        separation_loss([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="square Gram"):
        separation_loss_from_gram(torch.randn(3, 4))
