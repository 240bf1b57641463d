"""The functional Hopfield core: retrieval, energies, masks, dispatch, bad input."""

import entmax as entmax_pkg
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import hopformer.functional.hopfield as core
from hopformer.functional import hopfield_energy, hopfield_retrieve

SEPARATIONS = ["softmax", "sparsemax", "entmax15", 1.3, 1.0, 2.0]


@pytest.mark.parametrize("lead", [(), (3,), (2, 4)])
def test_one_softmax_step_is_sdpa(lead):
    torch.manual_seed(0)
    q, k, v = torch.randn(*lead, 5, 8), torch.randn(*lead, 7, 8), torch.randn(*lead, 7, 6)
    ref = F.scaled_dot_product_attention(q, k, v)
    out = hopfield_retrieve(q, k, v, beta=8**-0.5)
    torch.testing.assert_close(out, ref)
    # the unfused path (asked for the association) computes the same thing
    out2, weights = hopfield_retrieve(q, k, v, beta=8**-0.5, return_association=True)
    torch.testing.assert_close(out2, ref)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_softmax_path_calls_sdpa_and_others_do_not(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(core.F, "scaled_dot_product_attention", spy)
    q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    hopfield_retrieve(q, k, beta=1.0)
    assert len(calls) == 1
    hopfield_retrieve(q, k, beta=1.0, separation="sparsemax")
    hopfield_retrieve(q, k, beta=1.0, separation=1.5, steps=2)
    assert len(calls) == 1
    hopfield_retrieve(q, k, beta=1.0, steps=3)  # every softmax step is fused
    assert len(calls) == 4


@pytest.mark.parametrize(
    "separation, reference",
    [
        ("softmax", lambda s: torch.softmax(s, -1)),
        ("sparsemax", lambda s: entmax_pkg.sparsemax(s, -1)),
        ("entmax15", lambda s: entmax_pkg.entmax15(s, -1)),
        (1.3, lambda s: entmax_pkg.entmax_bisect(s, 1.3, -1, n_iter=100)),
    ],
)
def test_each_separation_runs_its_own_map(separation, reference):
    torch.manual_seed(1)
    q, k = torch.randn(4, 6, 8), torch.randn(4, 9, 8)
    _, weights = hopfield_retrieve(q, k, beta=2.0, separation=separation, return_association=True)
    expected = reference(2.0 * q @ k.transpose(-1, -2))
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-4)
    zeros = (weights == 0).any().item()
    assert zeros == (separation != "softmax"), f"{separation}: exact zeros present = {zeros}"


def test_values_default_to_keys_and_steps_iterate():
    torch.manual_seed(2)
    q, k = torch.randn(3, 8), torch.randn(5, 8)
    x = q
    for _ in range(3):
        x = torch.softmax(0.7 * x @ k.T, -1) @ k
    torch.testing.assert_close(hopfield_retrieve(q, k, beta=0.7, steps=3), x)


def test_eps_stops_early_at_a_fixed_point(monkeypatch):
    torch.manual_seed(3)
    k = torch.randn(6, 16)
    q = k[:2] + 0.01 * torch.randn(2, 16)
    calls = []
    real = core._step

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "_step", counting)
    out = hopfield_retrieve(q, k, beta=4.0, separation="sparsemax", steps=50, eps=1e-6)
    assert 1 < len(calls) < 10
    torch.testing.assert_close(out, k[:2])
    calls.clear()
    hopfield_retrieve(q, k, beta=4.0, separation="sparsemax", steps=50)
    assert len(calls) == 50


def test_sparsemax_retrieves_well_separated_patterns_exactly():
    torch.manual_seed(4)
    patterns = torch.nn.functional.normalize(torch.randn(20, 64), dim=-1) * 8
    noisy = patterns + 0.3 * torch.randn_like(patterns)
    sparse = hopfield_retrieve(noisy, patterns, beta=0.1, separation="sparsemax")
    assert torch.equal(sparse, patterns)  # one-hot association, bit-exact
    dense = hopfield_retrieve(noisy, patterns, beta=0.1)
    assert (dense - patterns).abs().max() > 0  # softmax only approaches the pattern
    assert (dense - patterns).abs().max() < 0.5


def test_key_padding_mask_equals_dropping_keys():
    torch.manual_seed(5)
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 6, 4), torch.randn(2, 6, 5)
    keep = torch.tensor([True, True, False, True, False, True])
    for sep in ["softmax", "sparsemax", 1.5]:
        masked = hopfield_retrieve(q, k, v, beta=1.0, separation=sep, mask=keep)
        dropped = hopfield_retrieve(q, k[:, keep], v[:, keep], beta=1.0, separation=sep)
        torch.testing.assert_close(masked, dropped)


@pytest.mark.parametrize("separation", SEPARATIONS)
def test_fully_masked_row_is_zero_not_nan(separation):
    q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    out = hopfield_retrieve(q, k, beta=1.0, separation=separation, mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax15", 1.25, 1.75])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), beta=st.floats(0.1, 8.0), n_keys=st.integers(2, 12), dim=st.integers(2, 10))
def test_energy_never_increases_along_updates(separation, seed, beta, n_keys, dim):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n_keys, dim, generator=gen, dtype=torch.float64)
    x = torch.randn(3, dim, generator=gen, dtype=torch.float64) * 2
    energies = [hopfield_energy(x, keys, beta=beta, separation=separation)]
    for _ in range(6):
        x = hopfield_retrieve(x, keys, beta=beta, separation=separation)
        energies.append(hopfield_energy(x, keys, beta=beta, separation=separation))
    e = torch.stack(energies)
    assert torch.all(e[1:] <= e[:-1] + 1e-9), e


def test_softmax_energy_is_lse_form():
    torch.manual_seed(6)
    x, keys, beta = torch.randn(4, 3), torch.randn(7, 3), 0.5
    expected = -torch.logsumexp(beta * x @ keys.T, -1) / beta + 0.5 * (x * x).sum(-1)
    torch.testing.assert_close(hopfield_energy(x, keys, beta=beta), expected)


def test_tensor_beta_per_head():
    torch.manual_seed(7)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4)
    beta = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1)
    out = hopfield_retrieve(q, k, beta=beta)
    for h in range(3):
        torch.testing.assert_close(out[:, h], hopfield_retrieve(q[:, h], k[:, h], beta=float(beta[h])))
    energy = hopfield_energy(q, k, beta=beta)
    torch.testing.assert_close(energy[:, 2], hopfield_energy(q[:, 2], k[:, 2], beta=2.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(query=torch.randn(4), keys=torch.randn(3, 4)), "query"),
        (dict(query=torch.randn(2, 4), keys=torch.randn(3, 5)), "last"),
        (dict(query=torch.randn(2, 4), keys=torch.randn(3, 4), values=torch.randn(2, 4)), "values"),
        (dict(query=torch.randn(2, 4), keys=torch.randn(0, 4)), "at least one"),
        (dict(query=torch.randn(2, 4), keys=torch.randn(3, 4), beta=0.0), "beta"),
        (dict(query=torch.randn(2, 4), keys=torch.randn(3, 4), beta=-1.0), "beta"),
        (dict(query=torch.randn(2, 4), keys=torch.randn(3, 4), separation="sparse"), "separation"),
        (dict(query=torch.randn(2, 4), keys=torch.randn(3, 4), separation=2.5), "alpha|separation"),
        (dict(query=torch.randn(2, 4), keys=torch.randn(3, 4), steps=0), "steps"),
        (dict(query=torch.randn(2, 4), keys=torch.randn(3, 4), eps=-1.0), "eps"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    kwargs.setdefault("beta", 1.0)
    with pytest.raises(ValueError, match=match):
        hopfield_retrieve(**kwargs)


def test_bf16_autocast_stays_finite():
    torch.manual_seed(8)
    q, k = torch.randn(2, 5, 8), torch.randn(2, 9, 8)
    for sep in ["sparsemax", "entmax15", 1.3]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = hopfield_retrieve(q.bfloat16(), k.bfloat16(), beta=1.0, separation=sep)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), hopfield_retrieve(q, k, beta=1.0, separation=sep), atol=0.1, rtol=0.05)
