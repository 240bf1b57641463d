"""Hopfield backends inside Hugging Face models (hopformer.integrations.transformers).

Small models built from config (no hub access): a Llama-style causal LM with grouped-query
attention, a BERT-style encoder and GPT-2. References: the models' own "sdpa"/"eager" attention, and a
naive per-row loop with the ``entmax`` package's maps for the masks.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pickle  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
entmax_pkg = pytest.importorskip("entmax")

from transformers import (  # noqa: E402
    AttentionInterface,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hopformer.integrations import transformers as hf  # noqa: E402

VOCAB = 40


@pytest.fixture(scope="module", autouse=True)
def _registered():
    hf.register()


def llama(init: float = 0.02, dropout: float = 0.0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=init, attention_dropout=dropout,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def bert(init: float = 0.02) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, initializer_range=init, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


def gpt2(init: float = 0.02) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=init,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
    )
    return Qwen2ForCausalLM(cfg).eval()


def mistral_sliding() -> MistralForCausalLM:
    """Sliding-window attention (window 4 < sequence length 9): the mask function must carry the window."""
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=4, pad_token_id=0, initializer_range=0.2,
    )
    return MistralForCausalLM(cfg).eval()


ARCHS = {"llama": llama, "bert": bert, "gpt2": gpt2, "qwen2": qwen2, "mistral_sliding": mistral_sliding}


def batch(left_pad: bool = True, n: int = 9):
    """Token ids (2, n) and a padding mask: row 0 padded by 3 (left or right), row 1 full."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    if left_pad:
        mask[0, :3] = 0
    else:
        mask[0, -3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def run(model, impl: str, ids, mask, **kw):
    model.set_attn_implementation(impl)
    out = model(input_ids=ids, attention_mask=mask, **kw)
    return out


# ----------------------------------------------------------------------------- softmax == the model's attention


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_hopfield_softmax_reproduces_model_attention(arch, reference):
    model = ARCHS[arch]()
    ids, mask = batch(left_pad=arch != "bert")
    field = "last_hidden_state" if arch == "bert" else "logits"
    ref = getattr(run(model, reference, ids, mask), field)
    got = getattr(run(model, "hopfield_softmax", ids, mask), field)
    valid = mask.bool()  # padded positions are undefined in the references (eager: uniform weights)
    torch.testing.assert_close(got[valid], ref[valid], atol=2e-5, rtol=1e-4)
    assert torch.isfinite(got).all()


def test_hopfield_softmax_gradients_match_sdpa():
    model = llama()
    ids, mask = batch()
    grads = {}
    for impl in ("sdpa", "hopfield_softmax"):
        model.zero_grad()
        run(model, impl, ids, mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads["hopfield_softmax"], grads["sdpa"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_returned_weights_match_eager(arch):
    model = llama() if arch == "llama" else bert()
    ids, mask = batch(left_pad=arch == "llama")
    ref = run(model, "eager", ids, mask, output_attentions=True).attentions
    got = run(model, "hopfield_softmax", ids, mask, output_attentions=True).attentions
    assert len(got) == len(ref) == 2
    rows = mask.bool()[:, None, :, None]  # valid query rows
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        torch.testing.assert_close(g * rows, r * rows, atol=1e-6, rtol=1e-5)


def test_one_line_selection_from_config_and_from_pretrained(tmp_path):
    """attn_implementation= in the config and in from_pretrained (a local directory, no hub) selects a backend."""
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="hopfield_entmax15",
    )
    model = LlamaForCausalLM(cfg).eval()
    assert model.config._attn_implementation == "hopfield_entmax15"
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="hopfield_sparsemax").eval()
    assert loaded.config._attn_implementation == "hopfield_sparsemax"
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0],
            run(model, "hopfield_sparsemax", ids, mask, output_attentions=True).attentions[0],
        )


# ----------------------------------------------------------------------------- sparse backends


def _allowed(mask2d: torch.Tensor, q_len: int, causal: bool) -> torch.Tensor:
    """(batch, 1, q_len, kv_len): causal (aligned to the last key) and padding structure by hand."""
    b, kv_len = mask2d.shape
    allowed = mask2d.bool()[:, None, None, :].expand(b, 1, q_len, kv_len).clone()
    if causal:
        for i in range(q_len):
            allowed[:, :, i, i + kv_len - q_len + 1:] = False
    return allowed


@pytest.mark.parametrize("impl", ["hopfield_sparsemax", "hopfield_entmax15"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_sparse_weights_have_exact_zeros(arch, impl):
    model = llama(init=0.5) if arch == "llama" else bert(init=0.5)
    ids, mask = batch(left_pad=arch == "llama")
    weights = run(model, impl, ids, mask, output_attentions=True).attentions
    allowed = _allowed(mask, ids.shape[1], causal=arch == "llama")
    valid_rows = allowed.any(-1, keepdim=True)
    for w in weights:
        assert torch.isfinite(w).all()
        assert (w[~allowed.expand_as(w)] == 0).all(), "masked keys must get exactly zero weight"
        inside = w[allowed.expand_as(w)]
        assert (inside == 0).any(), "a sparse map must zero some allowed keys exactly"
        sums = w.sum(-1, keepdim=True)
        torch.testing.assert_close(sums[valid_rows.expand_as(sums)], torch.ones_like(sums[valid_rows.expand_as(sums)]))


class _Recorder:
    """An attention function that records its inputs and delegates to a Hopfield backend."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def __call__(self, module, query, key, value, attention_mask, **kw):
        out, w = self.backend(module, query, key, value, attention_mask, **kw)
        self.calls.append((module, query.detach(), key.detach(), value.detach(), out.detach(), kw.get("scaling")))
        return out, w


def _naive(query, key, value, allowed, scaling, mapping):
    """Row-by-row reference: repeat the key heads, keep the allowed keys, map, read out (zeros if none)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    b, h, n, _ = query.shape
    out = torch.zeros(b, n, h, value.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                keep = allowed[bi, 0, i]
                if keep.any():
                    s = (key[bi, hi, keep].double() @ query[bi, hi, i].double()) * scaling
                    out[bi, i, hi] = mapping(s[None], dim=-1)[0] @ value[bi, hi, keep].double()
    return out


@pytest.mark.parametrize("separation", ["sparsemax", "entmax15"])
def test_masks_match_naive_reference_left_padding_causal_and_generation(separation):
    mapping = {"sparsemax": entmax_pkg.sparsemax, "entmax15": entmax_pkg.entmax15}[separation]
    rec = _Recorder(hf.HopfieldAttentionBackend(separation))
    AttentionInterface.register("hopfield_test_recorder", rec)
    from transformers.masking_utils import AttentionMaskInterface

    AttentionMaskInterface.register("hopfield_test_recorder", hf.hopfield_mask)
    model = llama(init=0.3)
    model.set_attn_implementation("hopfield_test_recorder")
    ids, mask = batch(left_pad=True, n=6)
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 9)
    kinds = set()
    for module, q, k, v, out, scaling in rec.calls:
        q_len, kv_len = q.shape[-2], k.shape[-2]
        kinds.add("prefill" if q_len > 1 else "decode")
        full = torch.cat([mask, torch.ones(2, kv_len - mask.shape[1], dtype=torch.long)], dim=1)
        allowed = _allowed(full, q_len, causal=True)
        ref = _naive(q, k, v, allowed, scaling, mapping)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    assert kinds == {"prefill", "decode"}


@pytest.mark.parametrize("impl", ["hopfield_sparsemax", "hopfield_entmax15"])
def test_sparse_backend_trains_and_generates(impl):
    model = llama(layers=1).train()
    model.set_attn_implementation(impl)
    torch.manual_seed(0)
    pattern = torch.tensor([3, 7, 11, 5, 9, 13, 4, 8])
    ids = torch.stack([pattern.roll(int(s)) for s in torch.randint(0, 8, (8,))]).repeat(1, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    with torch.no_grad():
        gen = model.generate(ids[:2, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 12)


# ----------------------------------------------------------------------------- factory, learnable alpha, energies


def _qkv(b=2, h=4, kv=2, n=5, m=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, kv, m, d, generator=g), torch.randn(b, kv, m, d, generator=g))


class _Layer(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = False


def test_factory_alpha_and_steps_match_naive_iteration():
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    backend = hf.register_backend("hopfield_test_a125_s3", 1.25, steps=3, beta=0.7)
    out, w = backend(_Layer(), q, k, v, mask, output_attentions=True)
    kk, vv = k.repeat_interleave(2, 1).double(), v.repeat_interleave(2, 1).double()
    x = q.double()
    for t in range(3):
        s = (x @ kk.transpose(-1, -2) * 0.7).masked_fill(~mask, float("-inf"))
        p = entmax_pkg.entmax_bisect(s, alpha=1.25, dim=-1, n_iter=200)
        x = p @ (kk if t < 2 else vv)
    torch.testing.assert_close(out.double(), x.transpose(1, 2), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(w.double(), p, atol=2e-5, rtol=1e-4)
    assert "hopfield_test_a125_s3" in AttentionInterface._global_mapping


def test_causal_flag_without_mask_is_aligned_to_the_last_key():
    q, k, v = _qkv(n=3, m=6)
    layer = _Layer()
    got, _ = hf.HopfieldAttentionBackend("sparsemax")(layer, q, k, v, None, is_causal=True)
    allowed = _allowed(torch.ones(2, 6, dtype=torch.long), 3, causal=True)
    ref = _naive(q, k, v, allowed, 8 ** -0.5, entmax_pkg.sparsemax)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["hopfield_softmax", "hopfield_sparsemax"])
def test_dropout_only_in_training(impl):
    model = llama(dropout=0.5, layers=1)
    ids, mask = batch()
    model.set_attn_implementation(impl)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        torch.testing.assert_close(a, b)
        model.train()
        c = model(input_ids=ids).logits
        padded = model(input_ids=ids, attention_mask=mask).logits  # all-masked (left-pad) rows + dropout
    assert not torch.allclose(a, c)
    assert torch.isfinite(padded).all()


def test_learnable_alpha_per_head_gets_gradients_and_moves():
    hf.register_backend("hopfield_learnable", hf.LEARNABLE)
    model = llama(layers=2).train()
    layers = hf.add_learnable_alpha(model, init=1.5)
    assert len(layers) == 2
    alphas = [hf.learned_alpha(m) for m in layers]
    torch.testing.assert_close(alphas[0], torch.full((4,), 1.5))
    model.set_attn_implementation("hopfield_learnable")
    ids, _ = batch()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        grad = layers[0].hopfield_alpha_logit.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        opt.step()
    after = hf.learned_alpha(layers[0]).detach()
    assert (after > 1).all() and (after < 2).all() and not torch.allclose(after, torch.full((4,), 1.5))
    assert any(n.endswith("hopfield_alpha_logit") for n in model.state_dict())


def test_learnable_without_parameters_says_what_to_do():
    hf.register_backend("hopfield_learnable", hf.LEARNABLE)
    model = llama(layers=1)
    model.set_attn_implementation("hopfield_learnable")
    with pytest.raises(ValueError, match="add_learnable_alpha"):
        model(input_ids=batch()[0])


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", 1.3])
def test_energy_hook_records_non_increasing_energies(separation):
    rec = hf.EnergyRecorder()
    hf.register_backend("hopfield_test_energy", separation, steps=3, energy_hook=rec)
    model = llama(init=0.3)
    model.set_attn_implementation("hopfield_test_energy")
    ids, mask = batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert [i for i, _ in rec.records] == [0, 1]
    for _, e in rec.records:
        assert e.shape == (4, 2, 4, ids.shape[1])
        assert torch.isfinite(e).all()
        assert (e[1:] <= e[:-1] + 1e-4).all(), "CCCP updates never increase the energy"


def test_backend_is_picklable():
    backend = hf.HopfieldAttentionBackend(1.25, steps=2, beta=0.5)
    assert pickle.loads(pickle.dumps(backend)) == backend


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"separation": "relu"}, "separation"),
        ({"separation": 2.5}, "alpha must lie in"),
        ({"steps": 0}, "steps must be"),
        ({"beta": -1.0}, "beta must be"),
        ({"energy_hook": 3}, "energy_hook"),
    ],
)
def test_bad_backend_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hf.HopfieldAttentionBackend(**kwargs)


@pytest.mark.parametrize("name", ["sdpa", "eager", "", "kernels-community/x", 3])
def test_bad_backend_names(name):
    with pytest.raises(ValueError, match="name"):
        hf.register_backend(name, "sparsemax")


def test_bad_learnable_alpha_init():
    with pytest.raises(ValueError, match="init must be"):
        hf.add_learnable_alpha(llama(layers=1), init=2.0)


def test_unsupported_softcap_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="softcap"):
        hf.HopfieldAttentionBackend()(_Layer(), q, k, v, None, softcap=30.0)


# ----------------------------------------------------------------------------- Lightning: train.py with an HF model

from pathlib import Path  # noqa: E402

from hopformer import cli  # noqa: E402
from hopformer.data.text import CharTextDataModule, builtin_text, decode, encode  # noqa: E402
from hopformer.training.language import CausalLMModule  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_builtin_text_and_windows():
    text = builtin_text("python_reference")
    assert len(text) > 10_000 and "statement" in text
    assert "Beautiful is better than ugly." in builtin_text("zen")
    assert decode(encode("if x: pass")) == "if x: pass"
    dm = CharTextDataModule(max_chars=20_000, seq_len=32, batch_size=4)
    dm.setup("fit")
    item = dm.train_set[0]
    assert item["input_ids"].shape == (32,) and int(item["input_ids"].max()) < dm.vocab_size
    assert len(dm.train_set) == int(20_000 * 0.9) // 32
    with pytest.raises(ValueError, match="seq_len"):
        CharTextDataModule(seq_len=1)
    with pytest.raises(ValueError, match="source"):
        builtin_text("shakespeare")


def test_causal_lm_module_rejects_unknown_backend_and_small_vocab():
    with pytest.raises(ValueError, match="attn_implementation='hopfield_typo'"):
        CausalLMModule(attn_implementation="hopfield_typo")
    with pytest.raises(ValueError, match="vocab_size"):
        CausalLMModule(vocab_size=64, num_layers=1).check_datamodule(CharTextDataModule())


def _fit(tmp_path: Path, overlay: str | None, *extra: str):
    """Fit configs/lm/base.yaml (plus ``configs/lm/<overlay>``)."""
    configs = ["--config", str(CONFIGS / "lm" / "base.yaml")] + (["--config", str(CONFIGS / "lm" / overlay)] if overlay else [])
    args = ["fit", *configs, "--trainer.default_root_dir", str(tmp_path), *QUIET, *extra]
    return cli.main(args)


def test_train_py_fits_a_hopfield_llama_short(tmp_path):
    """Short version of configs/lm/base.yaml: the loss falls well below uniform (ln 128)."""
    run = _fit(
        tmp_path, None, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "30",
        "--trainer.limit_val_batches", "4", "--model.init_args.warmup_steps", "5", "--data.init_args.max_chars", "40000",
        "--data.init_args.batch_size", "16", "--model.init_args.num_layers", "1", "--test_after_fit", "false",
    )
    val = float(run.trainer.callback_metrics["val_loss"])
    assert val < 0.8 * torch.log(torch.tensor(128.0)).item(), val
    assert run.model.model.config._attn_implementation == "hopfield_sparsemax"
    out = run.model.generate(encode("The ")[None], max_new_tokens=8)
    assert out.shape == (1, 12)


@pytest.mark.slow
@pytest.mark.parametrize("config", [None, "learnable_alpha.yaml"])
def test_train_py_hf_configs_full(tmp_path, config):
    """The configs as shipped (a few minutes each on 2 CPU cores): test loss below 2.6 nats/char."""
    run = _fit(tmp_path, config, "--test_after_fit", "true")
    assert float(run.trainer.callback_metrics["test_loss"]) < 2.6
