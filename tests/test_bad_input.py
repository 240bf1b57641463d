"""Inputs that used to give a wrong answer without a word, or an internal error (issue 9, items 6-8, 10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hopformer.functional import hopfield_energy, hopfield_retrieve, separate, separation_conjugate
from hopformer.layers import Hopfield, MultiheadHopfield, SparseHopfield, TemporalSequenceMemory

SEPARATIONS = ["softmax", "sparsemax", "entmax15", 1.3]


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.uint8])
@pytest.mark.parametrize("which", ["key_padding_mask", "attn_mask"])
def test_integer_masks_are_rejected_like_multihead_attention(which, dtype):
    """An integer mask used to be added to the scores: a 0/1 padding mask masked nothing."""
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=dtype) if which == "key_padding_mask" else torch.zeros(5, 5, dtype=dtype)
    mask[..., -1] = 1
    with pytest.raises(Exception):  # the reference rejects it too
        nn.MultiheadAttention(8, 2, batch_first=True)(x, x, x, **{which: mask})
    for layer in (Hopfield(8, 2), SparseHopfield(8, 2)):
        with pytest.raises(TypeError, match=f"{which} must be a boolean.*{dtype}"):
            layer(x, **{which: mask})
    with pytest.raises(TypeError, match=f"{which} must be a boolean"):
        MultiheadHopfield(8, 2, batch_first=True)(x, x, x, **{which: mask})


@pytest.mark.parametrize("separation", SEPARATIONS, ids=str)
def test_integer_mask_rejected_by_the_functional_core(separation):
    q, k = torch.randn(3, 4), torch.randn(6, 4)
    mask = torch.ones(3, 6, dtype=torch.long)
    for kwargs in ({}, {"return_association": True}, {"dropout": 0.5}):
        with pytest.raises(TypeError, match="mask must be a boolean or floating"):
            hopfield_retrieve(q, k, beta=1.0, separation=separation, mask=mask, **kwargs)
    with pytest.raises(TypeError, match="mask must be a boolean or floating"):
        hopfield_energy(q, k, beta=1.0, separation=separation, mask=mask)


def test_energy_with_a_wrong_shape_mask_says_which_shape():
    q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"mask must broadcast to the scores' shape \(2, 3, 5\); got shape \(3, 3\)"):
        hopfield_energy(q, k, beta=1.0, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must broadcast"):  # would enlarge the scores
        hopfield_retrieve(q, k, beta=1.0, separation="sparsemax", mask=torch.ones(4, 2, 3, 5, dtype=torch.bool))


def _answer(fn):
    try:
        out = fn()
    except ValueError as err:
        return ("error", str(err)[:40])
    out = out[0] if isinstance(out, tuple) else out
    return ("nan rows", torch.isnan(out).any(-1).tolist())


@pytest.mark.parametrize("separation", SEPARATIONS, ids=str)
def test_nan_query_gives_the_same_answer_on_every_path(separation):
    """Softmax's fused kernel used to return finite numbers for a NaN query row, the materialised path NaN."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    q[0, 1, 3] = float("nan")
    layer = Hopfield(8, 2, separation=separation).eval()
    answers = {
        "forward": _answer(lambda: layer(q, k)),
        "association": _answer(lambda: layer(q, k, return_association=True)),
        **{f"retrieve steps={s} assoc={a}": _answer(lambda s=s, a=a: hopfield_retrieve(
            q, k, beta=0.5, separation=separation, steps=s, return_association=a)) for s in (1, 2) for a in (False, True)},
    }
    assert len(set(map(repr, answers.values()))) == 1, answers
    kind, value = answers["forward"]
    if kind == "nan rows":  # softmax: exactly the NaN query's row is NaN, never a finite guess
        assert value == [[False, True, False, False, False], [False] * 5]
    layer.train()
    layer.dropout = 0.1
    assert _answer(lambda: layer(q, k)) == answers["forward"]  # the dropout (SDPA) path too


@pytest.mark.parametrize("beta", [float("inf"), float("nan"), -1.0, 0.0, True, torch.tensor(-1.0),
                                  torch.tensor(float("nan")), torch.tensor([1.0, float("inf")]).view(2, 1, 1),
                                  torch.tensor(1)], ids=repr)
@pytest.mark.parametrize("separation", SEPARATIONS, ids=str)
def test_beta_must_be_positive_and_finite(beta, separation):
    q, k = torch.randn(2, 3, 4), torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="beta"):
        hopfield_retrieve(q, k, beta=beta, separation=separation)
    with pytest.raises(ValueError, match="beta"):
        hopfield_energy(q, k, beta=beta, separation=separation)


def test_positive_tensor_beta_still_works():
    q, k = torch.randn(2, 3, 4), torch.randn(2, 6, 4)
    beta = torch.tensor([0.5, 2.0]).view(2, 1, 1)
    out = hopfield_retrieve(q, k, beta=beta, separation="sparsemax")
    ref = separate(beta * q @ k.transpose(-1, -2), "sparsemax") @ k
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("separation", SEPARATIONS, ids=str)
@pytest.mark.parametrize("shape", [(3, 0), (0,)])
def test_zero_width_rows_are_a_clear_error(separation, shape):
    with pytest.raises(ValueError, match="no entries along dim"):
        separate(torch.empty(*shape), separation)
    with pytest.raises(ValueError, match="no entries along dim"):
        separation_conjugate(torch.empty(*shape), separation)
    assert separate(torch.empty(0, 3), separation).shape == (0, 3)  # no rows at all is fine


def test_sequence_memory_nan_init_is_a_clear_error():
    memory = TemporalSequenceMemory()
    memory.store(torch.randn(6, 5))
    init = torch.randn(5)
    init[2] = float("nan")
    with pytest.raises(ValueError, match=r"init must be finite.*\[2\]"):
        memory.retrieve(init)


def test_nan_rows_to_output_marks_every_non_finite_row():
    """NaN, +inf and -inf anywhere in a query row make that output row NaN; finite rows pass unchanged."""
    from hopformer.functional.separation import nan_rows_to_output

    q = torch.randn(2, 6, 4)
    q[0, 1, 2], q[0, 3, 0], q[1, 5, 3] = float("nan"), float("inf"), float("-inf")
    out = torch.randn(2, 6, 3)
    got = nan_rows_to_output(q, out)
    bad = ~torch.isfinite(q).all(-1)
    assert torch.equal(torch.isnan(got).all(-1), bad) and not torch.isnan(got[~bad]).any()
    assert torch.equal(got[~bad], out[~bad])
    finite = torch.randn(2, 6, 4)
    assert nan_rows_to_output(finite, out) is out  # CPU, every row finite: no copy
    huge = torch.full((2, 6, 4), 3e38)  # finite, but the quick whole-query sum overflows: the row check decides
    assert torch.equal(nan_rows_to_output(huge, out), out)
    one_inf = finite.clone()
    one_inf[1, 2, 0] = float("inf")  # one entry: the quick sum is inf, only that row is marked
    assert torch.equal(torch.isnan(nan_rows_to_output(one_inf, out)).all(-1), ~torch.isfinite(one_inf).all(-1))
