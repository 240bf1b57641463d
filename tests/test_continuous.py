"""Continuous-time memory (Santos et al. 2025): basis maths, ridge compression, Gibbs update, energy, layers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hopformer.functional import hopfield_retrieve
from hopformer.functional.continuous import (
    basis_responsibilities,
    continuous_energy,
    continuous_retrieve,
    gaussian_basis,
    gaussian_integral,
    masked_ridge_coefficients,
    memory_positions,
    rectangular_basis,
    ridge_coefficients,
    ridge_factor,
    trapezoid_rule,
)
from hopformer.layers import (
    ContinuousHopfield,
    ContinuousHopfieldAttention,
    GaussianBasis,
    RectangularBasis,
    attention_layer,
)

D64 = torch.float64


def _boxes(length: int, num_basis: int, ridge: float) -> torch.Tensor:
    t = memory_positions(length, dtype=D64)
    return ridge_factor(rectangular_basis(t, num_basis).T, ridge)


def test_basis_integrals_closed_form_match_quadrature():
    nodes, weights = trapezoid_rule(20001, dtype=D64)
    centers, widths = torch.tensor([0.0, 0.3, 1.0], dtype=D64), torch.tensor([0.1, 0.05, 0.3], dtype=D64)
    quad = weights @ gaussian_basis(nodes, centers, widths)
    torch.testing.assert_close(quad, gaussian_integral(centers, widths), atol=1e-7, rtol=0)
    assert weights.sum().item() == pytest.approx(1.0)
    boxes = RectangularBasis(7)
    torch.testing.assert_close(weights @ boxes(nodes), boxes.integral().to(D64), atol=1e-3, rtol=0)
    assert GaussianBasis(5).integral().shape == (5,)


def test_boxes_with_n_equal_l_and_no_ridge_is_discrete_hopfield():
    torch.manual_seed(0)
    memories, query = torch.randn(2, 3, 12, 6, dtype=D64), torch.randn(2, 3, 4, 6, dtype=D64)
    coef = ridge_coefficients(memories, _boxes(12, 12, 1e-12))
    torch.testing.assert_close(coef, memories, atol=1e-9, rtol=0)
    for steps in (1, 3):
        out = continuous_retrieve(query, coef, beta=0.7, steps=steps)
        ref = hopfield_retrieve(query, memories, beta=0.7, steps=steps)
        torch.testing.assert_close(out, ref, atol=1e-9, rtol=0)


def test_quadrature_converges_to_closed_form_for_boxes():
    torch.manual_seed(1)
    memories, query = torch.randn(40, 5, dtype=D64), torch.randn(3, 5, dtype=D64)
    coef = ridge_coefficients(memories, _boxes(40, 8, 0.1))
    exact_out, exact_e = continuous_retrieve(query, coef, beta=1.0), continuous_energy(query, coef, beta=1.0)
    errors = []
    for k in (50, 500, 5000):
        nodes, weights = trapezoid_rule(k, dtype=D64)
        psi = rectangular_basis(nodes, 8)
        out = continuous_retrieve(query, coef, beta=1.0, psi=psi, quad_weights=weights)
        energy = continuous_energy(query, coef, beta=1.0, psi=psi, quad_weights=weights)
        errors.append(max((out - exact_out).abs().max().item(), (energy - exact_e).abs().max().item()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 5e-3


def test_ridge_factor_is_the_ridge_solution():
    torch.manual_seed(2)
    t = memory_positions(30, dtype=D64)
    design = gaussian_basis(t, memory_positions(6, dtype=D64), torch.full((6,), 0.2, dtype=D64)).T
    memories = torch.randn(30, 4, dtype=D64)
    coef = ridge_coefficients(memories, ridge_factor(design, 0.5))
    ref = torch.linalg.solve(design @ design.T + 0.5 * torch.eye(6, dtype=D64), design @ memories)
    torch.testing.assert_close(coef, ref)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    beta=st.floats(0.1, 5.0),
    num_basis=st.integers(1, 12),
    quadrature=st.booleans(),
)
def test_energy_non_increasing_along_updates(seed, beta, num_basis, quadrature):
    gen = torch.Generator().manual_seed(seed)
    memories = torch.randn(16, 3, generator=gen, dtype=D64) * 2
    q = torch.randn(4, 3, generator=gen, dtype=D64) * 2
    coef = ridge_coefficients(memories, _boxes(16, num_basis, 0.01))
    psi, weights = (None, None)
    if quadrature:
        nodes, weights = trapezoid_rule(64, dtype=D64)
        psi = rectangular_basis(nodes, num_basis)
    energies = [continuous_energy(q, coef, beta=beta, psi=psi, quad_weights=weights)]
    for _ in range(6):
        q = continuous_retrieve(q, coef, beta=beta, psi=psi, quad_weights=weights)
        energies.append(continuous_energy(q, coef, beta=beta, psi=psi, quad_weights=weights))
    for before, after in zip(energies, energies[1:]):
        assert (after <= before + 1e-9).all()


def test_energy_uses_one_over_beta_log_z():
    coef = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=D64)
    q = torch.tensor([[0.5, 0.25]], dtype=D64)
    beta = 3.0
    z = (math.exp(beta * 0.5) + math.exp(beta * 0.5)) / 2
    expected = -math.log(z) / beta + 0.5 * (0.25 + 0.0625)
    assert continuous_energy(q, coef, beta=beta).item() == pytest.approx(expected)


def test_gradcheck_compression_and_gibbs_update():
    torch.manual_seed(3)
    nodes, weights = trapezoid_rule(40, dtype=D64)
    centers = memory_positions(5, dtype=D64).requires_grad_()
    widths = torch.full((5,), 0.2, dtype=D64, requires_grad=True)
    memories = torch.randn(2, 9, 3, dtype=D64, requires_grad=True)
    query = torch.randn(2, 4, 3, dtype=D64, requires_grad=True)

    def gaussian(memories, query, centers, widths):
        design = gaussian_basis(memory_positions(9, dtype=D64), centers, widths).T
        coef = ridge_coefficients(memories, ridge_factor(design, 0.1))
        psi = gaussian_basis(nodes, centers, widths)
        return continuous_retrieve(query, coef, beta=0.8, psi=psi, quad_weights=weights, steps=2), \
            continuous_energy(query, coef, beta=0.8, psi=psi, quad_weights=weights)

    assert torch.autograd.gradcheck(gaussian, (memories, query, centers, widths))

    valid = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    boxes = RectangularBasis(4)

    def masked(memories, query):
        coef = masked_ridge_coefficients(memories, valid, boxes, 0.1)
        return continuous_retrieve(query, coef, beta=1.3, steps=2)

    assert torch.autograd.gradcheck(masked, (memories, query))


def test_responsibilities_are_a_distribution():
    torch.manual_seed(4)
    coef = torch.randn(6, 4)
    nodes, weights = trapezoid_rule(100)
    for psi in (None, rectangular_basis(nodes, 6)):
        r = basis_responsibilities(torch.randn(3, 4), coef, beta=2.0, psi=psi, quad_weights=weights)
        torch.testing.assert_close(r.sum(-1), torch.ones(3))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: RectangularBasis(0), "num_basis"),
        (lambda: ContinuousHopfield(8, num_basis=0), "num_basis"),
        (lambda: ContinuousHopfield(8, num_points=1), "num_points"),
        (lambda: trapezoid_rule(1), "num_points"),
        (lambda: ContinuousHopfield(8, ridge=-1.0), "ridge"),
        (lambda: ridge_factor(torch.ones(2, 3), -0.1), "ridge"),
        (lambda: ContinuousHopfield(8, basis="gaussian", integration="exact"), "exact"),
        (lambda: ContinuousHopfield(8)(torch.randn(1, 3, 8), torch.randn(1, 0, 8)), "at least one"),
        (lambda: ridge_coefficients(torch.randn(0, 3), torch.randn(2, 0)), "L >= 1"),
        (lambda: continuous_retrieve(torch.randn(2, 3), torch.randn(0, 3), beta=1.0), "N >= 1"),
        (lambda: ridge_factor(rectangular_basis(memory_positions(3), 5).T, 0.0), "singular"),
        (lambda: ContinuousHopfield(8, separation="sparsemax"), "Gibbs"),
    ],
)
def test_bad_input_raises_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_layer_shapes_masks_and_association():
    torch.manual_seed(5)
    layer = ContinuousHopfield(16, 2, num_basis=6)
    state, stored = torch.randn(2, 5, 16), torch.randn(2, 20, 16)
    out, resp = layer(state, stored, return_association=True)
    assert out.shape == (2, 5, 16) and resp.shape == (2, 2, 5, 6)
    assert layer.energy(state, stored).shape == (2, 2, 5)
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[1, 12:] = True
    masked = layer(state, stored, key_padding_mask=padding)
    torch.testing.assert_close(masked[1], layer(state[1:], stored[1:, :12])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked[0], out[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(state, stored, attn_mask=torch.zeros(5, 20, dtype=torch.bool))
    assert torch.isfinite(layer(state, stored, key_padding_mask=torch.ones(2, 20, dtype=torch.bool))).all()


def test_layer_without_projection_is_discrete_hopfield_with_n_equal_l():
    torch.manual_seed(6)
    layer = ContinuousHopfield(8, 1, num_basis=10, ridge=0.0, project=False, beta=0.9, update_steps=2).double()
    state, stored = torch.randn(3, 4, 8, dtype=D64), torch.randn(3, 10, 8, dtype=D64)
    ref = hopfield_retrieve(state[:, None], stored[:, None], beta=0.9, steps=2)[:, 0]
    torch.testing.assert_close(layer(state, stored), ref)


def test_factor_is_cached_and_gaussian_layer_learns():
    torch.manual_seed(7)
    layer = ContinuousHopfield(8, 2, num_basis=4, basis="gaussian", num_points=64)
    x = torch.randn(4, 10, 8)
    layer(x)
    layer(x)
    assert sum(key[0] == "factor" for key in layer.memory._cache) == 1
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    target = torch.randn(4, 10, 8)
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_timm_attention_drop_in():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(8)
    attn = ContinuousHopfieldAttention(16, 2, num_basis=4, qkv_bias=True)
    x = torch.randn(2, 9, 16)
    assert attn(x).shape == x.shape and attn.energy(x).shape == (2, 2, 9)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3,
                            attn_layer=attention_layer("continuous", "softmax", {"num_basis": 5, "basis": "gaussian"}))
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    with pytest.raises(ValueError, match="attn_mask"):
        attn(x, attn_mask=torch.ones(9, 9, dtype=torch.bool))


def test_experiment_short_run(tmp_path):
    """Short end-to-end run of the continuous-memory experiment (real data when present)."""
    import csv

    from hopformer.experiments import default_data_dir
    from hopformer.experiments.continuous_memory import main

    data = default_data_dir() or tmp_path / "absent"
    out = main(["--lengths", "64", "--num-basis", "8", "64", "--sets", "2", "--queries", "16", "--noise", "1",
                "--out", str(tmp_path), "--data-dir", str(data)])
    with open(out / "retrieval.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and (out / "energy_contours.png").is_file()
    for row in rows:
        for method in ("discrete-L", "discrete-sub", "continuous"):
            assert -1.0 <= float(row[f"{method}_mean"]) <= 1.0
        if row["N"] == "64":  # N = L boxes, ridge 1e-3: the continuous memory is the discrete one
            assert abs(float(row["continuous_mean"]) - float(row["discrete-L_mean"])) < 1e-2
