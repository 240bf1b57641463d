"""The CPU worker pool of the sparse kernels: the switch, and results independent of the workers."""

from __future__ import annotations

import pytest
import torch

import hopformer
from hopformer.functional import _separation_kernels as sk
from hopformer.functional.separation import separated_attention, sparsemax


@pytest.fixture
def restore_workers():
    threads = torch.get_num_threads()
    yield
    hopformer.set_num_workers(None)
    torch.set_num_threads(threads)


def _run(separation):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 40, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = separated_attention(q, k, v, separation=separation)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    return (out, *grads, sparsemax(q @ k.transpose(-1, -2)))


@pytest.mark.parametrize("separation", ["sparsemax", 1.3])
def test_results_do_not_depend_on_the_workers(separation, restore_workers, monkeypatch):
    """Bitwise equal with the pool off, on 1 thread and with 2 workers (dynamic block queue, tiny blocks)."""
    import hopformer.functional._separated_attention as sa

    monkeypatch.setattr(sa, "_CHUNK_ELEMS", 64)  # many blocks, few groups: the split backward path
    monkeypatch.setattr(sk, "_CHUNK_ELEMS", 64)
    torch.set_num_threads(2)
    hopformer.set_num_workers(1)
    assert hopformer.get_num_workers() == 1
    off = _run(separation)
    hopformer.set_num_workers(None)
    assert hopformer.get_num_workers() == 2
    pooled = _run(separation)
    for a, b in zip(off, pooled):
        assert torch.equal(a, b)


def test_switch_and_environment_variable(restore_workers, monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setenv("HOPFORMER_NUM_WORKERS", "1")
    assert hopformer.get_num_workers() == 1
    monkeypatch.setenv("HOPFORMER_NUM_WORKERS", "0")
    assert hopformer.get_num_workers() == 1
    monkeypatch.setenv("HOPFORMER_NUM_WORKERS", "8")
    assert hopformer.get_num_workers() == 2  # capped at torch's threads
    hopformer.set_num_workers(1)  # the function wins over the variable
    assert hopformer.get_num_workers() == 1
    monkeypatch.setenv("HOPFORMER_NUM_WORKERS", "many")
    hopformer.set_num_workers(None)
    with pytest.raises(ValueError, match="HOPFORMER_NUM_WORKERS"):
        hopformer.get_num_workers()
    with pytest.raises(ValueError, match="set_num_workers"):
        hopformer.set_num_workers(-1)
