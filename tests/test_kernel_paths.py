"""The sparse attention kernels' torch-op paths (`set_kernel_path`): the torch-op kernels ("torch") against
the reference kernels (those before the small-sequence work of issue 14), the exp-log power `_pow_pos`,
`_xlogx`, the balanced blocks, float64 gradchecks of every path and the switch itself. The fused C++
kernels ("native", the default where they build) are tested against "torch" in `test_native_kernels.py`."""

from __future__ import annotations

import entmax as pkg
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hopformer.functional._separated_attention as sa
import hopformer.functional._separation_kernels as sk
from hopformer.functional import get_kernel_path, set_kernel_path
from hopformer.functional.separation import entmax, separated_attention
from kernel_cases import assert_float32_no_worse, qkv, run_on_path


@pytest.fixture
def restore_path():
    yield
    set_kernel_path(None)


# ----------------------------------------------------------------------------- the two paths agree


@pytest.mark.parametrize("separation", ["sparsemax", "entmax15"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsemax_entmax15_paths_identical(separation, dtype, restore_path):
    """Same arithmetic for every row on both paths (only the block layout and a skipped row maximum
    differ), so the results are bitwise equal."""
    q, k, v = qkv(4, 4, 65, 65, dtype=dtype)  # 16 groups of 65 x 65: the mini ViT's row length
    mask = torch.rand(65, 65, generator=torch.Generator().manual_seed(1)) > 0.2
    for m in (None, mask):
        ref = run_on_path("reference", q, k, v, separation, m)
        new = run_on_path("torch", q, k, v, separation, m)
        for a, b in zip(new, ref):
            assert torch.equal(a, b)


def _alpha(alpha, dtype):
    if alpha == "per_head":
        return torch.tensor([1.02, 1.3, 1.97, 2.0], dtype=dtype).reshape(4, 1, 1).requires_grad_(True)
    return alpha


@pytest.mark.parametrize("alpha", [1.3, 1.05, 1.95, "per_head"])
def test_general_alpha_paths_agree(alpha, restore_path):
    """exp-log powers instead of `torch.pow` / `xlogy`: in float64 equal to float rounding, also
    d loss / d alpha, with alpha = 2 rows (0^0 = 0) and alpha near 1 and 2; in float32 no further from
    the float64 result than the reference kernels (d alpha at alpha = 1.02 amplifies rounding by
    1 / (alpha - 1)^2: both paths are off by 1e-5..1e-3 there)."""
    q, k, v = qkv(2, 4, 40, 65)
    truth = run_on_path("reference", q, k, v, _alpha(alpha, torch.float64))
    new = run_on_path("torch", q, k, v, _alpha(alpha, torch.float64))
    for a, b in zip(new, truth):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max() <= 1e-11 * max(1.0, b.abs().max().item())
    assert torch.equal(new[0] == 0, truth[0] == 0)  # the same exact zeros
    assert_float32_no_worse("torch", "reference", q, k, v, _alpha(alpha, torch.float32), truth)


@pytest.mark.parametrize("path", ["torch", "auto"])
@pytest.mark.parametrize("alpha", [1.3, 1.9])
def test_general_alpha_matches_entmax_package(alpha, path, restore_path):
    """The torch-op and the default path against the `entmax` package's bisection on materialised scores."""
    set_kernel_path(path)
    q, k, v = qkv(2, 2, 33, 65)
    scores = q @ k.transpose(-1, -2) * 8**-0.5
    ref = pkg.entmax_bisect(scores, alpha, dim=-1, n_iter=100) @ v
    out = separated_attention(q, k, v, separation=alpha)
    assert torch.allclose(out, ref, atol=1e-9)
    z = torch.randn(50, 65, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    assert torch.allclose(entmax(z, alpha), pkg.entmax_bisect(z, alpha, dim=-1, n_iter=100), atol=1e-10)


@pytest.mark.parametrize("path", ["torch", "auto"])
@pytest.mark.parametrize("separation", ["sparsemax", "entmax15", 1.4, "per_head"])
def test_gradcheck_current_path(separation, path, restore_path):
    """float64 gradcheck of the torch-op and the default kernels at a short row length (alpha = 1.05
    and 1.95 rows exercise the powers near both ends)."""
    set_kernel_path(path)
    q, k, v = qkv(1, 3, 5, 9, 3)
    inputs = (q, k, v)
    if separation == "per_head":
        separation = torch.tensor([1.05, 1.5, 1.95], dtype=torch.float64).reshape(3, 1, 1).requires_grad_(True)
        inputs = inputs + (separation,)

    def f(q, k, v, *a):
        return separated_attention(q, k, v, separation=a[0] if a else separation)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("path", ["torch", "auto"])
def test_inference_mode_and_no_grad(path, restore_path):
    set_kernel_path(path)
    q, k, v = qkv(2, 4, 65, 65, dtype=torch.float32)
    alpha = torch.tensor([1.2, 1.5, 1.8, 2.0]).reshape(4, 1, 1)
    ref = separated_attention(q, k, v, separation=alpha).detach()
    with torch.inference_mode():
        out = separated_attention(q.detach(), k.detach(), v.detach(), separation=alpha)
    assert torch.equal(out, ref)


# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pow_pos_matches_pow(dtype):
    gen = torch.Generator().manual_seed(0)
    r = (torch.randn(300, 65, generator=gen, dtype=torch.float64) - 0.5).relu_().to(dtype)
    r[0, :3] = torch.tensor([1e-30, 1.0, 3.0], dtype=dtype)
    y = torch.linspace(0.0, 20.0, 300, dtype=dtype).reshape(300, 1)  # y = 0: alpha = 2 rows
    ref = torch.where(r > 0, torch.pow(r, y), torch.zeros_like(r))
    out = sk._pow_pos(r, y, torch.empty_like(r))
    assert torch.equal(out == 0, r == 0)  # exact zeros exactly off the support, also for y = 0
    floor = 1e-34 if dtype == torch.float32 else 1e-300
    rel = ((out - ref).abs() / ref.clamp_min(floor))[ref > floor]
    eps = torch.finfo(dtype).eps
    assert rel.max() <= 300 * eps  # |y log r| <= about 200 here
    assert (out[ref <= floor] <= 2 * floor).all()
    for scalar in (0.0, 0.5, 2.333):
        ref = torch.where(r > 0, torch.pow(r, scalar), torch.zeros_like(r))
        assert torch.allclose(sk._pow_pos(r, scalar), ref, rtol=100 * eps, atol=floor)


def test_xlogx_matches_xlogy(restore_path):
    p = torch.softmax(torch.randn(50, 65, dtype=torch.float64), -1)
    p[p < 0.01] = 0.0
    out = sk._xlogx(p, torch.empty_like(p))
    assert torch.equal(out == 0, (p == 0) | (p == 1))
    assert torch.allclose(out, torch.xlogy(p, p), rtol=1e-14, atol=0)


@settings(max_examples=60, deadline=None)
@given(groups=st.integers(1, 300), n=st.integers(1, 300), m=st.integers(1, 5000), chunk=st.sampled_from([64, 4096, 1 << 18]))
def test_blocks_cover_every_row_once_and_are_balanced(groups, n, m, chunk):
    old = sa._CHUNK_ELEMS
    sa._CHUNK_ELEMS = chunk
    try:
        blocks = list(sa._blocks(groups, n, m, torch.device("cpu")))
        step, per = sa._block_rows(groups, n, m, torch.device("cpu"))
    finally:
        sa._CHUNK_ELEMS = old
    seen = torch.zeros(groups, n, dtype=torch.long)
    for gs, rs in blocks:
        seen[gs, rs] += 1
        assert (gs.stop - gs.start) * (rs.stop - rs.start) <= step * per  # fits the workspace
    assert (seen == 1).all()
    if m >= sa._LONG_ROW:  # long rows: about _MIN_BLOCK_ROWS rows (balanced whole groups: at least half)
        assert 2 * step * per >= min(groups * n, sa._MIN_BLOCK_ROWS, sa._MAX_BLOCK_ELEMS // m)
        chunk = max(chunk, min(sa._MIN_BLOCK_ROWS, sa._MAX_BLOCK_ELEMS // m) * m)
    if per == n and groups * n * m >= chunk:  # whole groups: at most 1.5x the block size, sizes balanced
        assert step * n * m <= 1.5 * chunk + n * m
        sizes = [gs.stop - gs.start for gs, _ in blocks]
        assert max(sizes) - min(sizes) <= max(1, len(blocks) - 1)


# ----------------------------------------------------------------------------- the switch


def test_switch_and_environment_variable(restore_path, monkeypatch):
    assert get_kernel_path() == "auto"
    set_kernel_path("reference")
    assert get_kernel_path() == "reference"
    monkeypatch.setenv("HOPFORMER_KERNEL_PATH", "auto")
    assert get_kernel_path() == "reference"  # the function wins
    set_kernel_path(None)
    monkeypatch.setenv("HOPFORMER_KERNEL_PATH", "reference")
    assert get_kernel_path() == "reference"
    for path in ("torch", "native"):
        monkeypatch.setenv("HOPFORMER_KERNEL_PATH", path)
        assert get_kernel_path() == path
    monkeypatch.setenv("HOPFORMER_KERNEL_PATH", "fast")
    with pytest.raises(ValueError, match="HOPFORMER_KERNEL_PATH.*'fast'"):
        get_kernel_path()
    with pytest.raises(ValueError, match="set_kernel_path.*'short'"):
        set_kernel_path("short")


@pytest.mark.parametrize("alpha", [1.5, 1.3, 2.0, "rows"])
def test_gppr_paths_agree(alpha, restore_path):
    """`p^(2 - alpha)` of the maps' backward: exp-log power against `torch.pow` / `sqrt`."""
    p = torch.softmax(torch.randn(40, 65, dtype=torch.float64) * 3, -1)
    p[p < 0.005] = 0.0
    if alpha == "rows":
        alpha = torch.linspace(1.05, 2.0, 40, dtype=torch.float64).reshape(40, 1)
    results = []
    for path in ("reference", "torch"):
        set_kernel_path(path)
        results.append(sk._gppr(p, alpha, torch.empty_like(p), torch.empty_like(p)))
    assert torch.equal(results[0] == 0, p == 0) and torch.equal(results[1] == 0, p == 0)
    assert torch.allclose(results[1], results[0], rtol=1e-13, atol=0)
