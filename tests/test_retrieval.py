"""U-Hop Algorithm 1 (UHopRetriever), the baselines, the data loaders and the retrieval sweeps."""

from __future__ import annotations


import pytest
import torch

from hopformer.functional.separation_loss import min_pairwise_distance
from hopformer.retrieval import (
    HopfieldRetriever,
    PolynomialRetriever,
    SweepConfig,
    UHopRetriever,
    add_noise,
    fit_feature_map,
    fit_feature_map_dense,
    load_images,
    mask_pixels,
    run_sweep,
)
from shared_data import SHARED_DATA

CIFAR = SHARED_DATA / "cifar10" / "train"


@pytest.fixture(scope="module")
def digits():
    return load_images("digits", n=300, seed=0)


# -- stage I -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["average", "orthogonal", "max"])
@pytest.mark.parametrize("shape", [(10, 20, 20), (30, 8, 8), (6, 5, 12)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_memory_space_sgd_equals_dense_sgd(kind, shape, momentum):
    """The O(M^3) stage I is exactly torch.optim.SGD on the full W (float64)."""
    m, d, big_d = shape
    gen = torch.Generator().manual_seed(0)
    xi = torch.rand(3, m, d, generator=gen, dtype=torch.float64)
    w0 = torch.randn(big_d, d, generator=gen, dtype=torch.float64) / d**0.5
    w_fast, l_fast = fit_feature_map(xi, w0, steps=15, lr=0.3, kind=kind, momentum=momentum)
    w_ref, l_ref = fit_feature_map_dense(xi, w0.expand(3, big_d, d), steps=15, lr=0.3, kind=kind, momentum=momentum)
    torch.testing.assert_close(w_fast, w_ref, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(l_fast, l_ref, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("kind", ["average", "orthogonal", "max"])
def test_closed_form_gram_gradient_matches_autograd(kind):
    from hopformer.functional.separation_loss import separation_loss_from_gram
    from hopformer.retrieval.stage_one import gram_loss_and_grad

    x = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    gram = (x @ x.transpose(-1, -2)).requires_grad_(True)
    loss = separation_loss_from_gram(gram, 1.7, kind)
    (grad,) = torch.autograd.grad(loss.sum(), gram)
    loss2, grad2 = gram_loss_and_grad(gram.detach(), 1.7, kind)
    torch.testing.assert_close(loss2, loss.detach())
    torch.testing.assert_close(grad2, grad)


def test_identity_start_and_snapshots():
    gen = torch.Generator().manual_seed(1)
    xi = torch.rand(7, 9, generator=gen, dtype=torch.float64)
    w, _, saved = fit_feature_map(xi, None, steps=10, lr=0.2, snapshots=[0, 3, 10])
    torch.testing.assert_close(saved[0], torch.eye(9, dtype=torch.float64))
    ref, _ = fit_feature_map_dense(xi, torch.eye(9, dtype=torch.float64), steps=3, lr=0.2)
    torch.testing.assert_close(saved[3], ref)
    torch.testing.assert_close(saved[10], w)
    with pytest.raises(ValueError, match="snapshots"):
        fit_feature_map(xi, None, steps=3, lr=0.1, snapshots=[5])


def test_defaults_move_w_and_separate_digits(digits):
    """UHopRetriever(dim).fit(memories) lowers the separation loss far below its start and separates the memories."""
    xi = digits.images[:100]
    r = UHopRetriever(xi.shape[1]).fit(xi)
    assert r.losses_.shape == (100,)
    start, end = r.losses_[0].item(), r.separation_loss().item()
    assert end < start - 1.5, (start, end)
    assert min_pairwise_distance(r.features(xi)) > min_pairwise_distance(xi) + 0.1
    assert (r.weight_ - torch.eye(xi.shape[1])).norm() > 1.0
    torch.testing.assert_close(r.weight_.norm(dim=-1), torch.ones(xi.shape[1]))


@pytest.mark.skipif(not CIFAR.is_dir(), reason="../shared/data/cifar10 not available")
def test_defaults_on_cifar_images():
    images = load_images("folder", CIFAR, n=60, seed=0)
    xi = images.images
    r = UHopRetriever(xi.shape[1]).fit(xi)
    start, end = r.losses_[0].item(), r.separation_loss().item()
    assert end < start - 2.0, (start, end)
    queries = mask_pixels(xi, images.shape, 0.5, torch.Generator().manual_seed(0))
    err_uhop = (r.retrieve(queries) - xi).square().sum(-1).mean()
    err_mhm = (HopfieldRetriever(xi.shape[1]).fit(xi).retrieve(queries) - xi).square().sum(-1).mean()
    assert err_uhop < 0.5 * err_mhm


def test_zero_steps_is_modern_hopfield(digits):
    xi, q = digits.images[:50], digits.images[50:60]
    uhop = UHopRetriever(xi.shape[1], kernel_steps=0).fit(xi)
    mhm = HopfieldRetriever(xi.shape[1]).fit(xi)
    torch.testing.assert_close(uhop.retrieve(q, steps=3), mhm.retrieve(q, steps=3))


def test_fit_path_equals_separate_fits(digits):
    xi = digits.images[:40]
    path = UHopRetriever(xi.shape[1], lr=0.05).fit_path(xi, [0, 5, 20])
    single = UHopRetriever(xi.shape[1], lr=0.05, kernel_steps=5).fit(xi)
    torch.testing.assert_close(path[5].weight_, single.weight_)
    assert path[20].kernel_steps == 20 and len(path[20].losses_) == 20


@pytest.mark.parametrize("init", ["orthogonal", "gaussian"])
def test_other_inits_and_wider_kernel(init, digits):
    xi = digits.images[:30]
    r = UHopRetriever(xi.shape[1], kernel_dim=96, init=init, lr=0.05 if init == "orthogonal" else 5.0).fit(xi)
    assert r.weight_.shape == (96, 64)
    assert r.separation_loss() < r.losses_[0]
    assert r.retrieve(xi[:3]).shape == (3, 64)


def test_batched_memory_sets(digits):
    xi = digits.images[:60].reshape(3, 20, 64)
    r = UHopRetriever(64, kernel_steps=10).fit(xi)
    assert r.weight_.shape == (3, 64, 64)
    out = r.retrieve(xi[:, :4])
    single = UHopRetriever(64, kernel_steps=10).fit(xi[1]).retrieve(xi[1, :4])
    torch.testing.assert_close(out[1], single, rtol=1e-4, atol=1e-5)


# -- exact retrieval (Theorem 2.2) --------------------------------------------------------------
def test_sparse_uhop_exact_retrieval_when_theorem_condition_holds():
    """Sparsemax retrieval is exact (Sep = e_mu, eq. 2.9) once beta * (K(xi_mu, x) - max_nu K(xi_nu, x)) >= 1.

    Crowded memories break the condition for sparse MHM (another memory even outscores the target);
    U-Hop's stage I restores it and every stored pattern, and slightly perturbed queries, are retrieved exactly.
    """
    gen = torch.Generator().manual_seed(0)
    xi = (torch.randn(1, 16, generator=gen) + 0.5 * torch.randn(8, 16, generator=gen)).double()
    queries = xi + 0.01 * torch.randn(xi.shape, generator=gen, dtype=torch.float64)

    def margin(r: UHopRetriever, x: torch.Tensor) -> float:
        scores = r.features(x) @ r.features(xi).T
        own = scores.diagonal()
        others = scores.masked_fill(torch.eye(8, dtype=torch.bool), float("-inf")).amax(-1)
        return (r.beta * (own - others)).min().item()

    plain = UHopRetriever(16, separation="sparsemax", kernel_steps=0).fit(xi)
    assert margin(plain, xi) < 1.0
    assert (plain.retrieve(xi) - xi).abs().max() > 0.1
    uhop = UHopRetriever(16, separation="sparsemax", kernel_steps=100, lr=0.1).fit(xi)
    assert margin(uhop, xi) >= 1.0 and margin(uhop, queries) >= 1.0
    torch.testing.assert_close(uhop.retrieve(xi), xi, rtol=0, atol=1e-12)
    torch.testing.assert_close(uhop.retrieve(queries), xi, rtol=0, atol=1e-12)


# -- baselines ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model",
    [
        HopfieldRetriever(64),
        HopfieldRetriever(64, separation="sparsemax"),
        HopfieldRetriever(64, separation="entmax15"),
        HopfieldRetriever(64, separation=1.2),
        HopfieldRetriever(64, similarity="l2"),
        HopfieldRetriever(64, similarity="manhattan"),
        PolynomialRetriever(64, degree=10),
        UHopRetriever(64),
        UHopRetriever(64, separation="sparsemax"),
    ],
    ids=repr,
)
def test_every_model_retrieves_a_clean_stored_pattern(model):
    gen = torch.Generator().manual_seed(3)
    xi = torch.randint(0, 2, (10, 64), generator=gen).float() * 2 - 1  # random bipolar patterns
    out = model.fit(xi).retrieve(xi)
    torch.testing.assert_close(out, xi, rtol=0, atol=5e-3)


def test_polynomial_no_positive_overlap_gives_zeros():
    r = PolynomialRetriever(4).fit(torch.eye(4)[:2])
    assert torch.equal(r.retrieve(-torch.ones(1, 4)), torch.zeros(1, 4))


# -- bad input ---------------------------------------------------------------------------------
def test_bad_input_errors(digits):
    xi = digits.images[:10]
    with pytest.raises(ValueError, match="at least 2 patterns"):
        UHopRetriever(64).fit(xi[:1])
    UHopRetriever(64, kernel_steps=0).fit(xi[:1])  # one pattern is fine without stage I
    HopfieldRetriever(64).fit(xi[:1])
    with pytest.raises(ValueError, match=r"memories must have shape \(M, 64\)"):
        UHopRetriever(64).fit(torch.rand(10, 32))
    with pytest.raises(ValueError, match="NaN"):
        UHopRetriever(64).fit(xi.clone().index_fill_(1, torch.tensor([3]), float("nan")))
    with pytest.raises(ValueError, match=r"queries must have shape \(n, 64\)"):
        HopfieldRetriever(64).fit(xi).retrieve(torch.rand(3, 63))
    with pytest.raises(ValueError, match="NaN"):
        HopfieldRetriever(64).fit(xi).retrieve(torch.full((2, 64), float("nan")))
    with pytest.raises(RuntimeError, match="before fit"):
        UHopRetriever(64).retrieve(xi)
    with pytest.raises(ValueError, match="steps must be"):
        HopfieldRetriever(64).fit(xi).retrieve(xi, steps=0)
    for kwargs, match in [({"t": 0.0}, "t must be"), ({"t": -2.0}, "t must be"), ({"lr": 0.0}, "lr must be"),
                          ({"lr": -1.0}, "lr must be"), ({"kernel_dim": 32}, "kernel_dim must be >= dim"),
                          ({"loss": "min"}, "loss must be one of"), ({"init": "zeros"}, "init must be one of"),
                          ({"kernel_steps": -1}, "kernel_steps must be"), ({"beta": 0}, "beta must be")]:
        with pytest.raises(ValueError, match=match):
            UHopRetriever(64, **kwargs)
    with pytest.raises(ValueError, match="similarity must be one of"):
        HopfieldRetriever(64, similarity="cosine")
    with pytest.raises(TypeError, match="torch.Tensor"):
        HopfieldRetriever(64).fit(xi.numpy())


# -- queries and data ------------------------------------------------------------------------------
def test_mask_pixels_zeroes_half_the_pixels_of_every_channel():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3 * 4 * 4) + 0.1
    masked = mask_pixels(images, (3, 4, 4), 0.5, gen)
    per_channel = masked.reshape(5, 3, 16) == 0
    assert (per_channel.sum(-1) == 8).all()
    assert (per_channel[:, 0] == per_channel[:, 2]).all()  # the same pixels in every channel
    kept = ~per_channel.reshape(5, -1)
    assert torch.equal(masked[kept], images[kept])  # no rescaling of kept pixels


def test_add_noise_relative_norm():
    images = torch.rand(6, 50)
    noisy = add_noise(images, 0.3, torch.Generator().manual_seed(0))
    torch.testing.assert_close((noisy - images).norm(dim=-1), 0.3 * images.norm(dim=-1))


def test_load_digits_and_missing_data(tmp_path):
    d = load_images("digits", n=20, seed=1)
    assert d.images.shape == (20, 64) and d.shape == (1, 8, 8) and 0 <= d.images.min() and d.images.max() <= 1
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_images("folder", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_images("mnist", tmp_path)
    with pytest.raises(ValueError, match="source must be one of"):
        load_images("imagenet")


@pytest.mark.skipif(not CIFAR.is_dir(), reason="../shared/data/cifar10 not available")
def test_load_cifar_folder():
    images = load_images("folder", CIFAR, n=5, seed=0)
    assert images.images.shape == (5, 3072) and images.shape == (3, 32, 32)


# -- end to end ----------------------------------------------------------------------------------
def test_small_sweep_on_digits_uhop_beats_mhm():
    cfg = SweepConfig(seeds=2, memory_sizes=(20, 50), noise_levels=(0.0, 0.5), noise_memory_size=30,
                      kernel_steps=(0, 20), uhop_steps=20, models=("mhm", "uhop", "sparse", "dam"))
    rows = run_sweep(cfg, progress=False)
    cap = [r for r in rows if r["sweep"] == "capacity"]
    for size in (20, 50):
        err = {m: sum(r["error"] for r in cap if r["model"] == m and r["memory_size"] == size) / 2 for m in ("mhm", "uhop")}
        assert err["uhop"] < err["mhm"], (size, err)
    steps = [r for r in rows if r["sweep"] == "kernel_steps"]
    assert {r["kernel_steps"] for r in steps} == {0, 20}
    assert all(r["sep_loss_end"] < r["sep_loss_start"] for r in steps if r["kernel_steps"] == 20)
    assert {r["noise_level"] for r in rows if r["sweep"] == "noise"} == {0.0, 0.5}


def test_cli_writes_csv_and_plots(tmp_path):
    from hopformer.retrieval.__main__ import main

    out = tmp_path / "run"
    code = main(["--seeds", "1", "--memory-sizes", "10", "20", "--noise-levels", "0.1", "--noise-memory-size", "20",
                 "--kernel-steps", "0", "5", "--uhop-steps", "5", "--out", str(out), "--no-progress"])
    assert code == 0
    for name in ("runs.csv", "summary.csv", "summary.json", "capacity.png", "noise.png", "kernel_steps.png"):
        assert (out / name).is_file(), name
    assert main(["--data", "folder", "--root", str(tmp_path / "missing"), "--out", str(out), "--no-progress"]) == 2


@pytest.mark.slow
def test_stage_one_at_cifar_size_lowers_the_loss():
    """Stage I on 500 memories of d = 3072 for 100 steps (timed in benchmarks/uhop_stage1.py, not here)."""
    xi = torch.rand(500, 3072, generator=torch.Generator().manual_seed(0))
    r = UHopRetriever(3072, kernel_steps=100).fit(xi)
    assert r.losses_.shape == (100,)
    assert r.separation_loss().item() < r.losses_[0].item() - 0.5
