"""Temporal-kernel sequence memory (Farooq 2025, arXiv 2507.01052): kernel, energy, both solvers."""

import csv

import pytest
import torch

from hopformer.layers import TemporalSequenceMemory
from hopformer.layers.sequence_memory import temporal_kernel
from shared_data import SHARED_DATA


def _sequence(n: int = 60, d: int = 32, seed: int = 0) -> torch.Tensor:
    """Correlated frames (a random walk) with two scene cuts."""
    gen = torch.Generator().manual_seed(seed)
    walk = torch.randn(n, d, generator=gen).mul(0.3).cumsum(0)
    walk[n // 3 :] += torch.randn(d, generator=gen) * 3
    walk[2 * n // 3 :] += torch.randn(d, generator=gen) * 3
    return walk + torch.randn(n, d, generator=gen)


def test_kernel_weights_sum_to_one():
    kernel = temporal_kernel(25, 2.0)
    torch.testing.assert_close(kernel.sum(-1), torch.ones(25, dtype=torch.float64))
    memory = TemporalSequenceMemory(sigma=1.5).store(_sequence(25))
    for m in (0, 12, 24):
        w = memory.kernel_weights(m)
        assert w.sum().item() == pytest.approx(1.0)
        assert w.argmax().item() == m
        torch.testing.assert_close(w, temporal_kernel(25, 1.5)[m])


def test_patterns_normalised_and_short_sequence_retrieved_exactly():
    memory = TemporalSequenceMemory().store(_sequence())
    torch.testing.assert_close(memory.patterns.norm(dim=-1), torch.full((60,), 32**0.5, dtype=torch.float64))
    for batched in (True, False):
        memory.batched = batched
        states = memory.retrieve().states
        nearest = torch.cdist(states, memory.patterns).argmin(-1)
        assert (nearest == torch.arange(60)).all()
        assert (states - memory.patterns).square().mean(-1).max() < 1e-4


def test_fast_solver_agrees_with_faithful_lbfgs():
    memory = TemporalSequenceMemory(lambda_f=50.0, mu=2.0).store(_sequence(30, 16, seed=1))
    fast = memory.retrieve(solver="cccp").states
    faithful = memory.retrieve(solver="lbfgs").states
    torch.testing.assert_close(fast, faithful, atol=1e-4, rtol=0)
    memory.batched = False
    torch.testing.assert_close(memory.retrieve(solver="cccp").states, fast, atol=1e-6, rtol=0)


def test_energy_gradient_and_cccp_descent():
    torch.manual_seed(0)
    memory = TemporalSequenceMemory(lambda_f=5.0, mu=0.5).store(_sequence(20, 8))
    s = torch.randn(8, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(8, dtype=torch.float64)
    energy = memory.energy(s, 7, prev)
    (auto,) = torch.autograd.grad(energy, s)
    torch.testing.assert_close(memory.energy_grad(s.detach(), 7, prev), auto)
    memory.batched = False
    result = memory.retrieve(trace=True, trace_steps=(3, 10))
    for m in (3, 10):
        trace = result.trace[m]
        assert all(b <= a + 1e-9 for a, b in zip(trace, trace[1:]))
    assert result.energy.shape == (20,)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"sigma": 0.0}, "sigma"), ({"sigma": -1.0}, "sigma"), ({"lambda_f": -1.0}, "lambda_f"),
     ({"solver": "adam"}, "solver"), ({"beta": 0.0}, "beta")],
)
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TemporalSequenceMemory(**kwargs)


def test_bad_sequences_raise():
    memory = TemporalSequenceMemory()
    with pytest.raises(ValueError, match="at least two"):
        memory.store(torch.randn(1, 8))
    with pytest.raises(ValueError, match="shape"):
        memory.store(torch.randn(8))
    with pytest.raises(ValueError, match="all-zero"):
        memory.store(torch.zeros(3, 8))
    with pytest.raises(RuntimeError, match="store"):
        memory.retrieve()
    with pytest.raises(ValueError, match="sigma"):
        temporal_kernel(5, 0.0)




def test_experiment_short_run_on_real_frames(tmp_path):
    """Short end-to-end run of the experiment (CIFAR-10 pan frames when present, synthetic otherwise)."""
    from hopformer.experiments.sequence_memory import main

    data = SHARED_DATA if (SHARED_DATA / "cifar10" / "train").is_dir() else tmp_path / "absent"
    out = main(["--frames", "60", "--scene-length", "20", "--faithful-frames", "20", "--sensitivity-frames", "12",
                "--timing", "20", "--lbfgs-timing-max", "20", "--out", str(tmp_path), "--data-dir", str(data)])
    with open(out / "retrieval.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["solver"] for r in rows} == {"cccp-batched", "cccp-sequential", "lbfgs-b"}
    for row in rows:
        assert float(row["accuracy"]) == 1.0 and float(row["mse_max"]) < 1e-4
    assert (out / "energy.png").is_file() and (out / "sensitivity.csv").is_file() and (out / "timing.png").is_file()
