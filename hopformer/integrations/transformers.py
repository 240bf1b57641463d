"""Hopfield attention for any Hugging Face ``transformers`` model (``attn_implementation="hopfield_*"``).

Since ``transformers`` 4.48 every supported model (Llama, Qwen, Mistral, GPT-2, BERT, ...) computes
its attention through ``transformers.AttentionInterface``: a function registered there under a name
runs inside every attention layer of a model loaded or built with ``attn_implementation=<name>``.
:func:`register` adds Hopfield backends built on :func:`hopformer.functional.hopfield_retrieve`:

* ``"hopfield_softmax"``   - dense modern Hopfield retrieval (Ramsauer et al. 2020, eq. 3); one step
  with ``beta = 1/sqrt(d)`` is exactly the model's own attention;
* ``"hopfield_sparsemax"`` - sparse modern Hopfield retrieval (Hu et al. 2023, eq. 3.4);
* ``"hopfield_entmax15"``  - generalized sparse retrieval with 1.5-entmax (Wu et al. 2024, eq. 3.3);

and :func:`register_backend` any other separation (alpha in [1, 2]), number of update steps or
inverse temperature, a learnable alpha per layer and head (:func:`add_learnable_alpha`) and an energy
hook (:class:`EnergyRecorder`)::

    from transformers import LlamaConfig, LlamaForCausalLM
    from hopformer.integrations.transformers import register

    register()
    model = LlamaForCausalLM(LlamaConfig(...))
    model.set_attn_implementation("hopfield_sparsemax")

Each backend is also registered in ``transformers.masking_utils.AttentionMaskInterface`` so the model
builds a boolean mask (``True`` = the key takes part) with causal, sliding-window and padding
structure; a query row whose keys are all masked (e.g. a left-padding position) reads out zeros.
This module needs the ``hf`` extra and nothing else in hopformer imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hopformer.functional import check_separation, hopfield_energy, hopfield_retrieve

__all__ = [
    "BACKENDS",
    "LEARNABLE",
    "EnergyRecorder",
    "HopfieldAttentionBackend",
    "add_learnable_alpha",
    "hopfield_mask",
    "learned_alpha",
    "register",
    "register_backend",
]

#: The backends :func:`register` adds: name -> separation.
BACKENDS: Dict[str, str] = {
    "hopfield_softmax": "softmax",
    "hopfield_sparsemax": "sparsemax",
    "hopfield_entmax15": "entmax15",
}

#: ``separation=LEARNABLE`` reads alpha from the parameter :func:`add_learnable_alpha` puts on each layer.
LEARNABLE = "learnable"
ALPHA_PARAMETER = "hopfield_alpha_logit"

# Names owned by transformers itself: a Hopfield backend must not shadow them.
_RESERVED = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")
EnergyHook = Callable[[nn.Module, Tensor], None]


def hopfield_mask(*args: Any, **kwargs: Any) -> Optional[Tensor]:
    """The models' boolean 4D mask ``(batch, 1, q_len, kv_len)`` (``True`` = the key takes part).

    ``transformers.masking_utils.sdpa_mask`` with ``allow_is_causal_skip=False``: SDPA may drop a pure
    causal mask and rely on its ``is_causal`` flag, a Hopfield backend always gets the mask (causal,
    sliding window, padding, packed sequences). A bidirectional model without padding may get ``None``.
    """
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _causal_mask(q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """Lower-right aligned causal mask ``(1, 1, q_len, kv_len)``: query i sees keys ``j <= i + kv_len - q_len``."""
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return rearrange(rows >= torch.arange(kv_len, device=device)[None, :], "n m -> 1 1 n m")


def _is_learnable(separation: Any) -> bool:
    return isinstance(separation, str) and separation == LEARNABLE


def learned_alpha(module: nn.Module) -> Tensor:
    """The alpha ``1 + sigmoid(logit)`` in (1, 2) of one attention layer, shape ``(num_heads,)`` or ``(1,)``.

    Raises:
        ValueError: when :func:`add_learnable_alpha` has not put the parameter on ``module``.
    """
    logit = getattr(module, ALPHA_PARAMETER, None)
    if not isinstance(logit, Tensor):
        raise ValueError(
            f"separation={LEARNABLE!r} needs a learnable alpha on every attention layer; "
            f"{type(module).__name__} has no parameter {ALPHA_PARAMETER!r}: call "
            "hopformer.integrations.transformers.add_learnable_alpha(model) before the forward pass"
        )
    return 1.0 + torch.sigmoid(logit)


@dataclass
class HopfieldAttentionBackend:
    """A ``transformers.AttentionInterface`` function: Hopfield retrieval in place of the model's attention.

    For each head, the state patterns are the model's queries, the stored patterns its keys (GQA key
    heads are repeated over their query group) and the read-out patterns its values::

        x_{t+1} = Sep(beta x_t K^T + mask) K    (t < steps - 1; Ramsauer et al. 2020, eq. 3;
        out     = Sep(beta x_T K^T + mask) V     Hu et al. 2023, eq. 3.4; Wu et al. 2024, eq. 3.3)

    so ``steps=1`` is one attention read-out with the separation ``Sep`` in place of softmax. Instances are
    picklable (module-level class, plain fields).

    Args:
        separation: "softmax", "sparsemax", "entmax15", a float alpha in [1, 2] (Peters et al. 2019,
            eq. 4: 1 = softmax, 2 = sparsemax) or ``LEARNABLE`` (alpha per layer and head from
            :func:`add_learnable_alpha`).
        steps: Hopfield update steps per attention call (>= 1); steps > 1 iterates the queries in key
            space before the read-out and needs the key and query head sizes to agree.
        beta: inverse temperature; ``None`` uses the model's own ``scaling`` (1/sqrt(head_dim) unless the
            architecture says otherwise).
        energy_hook: called as ``energy_hook(module, energies)`` with the detached energies
            ``E(x_t) = -(1/beta) Psi*(beta K x_t) + 0.5 <x_t, x_t>`` (Ramsauer et al. eq. 2; Hu et al.
            eq. 3.1; Wu et al. eq. 3.1) of the states ``x_0 = query, ..., x_steps`` in key space, shape
            ``(steps + 1, batch, heads, q_len)`` (analysis only: it costs one extra update and the
            energies; :class:`EnergyRecorder` collects them).
    """

    separation: Union[str, float] = "softmax"
    steps: int = 1
    beta: Optional[float] = None
    energy_hook: Optional[EnergyHook] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not _is_learnable(self.separation):
            self.separation = check_separation(self.separation)
            if isinstance(self.separation, Tensor):
                raise ValueError(
                    f"separation: a backend takes a name, a float alpha in [1, 2] or {LEARNABLE!r} "
                    f"(learnable alpha per layer/head via add_learnable_alpha); got a tensor"
                )
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1 (Hopfield updates per attention call); got {self.steps!r}")
        if self.beta is not None and (
            isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 0
        ):
            raise ValueError(f"beta must be a positive float (inverse temperature) or None (model scaling); got {self.beta!r}")
        if self.energy_hook is not None and not callable(self.energy_hook):
            raise ValueError(f"energy_hook must be callable as hook(module, energies); got {self.energy_hook!r}")

    def _separation(self, module: nn.Module, heads: int) -> Union[str, float, Tensor]:
        if not _is_learnable(self.separation):
            return self.separation
        alpha = learned_alpha(module)
        if alpha.numel() not in (1, heads):
            raise ValueError(
                f"the learnable alpha of {type(module).__name__} has {alpha.numel()} values; expected 1 or "
                f"{heads} (one per attention head)"
            )
        return rearrange(alpha, "h -> 1 h 1 1")

    def __call__(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        dropout: float = 0.0,
        scaling: Optional[float] = None,
        is_causal: Optional[bool] = None,
        **kwargs: Any,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The AttentionInterface call (same signature as ``transformers``' ``sdpa_attention_forward``).

        Args:
            module: the model's attention layer (read: ``num_key_value_groups``, ``is_causal``, and the
                learnable alpha).
            query: ``(batch, heads, q_len, head_dim)``.
            key: ``(batch, kv_heads, kv_len, head_dim)``; ``heads`` must be a multiple of ``kv_heads``.
            value: ``(batch, kv_heads, kv_len, v_dim)``.
            attention_mask: boolean (``True`` = take part) or additive float mask broadcastable to
                ``(batch, heads, q_len, kv_len)`` (longer key axes are cut to ``kv_len``), or ``None``.
            dropout: dropout probability on the weights of the read-out step (the model passes 0 in eval).
            scaling: the model's score scale, used as ``beta`` unless the backend sets one.
            is_causal: with no mask, ``True`` (or the module's ``is_causal``) applies a causal mask
                aligned to the last key when ``q_len > 1``.
            **kwargs: ``output_attentions=True`` also returns the weights; ``softcap``, ``position_bias``
                and attention sinks (``s_aux``/``sinks``) are not supported and raise.

        Returns:
            ``(out, weights)``: ``out`` of shape ``(batch, q_len, heads, v_dim)`` and the last step's
            association weights ``(batch, heads, q_len, kv_len)`` when asked for, else ``None``.
        """
        for unsupported in ("softcap", "position_bias", "s_aux", "sinks"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(
                    f"Hopfield attention backends do not support {unsupported!r} (got a value for it from "
                    f"{type(module).__name__}); use eager/sdpa for this architecture"
                )
        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            raise ValueError(
                "query, key and value must be (batch, heads, seq_len, head_dim); got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        heads, kv_heads = query.shape[1], key.shape[1]
        if heads % kv_heads:
            raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
        if heads != kv_heads:  # grouped-query attention: each key head serves a group of query heads
            key = repeat(key, "b h m d -> b (h g) m d", g=heads // kv_heads)
            value = repeat(value, "b h m d -> b (h g) m d", g=heads // kv_heads)
        q_len, kv_len = query.shape[-2], key.shape[-2]

        mask = attention_mask
        if mask is not None:
            mask = mask[..., :kv_len]
        else:
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
            if causal and q_len > 1:
                mask = _causal_mask(q_len, kv_len, query.device)
        beta = float(self.beta if self.beta is not None else (scaling if scaling is not None else query.shape[-1] ** -0.5))
        separation = self._separation(module, heads)
        want_weights = bool(kwargs.get("output_attentions", False))

        if self.energy_hook is not None:
            self._report_energies(module, query, key, beta, separation, mask)
        result = hopfield_retrieve(
            query,
            key,
            value,
            beta=beta,
            separation=separation,
            steps=self.steps,
            mask=mask,
            dropout=float(dropout),
            return_association=want_weights,
        )
        out, weights = result if want_weights else (result, None)
        return rearrange(out, "b h n d -> b n h d").contiguous(), weights

    @torch.no_grad()
    def _report_energies(self, module, query, key, beta, separation, mask) -> None:
        """Energies of ``x_0 = query, ..., x_steps`` (updates with values = keys) to ``energy_hook``."""
        states = [query]
        for _ in range(self.steps):
            states.append(hopfield_retrieve(states[-1], key, beta=beta, separation=separation, mask=mask))
        energies = torch.stack([hopfield_energy(x, key, beta=beta, separation=separation, mask=mask) for x in states])
        self.energy_hook(module, energies.detach())


@dataclass
class EnergyRecorder:
    """An ``energy_hook`` that keeps ``(layer_idx, energies)`` per attention call (energies on the CPU).

    ``layer_idx`` is the attention module's ``layer_idx`` attribute (``None`` where it has none); the
    energies have shape ``(steps + 1, batch, heads, q_len)`` (see :class:`HopfieldAttentionBackend`).
    """

    records: List[Tuple[Optional[int], Tensor]] = field(default_factory=list)

    def __call__(self, module: nn.Module, energies: Tensor) -> None:
        self.records.append((getattr(module, "layer_idx", None), energies.float().cpu()))

    def clear(self) -> None:
        """Forget the recorded energies."""
        self.records.clear()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or "|" in name:
        raise ValueError(
            f"name must be a non-empty string without '/' or '|' (those select hub kernels / paged attention "
            f"in transformers); got {name!r}"
        )
    if name in _RESERVED:
        raise ValueError(f"name {name!r} is one of transformers' own attention implementations {_RESERVED}; pick another")
    return name


def register_backend(
    name: str,
    separation: Union[str, float] = "softmax",
    *,
    steps: int = 1,
    beta: Optional[float] = None,
    energy_hook: Optional[EnergyHook] = None,
) -> HopfieldAttentionBackend:
    """Register a Hopfield backend under ``name`` (attention function and mask function); return it.

    Args:
        name: the ``attn_implementation`` string (not one of transformers' own, no '/' or '|').
        separation, steps, beta, energy_hook: see :class:`HopfieldAttentionBackend`.

    Example: ``register_backend("hopfield_a125_2steps", 1.25, steps=2)`` then
    ``model.set_attn_implementation("hopfield_a125_2steps")``.
    """
    backend = HopfieldAttentionBackend(separation=separation, steps=steps, beta=beta, energy_hook=energy_hook)
    _check_name(name)
    AttentionInterface.register(name, backend)
    AttentionMaskInterface.register(name, hopfield_mask)
    return backend


def register() -> Tuple[str, ...]:
    """Register ``"hopfield_softmax"``, ``"hopfield_sparsemax"`` and ``"hopfield_entmax15"`` (one update step,
    the model's own scaling as beta); idempotent. Returns the names."""
    for name, separation in BACKENDS.items():
        register_backend(name, separation)
    return tuple(BACKENDS)


def _attention_layers(model: nn.Module) -> List[nn.Module]:
    """The modules that call the attention interface: they own the query/key/value projections."""
    found = []
    for module in model.modules():
        owns_projections = any(hasattr(module, n) for n in ("q_proj", "query", "c_attn", "qkv_proj", "Wqkv"))
        if owns_projections and type(module).__name__.endswith("Attention"):
            found.append(module)
    return found


def add_learnable_alpha(
    model: nn.Module, init: float = 1.5, per_head: bool = True, layers: Optional[List[nn.Module]] = None
) -> List[nn.Module]:
    """Put a learnable alpha (per head, or one per layer) on every attention layer of ``model``.

    The parameter ``hopfield_alpha_logit`` (``(num_heads,)`` or ``(1,)``) is registered on each attention
    module, so it is part of ``model.parameters()`` / the state dict and is trained with the model; the
    backend registered with ``separation=LEARNABLE`` uses ``alpha = 1 + sigmoid(logit)``, always inside
    (1, 2) (Correia et al. 2019, adaptively sparse transformers: alpha learned by gradient, eq. 12-14).
    Call it before creating the optimizer.

    Args:
        model: a ``transformers`` model (or any module tree with such attention layers).
        init: starting alpha, strictly inside (1, 2).
        per_head: one alpha per head (``config.num_attention_heads``) instead of one per layer.
        layers: the attention modules to equip; default: every module whose class name ends in
            "Attention" and that owns query projections (``q_proj``, ``query``, ``c_attn``, ...).

    Returns:
        the modules that received the parameter.

    Raises:
        ValueError: ``init`` outside (1, 2), or no attention layer found.
    """
    if isinstance(init, bool) or not isinstance(init, (int, float)) or not 1.0 < init < 2.0:
        raise ValueError(f"init must be a float strictly inside (1, 2) (1 + sigmoid(logit)); got {init!r}")
    layers = _attention_layers(model) if layers is None else list(layers)
    if not layers:
        raise ValueError(
            f"add_learnable_alpha found no attention layers in {type(model).__name__}; pass them as layers=[...]"
        )
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None) if per_head else 1
    if not isinstance(heads, int):
        raise ValueError("per_head=True needs model.config.num_attention_heads; pass per_head=False for one alpha per layer")
    logit = torch.logit(torch.tensor(init - 1.0)).item()
    for module in layers:
        weight = next(module.parameters(), None)
        kw = {} if weight is None else {"device": weight.device}
        module.register_parameter(ALPHA_PARAMETER, nn.Parameter(torch.full((heads,), logit, **kw)))
    return layers


def transformers_version() -> str:
    """The installed ``transformers`` version (for reports and benchmarks)."""
    return transformers.__version__
