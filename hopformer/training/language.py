"""Causal language modelling with a Hugging Face model built from config and a Hopfield attention backend.

``CausalLMModule`` builds a small Llama-style (or GPT-2) model with ``transformers`` (``hf`` extra) and
selects its attention by name: ``"hopfield_softmax"``, ``"hopfield_sparsemax"``, ``"hopfield_entmax15"``
(:func:`hopformer.integrations.transformers.register`), the model's own ``"sdpa"``/``"eager"``, or a
custom backend described by ``hopfield`` (any alpha, update steps, beta, or a learnable alpha per
layer and head). ``transformers`` is imported when the module is built, never by ``hopformer.training``.

    python train.py fit --config configs/lm/base.yaml
"""

from __future__ import annotations

import math
from typing import Any, Dict, Literal, Optional

import lightning as L
import torch
from torch import Tensor, nn

__all__ = ["CausalLMModule", "build_causal_lm"]

_BUILTIN = ("sdpa", "eager")


def build_causal_lm(
    architecture: Literal["llama", "gpt2"],
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_len: int,
    dropout: float,
) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (grouped-query attention when ``num_kv_heads < num_heads``)
    or ``GPT2LMHeadModel`` (``num_kv_heads`` and ``intermediate_size`` ignored: 4 x hidden)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if architecture == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_len, attention_dropout=dropout, tie_word_embeddings=True,
            pad_token_id=0, bos_token_id=None, eos_token_id=None,
        )
        return LlamaForCausalLM(cfg)
    if architecture == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_len,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        )
        return GPT2LMHeadModel(cfg)
    raise ValueError(f"architecture must be 'llama' or 'gpt2'; got {architecture!r}")


class CausalLMModule(L.LightningModule):
    """Train a from-config Hugging Face causal LM with a (Hopfield) attention backend.

    Batches are dicts with ``input_ids`` and ``labels`` ``(B, L)`` (e.g. :class:`hopformer.data.text.CharTextDataModule`).
    Logged: ``{train,val,test}_loss`` (cross-entropy, nats per token), ``val_bpc``/``test_bpc`` (bits per
    token) and, with a learnable alpha, the mean alpha of each layer.

    Args:
        architecture: "llama" (RMSNorm, RoPE, SwiGLU, GQA) or "gpt2".
        attn_implementation: the attention used by every layer: a Hopfield backend name, "sdpa" or "eager".
        hopfield: options of a custom backend registered under ``attn_implementation`` (keys of
            :class:`hopformer.integrations.transformers.HopfieldAttentionBackend`: ``separation`` (a float
            alpha in [1, 2] or "learnable"), ``steps``, ``beta``); None for the built-in names.
        learnable_alpha_init: starting alpha when ``hopfield.separation`` is "learnable" (per head).
        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, max_len,
            dropout: the model's size (``max_len`` bounds the sequence length; ``dropout`` on attention).
        lr: AdamW learning rate (linear warm-up over ``warmup_steps``, then cosine decay to 10% over the
            trainer's estimated steps).
        weight_decay: AdamW weight decay on matrices (not on norms, biases and alpha).
        warmup_steps: warm-up length in optimizer steps.
    """

    monitor = "val_loss"  # read by hopformer.cli for ModelCheckpoint
    monitor_mode = "min"

    def __init__(
        self,
        architecture: Literal["llama", "gpt2"] = "llama",
        attn_implementation: str = "hopfield_sparsemax",
        hopfield: Optional[Dict[str, Any]] = None,
        learnable_alpha_init: float = 1.5,
        vocab_size: int = 128,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        intermediate_size: int = 128,
        max_len: int = 256,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0; got {lr!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {warmup_steps!r}")
        self.save_hyperparameters()
        from hopformer.integrations import transformers as hf

        hf.register()
        if hopfield is not None:
            if attn_implementation in hf.BACKENDS or attn_implementation in _BUILTIN:
                raise ValueError(
                    f"hopfield options define a new backend; attn_implementation={attn_implementation!r} is a built-in "
                    f"name: choose a new one (e.g. 'hopfield_custom')"
                )
            hf.register_backend(attn_implementation, **hopfield)
        elif attn_implementation not in hf.BACKENDS and attn_implementation not in _BUILTIN:
            raise ValueError(
                f"attn_implementation={attn_implementation!r}: expected one of {tuple(hf.BACKENDS) + _BUILTIN}, "
                "or a new name together with hopfield options"
            )
        self.model = build_causal_lm(
            architecture, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, max_len, dropout
        )
        self.alpha_layers = []
        if hopfield is not None and hopfield.get("separation") == hf.LEARNABLE:
            self.alpha_layers = hf.add_learnable_alpha(self.model, init=learnable_alpha_init)
        self.model.set_attn_implementation(attn_implementation)

    def check_datamodule(self, datamodule: Any) -> None:
        """Raise before training when the data's vocabulary or sequence length does not fit the model."""
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is not None and vocab > self.hparams.vocab_size:
            raise ValueError(
                f"model.vocab_size={self.hparams.vocab_size} but the data module has {vocab} tokens: set "
                f"model.init_args.vocab_size={vocab}"
            )
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.hparams.max_len:
            raise ValueError(f"data seq_len={seq_len} exceeds model.max_len={self.hparams.max_len}: raise max_len")

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Next-token logits ``(B, L, vocab_size)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _step(self, batch: Dict[str, Tensor], stage: str) -> Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
        loss = out.loss
        on_step = stage == "train"
        size = batch["input_ids"].shape[0]
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=size)
        if stage != "train":
            self.log(f"{stage}_bpc", loss / math.log(2), on_epoch=True, prog_bar=True, batch_size=size)
        return loss

    def training_step(self, batch: Dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        for i, layer in enumerate(self.alpha_layers):
            alpha = 1.0 + torch.sigmoid(layer.hopfield_alpha_logit.detach())
            self.log(f"hopfield/layer{i}/alpha", alpha.mean(), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, **kwargs: Any) -> Tensor:
        """Greedy continuation with the model's ``generate`` (same attention backend, KV cache)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        finally:
            self.model.train(was_training)

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
        total = max(int(getattr(self.trainer, "estimated_stepping_batches", 0) or 0), 1)
        warm = self.hparams.warmup_steps

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min((step - warm) / max(total - warm, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
