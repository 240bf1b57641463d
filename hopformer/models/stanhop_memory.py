"""External memory plugins of STanHop-Net (Wu et al. 2024, sec. 4.3), absent from the public code.

Both act on the tokens entering a STanHop block, ``(B, N, d)`` -> ``(B, N, d)``, as a residual
retrieval ``Z + w * Hopfield(Z, M)``:

- ``PlugAndPlayMemory`` (train-less): M is a bank of stored token representations of training
  windows (filled by ``STanHopNet.fill_memory``), retrieved with a parameter-free Hopfield update
  ``Sep(beta Z M^T) M`` (eq. 3.3 with the identity projections). Nothing is learned; attach it to a
  trained network and fill it.
- ``TuneAndPlayMemory`` (task-aware): M is a set of learned memory patterns (initialised, and
  re-initialised from data by ``fill_memory``), retrieved by a projected Hopfield layer of the
  configured variant and trained with the task loss (optionally with the backbone frozen).

While ``collecting`` is True a memory stores its input and passes it through unchanged.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from ..checks import positive_int
from ..functional import hopfield_retrieve

__all__ = ["PlugAndPlayMemory", "TuneAndPlayMemory", "build_memory", "MEMORY_KINDS"]

MEMORY_KINDS = ("plug", "tune")


def _subset(tokens: Tensor, size: int, seed: int) -> Tensor:
    flat = rearrange(tokens, "b n d -> (b n) d")
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(flat.shape[0], generator=gen)[:size].to(flat.device)
    return flat[index]


class PlugAndPlayMemory(nn.Module):
    """Train-less retrieval from a bank of stored training-window tokens.

    Args:
        dim: token size d.
        size: largest number of stored tokens M (a seeded random subset of what is offered).
        separation: separation map of the retrieval ("softmax", "sparsemax", "entmax15" or alpha).
        beta: inverse temperature; default ``1 / sqrt(dim)``.
        weight: w, scale of the retrieved pattern added to the token.
        seed: seed of the subset choice.
    """

    def __init__(self, dim: int, *, size: int = 256, separation: str | float = "entmax15",
                 beta: float | None = None, weight: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        positive_int("size (number of stored tokens)", size)
        self.dim, self.size, self.separation, self.weight, self.seed = dim, size, separation, weight, seed
        self.beta = beta if beta is not None else dim**-0.5
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.collecting = False

    @torch.no_grad()
    def store(self, tokens: Tensor) -> None:
        """Keep a random subset of ``tokens`` ``(B, N, dim)`` as the memory bank."""
        chosen = _subset(tokens, self.size, self.seed)
        self.bank.zero_()
        self.bank[: chosen.shape[0]] = chosen
        self.count.fill_(chosen.shape[0])

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"tokens: expected (batch, n, {self.dim}), got {tuple(tokens.shape)}")
        if self.collecting:
            self.store(tokens)
            return tokens
        if int(self.count) == 0:
            raise RuntimeError("PlugAndPlayMemory is empty: call STanHopNet.fill_memory(windows) before using it")
        bank = repeat(self.bank[: int(self.count)], "m d -> b m d", b=tokens.shape[0])
        retrieved = hopfield_retrieve(tokens, bank, beta=self.beta, separation=self.separation)
        return tokens + self.weight * retrieved


class TuneAndPlayMemory(nn.Module):
    """Learned memory patterns retrieved by a projected Hopfield layer.

    Args:
        dim: token size d.
        num_heads: association heads.
        size: number of learned memory patterns M.
        attention, separation, attn_kwargs: the layer spec of the retrieving Hopfield layer (see
            ``hopformer.models.stanhop.build_hopfield``; default GSH, learned alpha-entmax).
        dropout: dropout on the association weights.
        weight: w, scale of the retrieved pattern added to the token.
        seed: seed of the data initialisation subset.
    """

    def __init__(self, dim: int, num_heads: int = 1, *, size: int = 32, attention: str = "hopfield",
                 separation="learnable", attn_kwargs: dict | None = None, dropout: float = 0.0, weight: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__()
        from .stanhop import build_hopfield

        positive_int("size (number of memory patterns)", size)
        self.dim, self.weight, self.seed = dim, weight, seed
        self.patterns = nn.Parameter(torch.empty(size, dim))
        nn.init.trunc_normal_(self.patterns, std=1.0)  # tokens are LayerNorm-ed: unit scale
        self.hopfield = build_hopfield(attention, dim, num_heads, separation=separation, dropout=dropout,
                                       attn_kwargs=attn_kwargs)
        self.collecting = False

    @torch.no_grad()
    def store(self, tokens: Tensor) -> None:
        """Initialise the learned patterns from a random subset of ``tokens`` ``(B, N, dim)``."""
        chosen = _subset(tokens, self.patterns.shape[0], self.seed)
        self.patterns[: chosen.shape[0]] = chosen

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"tokens: expected (batch, n, {self.dim}), got {tuple(tokens.shape)}")
        if self.collecting:
            self.store(tokens)
            return tokens
        stored = repeat(self.patterns, "m d -> b m d", b=tokens.shape[0])
        return tokens + self.weight * self.hopfield(tokens, stored)


def build_memory(kind: str, dim: int, num_heads: int, **kwargs) -> nn.Module:
    """``"plug"`` -> :class:`PlugAndPlayMemory`, ``"tune"`` -> :class:`TuneAndPlayMemory`."""
    if kind == "plug":
        return PlugAndPlayMemory(dim, **kwargs)
    if kind == "tune":
        return TuneAndPlayMemory(dim, num_heads, **kwargs)
    raise ValueError(f"memory={kind!r}: expected one of {MEMORY_KINDS} or None")
