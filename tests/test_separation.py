"""Tests of the separation maps (hopformer.functional.separation): simplex, masks, dtypes,
equivalence with the `entmax` package and torch.softmax, float64 gradchecks, properties, bad input."""

from __future__ import annotations

import entmax as pkg
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hopformer.functional.separation import (
    SEPARATIONS,
    check_separation,
    entmax,
    entmax15,
    is_softmax,
    separate,
    separated_attention,
    separation_conjugate,
    softmax,
    sparsemax,
)

NEG_INF = float("-inf")
ALL_SEPS = ["softmax", "sparsemax", "entmax15", 1.3, 1.75, 1.05, 1.95]


def _ref(separation, z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if separation == "softmax":
        return torch.softmax(z, dim=dim)
    if separation == "sparsemax":
        return pkg.sparsemax(z, dim=dim)
    if separation == "entmax15":
        return pkg.entmax15(z, dim=dim)
    return pkg.entmax_bisect(z, separation, dim=dim, n_iter=100)


def _scores(*shape, scale=2.0, seed=0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# ----------------------------------------------------------------------------- simplex, masks, dtypes


@pytest.mark.parametrize("separation", ALL_SEPS + [torch.tensor([[1.2], [1.5], [2.0], [1.0]])])
def test_simplex_and_masks(separation):
    z = _scores(4, 33)
    z[0, :5] = NEG_INF
    z[2] = NEG_INF  # a fully masked row
    p = separate(z, separation)
    assert p.shape == z.shape and p.dtype == z.dtype
    assert torch.isfinite(p).all() and (p >= 0).all()
    assert torch.allclose(p[[0, 1, 3]].sum(-1), torch.ones(3), atol=1e-5)
    assert (p[0, :5] == 0).all(), "-inf entries must get exactly zero weight"
    assert (p[2] == 0).all(), "an all -inf row returns all zeros"
    psi = separation_conjugate(z, separation)
    assert psi.shape == (4,) and torch.isfinite(psi).all() and psi[2] == 0


@pytest.mark.parametrize("separation", ALL_SEPS)
def test_fully_masked_rows_have_finite_gradients(separation):
    z = _scores(3, 9)
    z[1] = NEG_INF
    z.requires_grad_(True)
    (separate(z, separation) * _scores(3, 9, seed=1)).sum().backward()
    assert torch.isfinite(z.grad).all()
    assert (z.grad[1] == 0).all()


@pytest.mark.parametrize("separation", ALL_SEPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(separation, dtype):
    z = _scores(8, 40, dtype=dtype)
    p = separate(z, separation)
    assert p.dtype == dtype
    ref = _ref(separation, z.double())
    tol = 1e-10 if dtype == torch.float64 else 1e-2
    assert torch.allclose(p.double(), ref, atol=tol)


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax15", 1.3])
def test_bf16_autocast_computes_in_float32(separation):
    x = _scores(2, 16, 8)
    w = _scores(8, 8, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = x @ w @ x.transpose(-1, -2)
        assert scores.dtype == torch.bfloat16
        p = separate(scores, separation)
    assert p.dtype == torch.bfloat16
    ref = _ref(separation, scores.float())
    assert torch.allclose(p.float(), ref, atol=1e-2)
    assert torch.allclose(p.float().sum(-1), torch.ones(2, 16), atol=2e-2)


@pytest.mark.parametrize("separation", ALL_SEPS)
def test_huge_scores_stay_on_simplex(separation):
    z = _scores(4, 50, scale=1e8)  # thresholds are solved relative to the row max
    p = separate(z, separation)
    assert torch.allclose(p.sum(-1), torch.ones(4), atol=1e-5)
    q, k = _scores(2, 5, 4, scale=1e4), _scores(2, 6, 4, scale=1e4, seed=1)
    out = separated_attention(q, k, torch.ones(2, 6, 1), separation=separation, beta=1.0)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)


def test_dim_argument_and_noncontiguous():
    z = _scores(5, 7, 6)
    for sep in ["sparsemax", "entmax15", 1.4]:
        p = separate(z, sep, dim=1)
        ref = _ref(sep, z.transpose(1, 2).contiguous()).transpose(1, 2)
        assert torch.allclose(p, ref, atol=1e-5)
        pt = separate(z.transpose(0, 2), sep, dim=-1)
        assert torch.allclose(pt, _ref(sep, z.transpose(0, 2).contiguous()), atol=1e-5)


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("separation", ALL_SEPS)
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_matches_reference_values_and_gradients(separation, scale):
    z = _scores(64, 50, scale=scale).requires_grad_(True)
    zr = z.detach().clone().requires_grad_(True)
    g = _scores(64, 50, seed=5)
    p, r = separate(z, separation), _ref(separation, zr)
    assert torch.allclose(p, r, atol=1e-5)
    (p * g).sum().backward()
    (r * g).sum().backward()
    assert torch.allclose(z.grad, zr.grad, atol=1e-4)
    if separation in ("sparsemax", "entmax15"):
        assert torch.equal(p == 0, r == 0), "exact support"


@pytest.mark.parametrize("separation", ["sparsemax", "entmax15", 1.1, 1.3, 1.7])
def test_long_rows_float32_match_float64_reference(separation):
    z = _scores(8, 2048, scale=1.0)
    ref = _ref(separation, z.double())
    assert torch.allclose(separate(z, separation).double(), ref, atol=1e-5)
    q, k, v = _scores(2, 8, 4, seed=1), _scores(2, 2048, 4, seed=2), _scores(2, 2048, 4, seed=3)
    out = separated_attention(q, k, v, separation=separation)
    assert torch.allclose(out.double(), _ref(separation, (q @ k.transpose(-1, -2) / 2).double()) @ v.double(), atol=1e-5)


def test_named_and_float_alpha_agree():
    z = _scores(16, 30)
    assert torch.equal(entmax(z, 2.0), sparsemax(z))
    assert torch.equal(entmax(z, 1.5), entmax15(z))
    assert torch.equal(entmax(z, 1.0), softmax(z))
    assert torch.allclose(softmax(z), torch.softmax(z, -1))
    # a tensor alpha of 2 / 1.5 / 1 goes through the general path and agrees
    for a, f in [(2.0, sparsemax), (1.5, entmax15), (1.0, softmax)]:
        assert torch.allclose(entmax(z, torch.full((16, 1), a)), f(z), atol=1e-6)


def test_tensor_alpha_per_head_matches_rowwise():
    z = _scores(2, 3, 5, 12)
    alpha = torch.tensor([1.2, 1.6, 1.9]).reshape(3, 1, 1)
    p = entmax(z, alpha)
    for h, a in enumerate([1.2, 1.6, 1.9]):
        assert torch.allclose(p[:, h], pkg.entmax_bisect(z[:, h], a, n_iter=100), atol=1e-5)


# ----------------------------------------------------------------------------- gradcheck (float64)


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax15", 1.3, 1.8])
def test_gradcheck_scores(separation):
    z = _scores(3, 4, 7, scale=1.5, dtype=torch.float64)
    z[0, 0, :2] = NEG_INF
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: separate(s, separation), (z,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape", [(), (1,), (3, 1), (2, 3, 1)])
def test_gradcheck_alpha(shape):
    z = _scores(2, 3, 6, scale=1.5, dtype=torch.float64).requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    alpha = (1.15 + 0.7 * torch.rand(shape, generator=gen, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, a: entmax(s, a), (z, alpha), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax15", 1.3])
def test_gradcheck_conjugate_and_danskin(separation):
    z = _scores(3, 7, scale=1.5, dtype=torch.float64)
    z[1, 0] = NEG_INF
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: separation_conjugate(s, separation), (z,), eps=1e-6, atol=1e-5)
    (grad,) = torch.autograd.grad(separation_conjugate(z, separation).sum(), z)
    assert torch.allclose(grad, separate(z, separation).detach(), atol=1e-10)


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax15", 1.3])
def test_gradgradcheck_maps_and_conjugate(separation):
    """Double backward (e.g. gradients of energy gradients) goes through differentiable formulas."""
    z = _scores(3, 6, scale=1.5, dtype=torch.float64)
    z[1, 0] = NEG_INF
    z.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda s: separate(s, separation), (z,), atol=1e-5)
    assert torch.autograd.gradgradcheck(lambda s: separation_conjugate(s, separation), (z,), atol=1e-5)
    alpha = torch.tensor([[1.2], [1.5], [1.8]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda s, a: entmax(s, a), (z, alpha), atol=1e-5)
    assert torch.autograd.gradgradcheck(lambda s, a: separation_conjugate(s, a), (z, alpha), atol=1e-5)


def test_gradcheck_conjugate_alpha():
    z = _scores(4, 6, scale=1.5, dtype=torch.float64).requires_grad_(True)
    alpha = torch.tensor([[1.2], [1.5], [1.7], [1.95]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, a: separation_conjugate(s, a), (z, alpha), eps=1e-6, atol=1e-5)


def test_conjugate_values():
    z = _scores(5, 9, dtype=torch.float64)
    assert torch.allclose(separation_conjugate(z, "softmax"), torch.logsumexp(z, -1))
    p = pkg.sparsemax(z, dim=-1)
    assert torch.allclose(separation_conjugate(z, "sparsemax"), (p * z).sum(-1) - 0.5 * (p * p).sum(-1) + 0.5)
    # max-regularised value is at least the value at any other point of the simplex, e.g. uniform
    for sep, a in [("entmax15", 1.5), (1.3, 1.3), (1.9, 1.9)]:
        u = torch.full_like(z, 1 / 9)
        omega_u = ((u**a).sum(-1) - 1) / (a * (a - 1))
        assert (separation_conjugate(z, sep) >= (u * z).sum(-1) - omega_u - 1e-12).all()
    # alpha -> 1 approaches logsumexp
    assert torch.allclose(separation_conjugate(z, 1.0001), torch.logsumexp(z, -1), atol=1e-2)


# ----------------------------------------------------------------------------- properties

_rows = st.integers(1, 4)
_cols = st.integers(1, 40)
_alphas = st.sampled_from(["softmax", "sparsemax", "entmax15", 1.1, 1.3, 1.6, 1.9])


@settings(max_examples=40, deadline=None)
@given(rows=_rows, cols=_cols, seed=st.integers(0, 10_000), scale=st.floats(0.01, 50.0), separation=_alphas)
def test_property_simplex_and_permutation_equivariance(rows, cols, seed, scale, separation):
    z = _scores(rows, cols, scale=scale, seed=seed)
    p = separate(z, separation)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(rows), atol=1e-5)
    perm = torch.randperm(cols, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(separate(z[:, perm], separation), p[:, perm], atol=1e-6)
    # ordering is preserved: larger scores never get smaller weights
    order = torch.argsort(z, dim=-1)
    assert (torch.diff(torch.gather(p, -1, order), dim=-1) >= -1e-6).all()


@settings(max_examples=30, deadline=None)
@given(cols=st.integers(8, 64), seed=st.integers(0, 10_000))
def test_property_sparsemax_has_exact_zeros_softmax_never(cols, seed):
    z = torch.linspace(0.0, 10.0, cols)[torch.randperm(cols, generator=torch.Generator().manual_seed(seed))]
    z = z.unsqueeze(0)  # spread-out scores: gaps of at least 10 / 63 > 0
    assert (sparsemax(z) == 0).sum() >= cols - 7
    assert (entmax15(z) == 0).any()
    assert (entmax(z, 1.7) == 0).any()
    assert (softmax(z) > 0).all()


@settings(max_examples=20, deadline=None)
@given(cols=st.integers(2, 30), seed=st.integers(0, 10_000))
def test_property_alpha_limits(cols, seed):
    z = _scores(2, cols, seed=seed, dtype=torch.float64)
    assert torch.allclose(entmax(z, 2.0 - 1e-7), sparsemax(z), atol=1e-5)
    assert torch.allclose(entmax(z, 1.0 + 1e-4), softmax(z), atol=1e-2)
    assert torch.equal(entmax(z, 1.0), softmax(z))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), beta=st.floats(0.05, 8.0), separation=_alphas, n=st.integers(2, 12))
def test_property_cccp_energy_non_increasing(seed, beta, separation, n):
    """E(x) = -(1/beta) Psi*(beta K x) + 0.5 <x, x> does not increase along x <- K^T Sep(beta K x)."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(5, generator=gen, dtype=torch.float64)

    def energy(x):
        return -separation_conjugate(beta * keys @ x, separation) / beta + 0.5 * x @ x

    e = energy(x)
    for _ in range(6):
        x = keys.T @ separate(beta * keys @ x, separation)
        e_new = energy(x)
        assert e_new <= e + 1e-9
        e = e_new


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", ["relu", "Softmax", 0.5, 2.5, -1.0, True, None, [1.5]])
def test_bad_separation_raises(bad):
    with pytest.raises(ValueError, match="separation"):
        check_separation(bad)
    with pytest.raises(ValueError, match="separation"):
        separate(_scores(2, 3), bad)


def test_bad_tensor_alpha_raises():
    z = _scores(2, 3, 4)
    assert separate(z, torch.full((3, 1), 1.5)).shape == z.shape  # one alpha per index of dim 1
    with pytest.raises(ValueError, match=r"separation.*\(4, 1\)"):
        separate(z, torch.full((4, 1), 1.5))
    with pytest.raises(ValueError, match="separation"):
        separate(z, torch.full((2, 3, 4), 1.5))  # not size 1 along dim
    with pytest.raises(ValueError, match="separation"):
        separate(z, torch.tensor([[[0.5]]]))
    with pytest.raises(ValueError, match="separation"):
        separate(z, torch.tensor([[[2]]]))  # integer tensor
    with pytest.raises(ValueError, match="alpha"):
        entmax(z, 2.5)


def test_bad_scores_raise():
    with pytest.raises(ValueError, match="NaN"):
        sparsemax(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="dim"):
        sparsemax(_scores(2, 3), dim=2)
    with pytest.raises(TypeError, match="scores"):
        sparsemax(torch.ones(2, 3, dtype=torch.long))


def test_helpers():
    assert SEPARATIONS == ("softmax", "sparsemax", "entmax15")
    assert is_softmax("softmax") and is_softmax(1.0) and is_softmax(1)
    assert not is_softmax("sparsemax") and not is_softmax(1.5) and not is_softmax(torch.tensor(1.0))
    assert check_separation(1.0) == "softmax" and check_separation(2) == "sparsemax"
    assert check_separation(1.5) == "entmax15" and check_separation(1.25) == 1.25


# ----------------------------------------------------------------------------- fused attention core


def _explicit_attention(q, k, v, separation, beta, mask):
    scores = q @ k.transpose(-1, -2) * beta
    if mask is not None:
        scores = scores.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool else scores + mask
    return separate(scores, separation) @ v


def _qkv(b=2, h=3, n=20, m=17, d=8, dv=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)  # noqa: E731
    return mk(b, h, n, d), mk(b, h, m, d), mk(b, h, m, dv)


@pytest.fixture(params=["default", "tiny_blocks", "no_scratch", "reference_kernels"])
def block_mode(request, monkeypatch):
    """Exercise the multi-block paths (rows split within a group), the GPU-style no-scratch path and
    the reference kernels (`set_kernel_path("reference")`, kept for A/B measurements)."""
    import hopformer.functional._separated_attention as sa
    import hopformer.functional._separation_kernels as sk

    if request.param == "reference_kernels":
        monkeypatch.setattr(sk, "_KERNEL_PATH", "reference")
    if request.param == "tiny_blocks":
        monkeypatch.setattr(sa, "_CHUNK_ELEMS", 64)
        monkeypatch.setattr(sk, "_CHUNK_ELEMS", 64)
    if request.param == "no_scratch":
        monkeypatch.setattr(sk, "_scratch", lambda like, n, count=1: [None] * count)
    return request.param


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax15", 1.3, 1.9, "per_head"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "key_padding"])
def test_separated_attention_matches_explicit(separation, mask_kind, block_mode):
    q, k, v = _qkv()
    if separation == "per_head":
        separation = torch.tensor([1.2, 1.5, 2.0], dtype=torch.float64).reshape(3, 1, 1)
    gen = torch.Generator().manual_seed(2)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 20, 17, generator=gen) > 0.3
        mask[0, 0, 4] = False  # a fully masked row reads out zeros
    elif mask_kind == "float":
        mask = torch.randn(20, 17, generator=gen, dtype=torch.float64)
    elif mask_kind == "key_padding":
        mask = torch.ones(2, 1, 1, 17, dtype=torch.bool)
        mask[1, ..., 10:] = False
    out = separated_attention(q, k, v, separation=separation, beta=0.6, mask=mask)
    ref = _explicit_attention(q, k, v, separation, 0.6, mask)
    assert torch.allclose(out, ref, atol=1e-10)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-9)
    if mask_kind == "bool":
        assert (out[0, :, 4] == 0).all()


@pytest.mark.parametrize("separation", ["sparsemax", "entmax15", 1.4])
def test_gradcheck_separated_attention(separation, block_mode):
    q, k, v = _qkv(1, 2, 6, 5, 3, 2)
    beta = torch.tensor([[[0.9]], [[1.3]]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, True, True, True, False])
    f = lambda q, k, v, b: separated_attention(q, k, v, separation=separation, beta=b, mask=mask)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v, beta), eps=1e-6, atol=1e-5)


def test_gradcheck_separated_attention_alpha(block_mode):
    q, k, v = _qkv(1, 2, 6, 5, 3, 2)
    alpha = torch.tensor([[[1.3]], [[1.8]]], dtype=torch.float64, requires_grad=True)
    per_row = torch.linspace(1.2, 1.9, 6, dtype=torch.float64).reshape(6, 1).requires_grad_(True)
    for a in (alpha, per_row):
        f = lambda q, k, v, a: separated_attention(q, k, v, separation=a)  # noqa: E731
        assert torch.autograd.gradcheck(f, (q, k, v, a), eps=1e-6, atol=1e-5)


def test_separated_attention_dtypes_and_bad_input():
    q, k, v = _qkv(dtype=torch.bfloat16)
    out = separated_attention(q, k, v, separation="entmax15")
    assert out.dtype == torch.bfloat16
    ref = _explicit_attention(q.float(), k.float(), v.float(), "entmax15", 8**-0.5, None)
    assert torch.allclose(out.float(), ref, atol=3e-2)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="separation"):
        separated_attention(q, k, v, separation="relu")
    with pytest.raises(ValueError, match="keys"):
        separated_attention(q, k[..., :4], v, separation="sparsemax")
    with pytest.raises(ValueError, match="mask"):
        separated_attention(q, k, v, separation="sparsemax", mask=torch.ones(3, 17, dtype=torch.bool))
    with pytest.raises(ValueError, match="separation"):
        separated_attention(q, k, v, separation=torch.full((4, 1, 1), 1.5))
