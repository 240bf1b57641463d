"""The fused C++ kernels of the sparse attention core (`hopformer/functional/_native`): agreement with the
torch-op kernels in float32 and float64 (masks, all -inf rows, per-row alpha with alpha = 2 rows, long and
length-1 rows), the tile kernels (short rows, 16 a vector) against the row kernels, the errors on NaN / +inf
scores, worker-count invariance, and the build: the cache folder, and the fallback to the torch-op kernels
(with one warning) when no compiler is found."""

from __future__ import annotations

import platform
import warnings

import pytest
import torch

import hopformer.functional._separation_kernels as sk
from hopformer import set_num_workers
from hopformer.functional import _native, set_kernel_path
from hopformer.functional.separation import separated_attention
from kernel_cases import assert_float32_no_worse, assert_no_worse, qkv, run_on_path

needs_native = pytest.mark.skipif(_native.load() is None, reason=f"native kernels not built: {_native.error()}")


@pytest.fixture
def restore_path():
    yield
    set_kernel_path(None)
    set_num_workers(None)


def _separation(name, dtype):
    if name == "per_head":  # alpha = 2 rows take the sparsemax branch, alpha = 1.5 the general one
        return torch.tensor([1.02, 1.5, 1.97, 2.0], dtype=dtype).reshape(4, 1, 1).requires_grad_(True)
    return name


SEPARATIONS = ["sparsemax", "entmax15", 1.3, 1.9, "per_head"]


def _assert_native_matches(ref_path, q, k, v, separation, mask):
    """Float64 outputs and gradients of the "native" path within 1e-9 of `ref_path`'s, finite, with the same
    exact zeros in the output."""
    ref = run_on_path(ref_path, q, k, v, separation, mask)
    new = run_on_path("native", q, k, v, separation, mask)
    for a, b in zip(new, ref):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max() <= 1e-9 * max(1.0, b.abs().max().item())
    assert torch.equal(new[0] == 0, ref[0] == 0)


@needs_native
@pytest.mark.parametrize("separation", SEPARATIONS)
@pytest.mark.parametrize("n,m", [(65, 65), (7, 1), (3, 1000)])
def test_native_matches_torch_float64(separation, n, m, restore_path):
    q, k, v = qkv(2, 4, n, m)
    mask = torch.rand(n, m, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[0] = False  # an all -inf row: its output and gradients are 0
    for msk in (None, mask):
        _assert_native_matches("torch", q, k, v, _separation(separation, torch.float64), msk)


@needs_native
@pytest.mark.parametrize("separation", SEPARATIONS)
def test_native_float32_as_close_to_float64_as_torch(separation, restore_path):
    """In float32 the native kernels are no further from the float64 result than the torch-op kernels."""
    q, k, v = qkv(2, 4, 65, 300, scale=1.0)
    truth = run_on_path("native", q, k, v, _separation(separation, torch.float64))
    assert_float32_no_worse("native", "torch", q, k, v, _separation(separation, torch.float32), truth)


@needs_native
@pytest.mark.parametrize("separation", SEPARATIONS)
@pytest.mark.parametrize("m,scale", [(515, 1.5), (1000, 0.05), (200, 0.05)])
def test_native_long_rows_float32(separation, m, scale, restore_path):
    """Long rows are searched on their candidates (entries within 1 of the row maximum): in float32 as close to
    the float64 result as the torch-op kernels, with few candidates (large scores) and with every entry a
    candidate (near-uniform scores), masked entries included."""
    q, k, v = qkv(1, 4, 9, m, scale=scale)
    mask = torch.rand(9, m, generator=torch.Generator().manual_seed(2)) > 0.2
    truth = run_on_path("torch", q, k, v, _separation(separation, torch.float64), mask)
    assert_float32_no_worse("native", "torch", q, k, v, _separation(separation, torch.float32), truth, mask)


@needs_native
@pytest.mark.parametrize("separation", ["sparsemax", "entmax15", 1.4, "per_head"])
def test_native_gradcheck(separation, restore_path):
    set_kernel_path("native")
    q, k, v = qkv(1, 4, 5, 9, 3)
    inputs = (q, k, v)
    if separation == "per_head":
        separation = torch.tensor([1.05, 1.5, 1.95, 1.99], dtype=torch.float64).reshape(4, 1, 1).requires_grad_(True)
        inputs = inputs + (separation,)

    def f(q, k, v, *a):
        return separated_attention(q, k, v, separation=a[0] if a else separation)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


@needs_native
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_native_rejects_nan_and_inf_scores(bad, restore_path):
    set_kernel_path("native")
    q, k, v = qkv(1, 2, 4, 5, dtype=torch.float32)
    q = q.detach().clone()
    q[0, 1, 2, 0] = bad
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        separated_attention(q, k, v, separation="entmax15")


@needs_native
@pytest.mark.parametrize("separation", ["sparsemax", 1.3, "per_head"])
def test_native_same_result_for_any_number_of_workers(separation, restore_path):
    torch.set_num_threads(2)
    q, k, v = qkv(16, 4, 65, 65, dtype=torch.float32)
    results = []
    for workers in (1, 2):
        set_num_workers(workers)
        results.append(run_on_path("native", q, k, v, _separation(separation, torch.float32)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- the tile kernels
# Rows of fewer than _TILE_MAX keys: blocks computed transposed, 16 rows a vector (`_native/tiles.cpp`). The
# "rows" path runs the same C++ maps one row at a time: the two agree to rounding.

# one-lane tails (gathered across groups), full tiles, long tiles, m = 1, rows of fewer than 16 queries (all
# gathered), a 14-lane tail (sparsemax and 1.5-entmax: each group's own masked tile; a general alpha: gathered)
TILE_SHAPES = [(65, 65), (16, 7), (33, 130), (3, 255), (40, 1), (30, 20)]


def _per_row_alpha(n: int) -> torch.Tensor:
    """One alpha per query row (shared by batch and heads), rows at exactly 2 and 1.5 included."""
    alpha = torch.rand(n, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.9 + 1.05
    alpha[::3], alpha[1::5] = 2.0, 1.5
    return alpha.requires_grad_(True)


@needs_native
@pytest.mark.parametrize("separation", SEPARATIONS + ["per_row"])
@pytest.mark.parametrize("n,m", TILE_SHAPES)
def test_tiles_match_rows_float64(separation, n, m, restore_path):
    if separation == "per_row":
        separation = _per_row_alpha(n)
    q, k, v = qkv(2, 4, n, m)
    mask = torch.rand(n, m, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[0] = False  # an all -inf row
    for msk in (None, mask):
        _assert_native_matches("rows", q, k, v, _separation(separation, torch.float64), msk)


@needs_native
@pytest.mark.parametrize("kind,alpha,per_row", [("sparsemax", 2.0, False), ("entmax", 1.5, False),
                                                ("entmax", 1.3, False), ("entmax", 1.3, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [33, 14])
def test_tile_kernels_match_row_kernels(kind, alpha, per_row, dtype, n):
    """The C++ calls themselves, every map in both directions (the tile backward takes the alpha-entmax formula
    for every map; the attention core calls it for a general alpha; from kept weights, each map's own): weights,
    thresholds, d loss / d scores and d loss / d alpha of transposed blocks equal the row kernels' on the same
    rows, with -inf entries, an
    all -inf row, one-lane tails gathered across groups (n = 33) and tails of 14 lanes (n = 14: gathered for a
    general alpha, else each group's own masked tile)."""
    gen = torch.Generator().manual_seed(6)
    groups, m = 3, 40
    x = (torch.randn(groups, n, m, generator=gen) * 3).to(dtype)
    x[torch.rand(groups, n, m, generator=gen) < 0.3] = float("-inf")
    x[0, 0] = float("-inf")
    rows = groups * n
    alpha_rows = (torch.rand(rows, generator=gen) * 0.8 + 1.1).to(dtype) if per_row else None
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    stats_r, stats_t = ([torch.empty(rows, dtype=dtype) for _ in range(3)] for _ in range(2))
    x_r = x.reshape(rows, m).clone()
    _native.forward(x_r, x_r, kind, alpha_rows, alpha, tol, 50, *stats_r)
    x_t = x.transpose(1, 2).contiguous()
    _native.forward_tiles(x_t, kind, alpha_rows, alpha, tol, 50, *stats_t)
    eps = 1e-6 if dtype == torch.float32 else 1e-13
    assert (x_t.transpose(1, 2).reshape(rows, m) - x_r).abs().max() <= eps
    assert (stats_t[0] - stats_r[0]).abs().max() <= eps  # thresholds
    g = torch.randn(rows, m, generator=gen).to(dtype)
    grads = []
    for path in ("rows", "tiles", "kept weights"):
        ds = torch.empty(rows, m, dtype=dtype)
        da = torch.empty(rows, dtype=dtype) if per_row else None
        if path == "rows":
            _native.backward(x.reshape(rows, m).clone(), g, ds, kind, alpha_rows, alpha, *stats_r, da)
        else:
            g_b, ds_b = (t.view(groups, n, m).transpose(1, 2).contiguous() for t in (g, ds))
            if path == "tiles":  # from the scores and the forward's statistics
                x_b = x.transpose(1, 2).contiguous()
                _native.backward_tiles(x_b, g_b, ds_b, alpha_rows, alpha, *stats_t, da)
            else:  # from the weights the forward wrote (read only)
                kept = x_t.clone()
                _native.backward_tiles(kept, g_b, ds_b, alpha_rows, alpha, None, None, None, da, kind)
                assert torch.equal(kept, x_t)
            ds = ds_b.transpose(1, 2).reshape(rows, m)
        grads.append((ds, da))
    for ds, da in grads[1:]:
        assert (grads[0][0] - ds).abs().max() <= 10 * eps
        if per_row:  # d/dalpha: (alpha - 1)^-2 times a difference of sums, relative to its largest entry
            relative = 1e-4 if dtype == torch.float32 else 1e-11
            assert (grads[0][1] - da).abs().max() <= relative * grads[0][1].abs().max()


@needs_native
def test_tile_forward_huge_finite_scores_with_masked_entries():
    """Finite scores whose row sum overflows, beside -inf (masked) entries, are valid input: no NaN / +inf
    error, and the weights are those of the row kernels."""
    x = torch.full((1, 16, 8), 3e38)
    x[:, :, 0] = 3.2e38
    x[:, :, 5:] = float("-inf")
    rows = 8
    stats_r, stats_t = ([torch.empty(rows) for _ in range(3)] for _ in range(2))
    x_r = x[0].t().contiguous()
    _native.forward(x_r, x_r, "sparsemax", None, 2.0, 1e-5, 50, *stats_r)
    x_t = x.clone()
    _native.forward_tiles(x_t, "sparsemax", None, 2.0, 1e-5, 50, *stats_t)
    assert torch.isfinite(x_t).all() and torch.equal(x_t[0].t(), x_r)


@needs_native
def test_tiles_cover_row_slices_of_one_group(restore_path):
    """Many queries on few keys: a group's rows split over blocks of whole tiles; the additive mask is scaled
    by a per-row (per-head) alpha - 1 on the transposed scores."""
    q, k, v = qkv(1, 2, 4500, 60, d=4)
    alpha = torch.tensor([1.3, 1.7], dtype=torch.float64).reshape(2, 1, 1).requires_grad_(True)
    mask = torch.randn(4500, 60, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask[:, :5] = float("-inf")
    ref = run_on_path("rows", q, k, v, alpha, mask)
    new = run_on_path("native", q, k, v, alpha, mask)
    for a, b in zip(new, ref):
        assert (a - b).abs().max() <= 1e-9 * max(1.0, b.abs().max().item())


@needs_native
@pytest.mark.parametrize("separation", SEPARATIONS)
@pytest.mark.parametrize("m,scale", [(65, 1.5), (200, 0.05), (9, 3.0)])
def test_tiles_float32_as_close_to_float64_as_torch(separation, m, scale, restore_path):
    q, k, v = qkv(2, 4, 65, m, scale=scale)
    mask = torch.rand(65, m, generator=torch.Generator().manual_seed(5)) > 0.2
    truth = run_on_path("torch", q, k, v, _separation(separation, torch.float64), mask)
    assert_float32_no_worse("native", "torch", q, k, v, _separation(separation, torch.float32), truth, mask)


@needs_native
@pytest.mark.parametrize("separation", [1.3, "per_head"])
def test_short_general_rows_take_the_tiles(separation, restore_path, monkeypatch):
    """General-alpha rows shorter than _NATIVE_MIN_GENERAL: the tile kernels on "auto" (the row kernels keep
    the torch-op kernels there), same results."""
    import hopformer.functional._native as native_module

    calls = []
    original = native_module.forward_tiles
    monkeypatch.setattr(native_module, "forward_tiles", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q, k, v = qkv(2, 4, 16, 8)
    ref = run_on_path("torch", q, k, v, _separation(separation, torch.float64))
    new = run_on_path("auto", q, k, v, _separation(separation, torch.float64))
    assert calls, "the tile kernels did not run"
    for a, b in zip(new, ref):
        assert (a - b).abs().max() <= 1e-9 * max(1.0, b.abs().max().item())


# ----------------------------------------------------------------------------- the build


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A loader that has not tried yet, building into an empty cache folder."""
    monkeypatch.setattr(_native, "_TRIED", False)
    monkeypatch.setattr(_native, "_LIB", None)
    monkeypatch.setattr(_native, "_ERROR", None)
    monkeypatch.setattr(sk, "_WARNED_NATIVE", False)
    monkeypatch.setenv("HOPFORMER_CACHE_DIR", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    set_kernel_path(None)


@needs_native
def test_build_goes_to_the_cache_folder(fresh_build):
    assert _native.load() is not None and _native.error() is None
    built = list(fresh_build.glob("separation-*.so"))
    assert len(built) == 1


def test_without_a_compiler_the_torch_kernels_run_with_one_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    q, k, v = qkv(1, 2, 6, 7)
    set_kernel_path("torch")
    ref = separated_attention(q, k, v, separation="entmax15")
    set_kernel_path("auto")
    with pytest.warns(RuntimeWarning, match="could not be built.*nonexistent"):
        out = separated_attention(q, k, v, separation="entmax15")
    assert torch.equal(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        separated_attention(q, k, v, separation="entmax15")
    set_kernel_path("native")
    with pytest.raises(RuntimeError, match="set_kernel_path\\('native'\\).*nonexistent"):
        separated_attention(q, k, v, separation="entmax15")
    assert not list(fresh_build.glob("*.so"))


@needs_native
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets")
@pytest.mark.parametrize("march", ["x86-64-v2", "haswell"])
def test_builds_for_older_cpus(fresh_build, monkeypatch, march):
    """Built for CPUs without AVX-512 (haswell: AVX2 + FMA) or without FMA (x86-64-v2, $HOPFORMER_NATIVE_MARCH):
    float32 as close to float64 as the torch ops on long rows with alpha near 1 (a power's exponent of 49, where
    the no-FMA power lost twice torch's accuracy until its exponent was formed in double), on tiles and on short
    general rows; float64 equal to the torch-op kernels."""
    monkeypatch.setenv("HOPFORMER_NATIVE_MARCH", march)
    if _native.load() is None:
        pytest.skip(f"no build for -march={march}: {_native.error()}")
    assert len(list(fresh_build.glob("separation-*.so"))) == 1
    for separation, n, m, scale in [("per_head", 9, 515, 1.5), ("per_head", 65, 65, 1.5), (1.3, 40, 20, 3.0),
                                    ("entmax15", 9, 1000, 0.05)]:
        q, k, v = qkv(1, 4, n, m, scale=scale)
        mask = torch.rand(n, m, generator=torch.Generator().manual_seed(2)) > 0.2
        truth = run_on_path("torch", q, k, v, _separation(separation, torch.float64), mask)
        assert_float32_no_worse("native", "torch", q, k, v, _separation(separation, torch.float32), truth, mask)
        _assert_native_matches("torch", q, k, v, _separation(separation, torch.float64), mask)


def _maps(path, z, alpha):
    from hopformer.functional import entmax, entmax15, sparsemax

    set_kernel_path(path)
    zz, aa = z.clone().requires_grad_(True), alpha.clone().requires_grad_(True)
    outs = [sparsemax(zz, -1), entmax15(zz, -1), entmax(zz, 1.3, -1), entmax(zz, aa, -1)]
    g = torch.linspace(-1, 1, z.numel(), dtype=z.dtype).reshape(z.shape)
    grads = torch.autograd.grad(sum((o * g).sum() for o in outs), [zz, aa])
    return [o.detach() for o in outs] + list(grads)


@needs_native
def test_native_maps_on_materialised_scores_match_torch(restore_path):
    """`sparsemax` / `entmax15` / `entmax` on score tensors (the maps behind associations): float64 equal to
    the torch-op kernels to 1e-12; float32 no further from float64 than they are (d alpha near alpha = 1
    amplifies float rounding by 1 / (alpha - 1)^2 on both paths)."""
    z = torch.randn(6, 50, 33, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    z[0, 0] = float("-inf")
    alpha = torch.linspace(1.1, 2.0, 50, dtype=torch.float64).reshape(50, 1)
    truth = _maps("torch", z, alpha)
    for a, b in zip(_maps("native", z, alpha), truth):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max() <= 1e-12 * max(1.0, b.abs().max().item())
    assert_no_worse(_maps("native", z.float(), alpha.float()), _maps("torch", z.float(), alpha.float()), truth,
                    floor=1e-3)


@needs_native
def test_unwritable_cache_folder_builds_in_a_temporary_one(fresh_build, monkeypatch, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("HOPFORMER_CACHE_DIR", str(blocker / "cache"))  # mkdir fails: a file is in the way
    assert _native.load() is not None and _native.error() is None


@needs_native
@pytest.mark.parametrize("separation", SEPARATIONS)
def test_kept_weights_backward(separation, restore_path, monkeypatch):
    """Short rows whose weights fit in the inputs' memory: the eager forward keeps them and the backward reads
    them (no scores recomputed). Gradients (float64, with a mask and an all-masked row) equal the recomputing
    backward's to rounding, and gradcheck holds on the kept path; nothing is kept without grad, under
    inference mode, or when the weights would outgrow q, k, v."""
    import hopformer.functional._separated_attention as sa

    set_kernel_path("native")
    real, kept = sa._kept_weights, []
    monkeypatch.setattr(sa, "_kept_weights", lambda *a: kept.append(real(*a)) or kept[-1])
    q, k, v = qkv(2, 4, 21, 19, 8, seed=3)
    mask = torch.rand(2, 4, 21, 19, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[0, 0, 0] = False
    sep = _separation(separation, torch.float64)
    new = run_on_path("native", q, k, v, sep, mask)
    assert len(kept) == 1 and kept[0] is not None and kept[0].shape == (8, 19, 21)
    monkeypatch.setattr(sa, "_kept_weights", lambda *a: None)
    ref = run_on_path("native", q, k, v, sep, mask)
    for a, b in zip(new, ref):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, b.abs().max().item())
    monkeypatch.setattr(sa, "_kept_weights", lambda *a: kept.append(real(*a)) or kept[-1])
    small = qkv(1, 4, 5, 9, 3, seed=4)
    if isinstance(sep, torch.Tensor):  # alpha = 2 is the boundary: gradcheck's steps must stay inside [1, 2]
        sep = torch.tensor([1.05, 1.5, 1.95, 1.99], dtype=torch.float64).reshape(4, 1, 1).requires_grad_(True)
    inputs = small + ((sep,) if isinstance(sep, torch.Tensor) else ())
    assert torch.autograd.gradcheck(lambda q, k, v, *a: separated_attention(q, k, v, separation=a[0] if a else sep),
                                    inputs, eps=1e-6, atol=1e-5)
    assert kept[-1] is not None
    kept.clear()
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            separated_attention(q, k, v, separation=sep, mask=mask)
    assert kept == []
    separated_attention(*qkv(1, 4, 40, 40, 4), separation=sep)  # 40 x 40 weights > 40 x (4 + 4 + 4)
    assert kept == [None]


# ----------------------------------------------------------------------------- products on the supports
# Long rows whose supports are small read out and backpropagate through the supports only
# (`native.readout_support`, `native.backward_support`) instead of the dense matmuls with the weights.

def _spy_supports(monkeypatch):
    """Record what the two support kernels return (True: they did the block's products)."""
    calls = {"readout_support": [], "backward_support": []}
    for name, seen in calls.items():
        real = getattr(_native, name)
        monkeypatch.setattr(_native, name, lambda *a, _real=real, _seen=seen: _seen.append(_real(*a)) or _seen[-1])
    return calls


# (b, h, n, m, d, dv): several groups per block with d = dv = 16 (compile-time width), row slices of a group split
# into pieces with private sums (few groups) with d = 8, dv = 5 (widths read at run time)
SUPPORT_SHAPES = [(2, 4, 20, 300, 16, 16), (1, 2, 600, 1030, 8, 5)]


@needs_native
@pytest.mark.parametrize("separation", SEPARATIONS + ["per_row"])
@pytest.mark.parametrize("shape", SUPPORT_SHAPES)
def test_support_products_match_dense(separation, shape, restore_path, monkeypatch):
    """Float64, with a mask and an all-masked row, a tensor beta: outputs and gradients on the supports within
    1e-10 of the dense matmuls'; the support kernels did the products (and with a limit of 0 declined, so the
    dense path ran)."""
    import hopformer.functional._separated_attention as sa

    set_kernel_path("native")
    calls = _spy_supports(monkeypatch)
    b, h, n, m, d, dv = shape
    q, k, _ = qkv(b, h, n, m, d, seed=5)
    v = torch.randn(b, h, m, dv, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    beta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(b, 1, n, m, generator=torch.Generator().manual_seed(5)) > 0.2
    mask[0, 0, 3] = False
    if separation == "per_row":
        sep = _per_row_alpha(n)
    elif separation == "per_head":  # the first h of the four heads' alphas
        sep = _separation(separation, torch.float64).detach()[:h].requires_grad_(True)
    else:
        sep = separation

    def run(limit):
        monkeypatch.setattr(sa, "_READOUT_MAX", limit)
        monkeypatch.setattr(sa, "_BACKWARD_MAX", limit)
        inputs = [q, k, v, beta] + ([sep] if isinstance(sep, torch.Tensor) else [])
        out = separated_attention(q, k, v, separation=sep, mask=mask, beta=beta)
        g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        return [out.detach()] + list(torch.autograd.grad((out * g).sum(), inputs))

    on_supports = run(1.0)
    assert calls["readout_support"] and all(calls["readout_support"])
    assert calls["backward_support"] and all(calls["backward_support"])
    for seen in calls.values():
        seen.clear()
    dense = run(0.0)
    assert calls["readout_support"] and not any(calls["readout_support"])
    assert calls["backward_support"] and not any(calls["backward_support"])
    for a, ref in zip(on_supports, dense):
        assert torch.isfinite(a).all()
        assert (a - ref).abs().max() <= 1e-10 * max(1.0, ref.abs().max().item())


@needs_native
@pytest.mark.parametrize("separation", ["sparsemax", "entmax15", 1.3, "per_head"])
def test_support_products_gradcheck(separation, restore_path, monkeypatch):
    import hopformer.functional._separated_attention as sa

    set_kernel_path("native")
    monkeypatch.setattr(sa, "_READOUT_MAX", 1.0)
    monkeypatch.setattr(sa, "_BACKWARD_MAX", 1.0)
    calls = _spy_supports(monkeypatch)
    q, k, v = qkv(1, 4, 3, 256, 2, seed=7, scale=2.0)
    sep = separation
    inputs = (q, k, v)
    if separation == "per_head":
        sep = torch.tensor([1.05, 1.5, 1.95, 1.99], dtype=torch.float64).reshape(4, 1, 1).requires_grad_(True)
        inputs = inputs + (sep,)
    assert torch.autograd.gradcheck(lambda q, k, v, *a: separated_attention(q, k, v, separation=a[0] if a else sep),
                                    inputs, eps=1e-6, atol=1e-5)
    assert all(calls["readout_support"]) and all(calls["backward_support"]) and calls["backward_support"]


@needs_native
def test_support_kernels_name_bad_strides():
    p = torch.rand(2, 3, 8)
    out = torch.empty(2, 4, 3).transpose(1, 2)  # rows not contiguous
    with pytest.raises(ValueError, match=r"contiguous rows; got torch.float32 \(2, 3, 4\) strides \(12, 1, 3\)"):
        _native.readout_support(p, torch.rand(2, 8, 4), out, 100)


@needs_native
@pytest.mark.parametrize("separation", ["sparsemax", "entmax15", 1.3, "per_head"])
@pytest.mark.parametrize("d", [32, 16])
def test_support_products_float32(separation, d, restore_path, monkeypatch):
    """Float32 (the vector paths: compressed supports, tree-summed products of whole 16-lane vectors): on the
    supports as close to the float64 result as the dense matmuls, with a mask."""
    import hopformer.functional._separated_attention as sa

    set_kernel_path("native")
    calls = _spy_supports(monkeypatch)
    q, k, v = qkv(1, 4, 40, 1030, d, seed=8, scale=1.0)
    mask = torch.rand(40, 1030, generator=torch.Generator().manual_seed(8)) > 0.1
    def sep(dtype):  # per head: alpha near 1 makes d/dalpha rounding noise ((alpha - 1)^-2), on either path
        if separation != "per_head":
            return separation
        return torch.tensor([1.1, 1.5, 1.9, 2.0], dtype=dtype).reshape(4, 1, 1).requires_grad_(True)

    truth = run_on_path("native", q, k, v, sep(torch.float64), mask)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    results = []
    for limit in (1.0, 0.0):
        monkeypatch.setattr(sa, "_READOUT_MAX", limit)
        monkeypatch.setattr(sa, "_BACKWARD_MAX", limit)
        results.append(run_on_path("native", q32, k32, v32, sep(torch.float32), mask))
    assert calls["backward_support"][0] and not calls["backward_support"][-1]
    assert_no_worse(*results, truth)
