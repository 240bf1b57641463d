"""``HopfieldPooling`` (learned state patterns) and ``HopfieldLayer`` (learned stored patterns, a lookup).

The two forms of Ramsauer et al. 2020, section 3 ("Hopfield layers for deep learning"), as users know
them from ml-jku's ``hflayers``: pooling retrieves from the input with a fixed, learned query set;
the lookup layer retrieves from a learned memory with the input as queries.
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import Tensor, nn

from ..checks import positive_int
from .hopfield import Hopfield

__all__ = ["HopfieldPooling", "HopfieldLayer"]


class HopfieldPooling(nn.Module):
    """Pool a set of stored patterns into ``num_queries`` vectors with learned state (query) patterns.

    Args:
        dim: size of the stored patterns and of the output.
        num_heads: number of association heads.
        num_queries: number of learned query patterns (outputs per input set).
        init_std: standard deviation of the (truncated normal) query initialisation.
        **hopfield_kwargs: further :class:`Hopfield` arguments (``separation``, ``update_steps``, ...).
    """

    def __init__(self, dim: int, num_heads: int = 1, *, num_queries: int = 1, init_std: float = 0.02, **hopfield_kwargs):
        super().__init__()
        positive_int("num_queries", num_queries)
        self.queries = nn.Parameter(torch.empty(num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=init_std)
        self.hopfield = Hopfield(dim, num_heads, **hopfield_kwargs)

    def forward(
        self,
        stored: Tensor,
        values: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        return_association: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``stored`` ``(B, L, dim)`` -> pooled ``(B, num_queries, out_dim)`` (and the association)."""
        if stored.dim() != 3:
            raise ValueError(f"stored must have shape (batch, length, dim), got {tuple(stored.shape)}")
        state = repeat(self.queries, "q d -> b q d", b=stored.shape[0])
        return self.hopfield(state, stored, values, key_padding_mask=key_padding_mask,
                             return_association=return_association)

    def energy(self, stored: Tensor) -> Tensor:
        """Energy of the learned queries against ``stored``, ``(B, heads, num_queries)``."""
        return self.hopfield.energy(repeat(self.queries, "q d -> b q d", b=stored.shape[0]), stored)


class HopfieldLayer(nn.Module):
    """Look up the input in a learned memory of ``num_patterns`` stored patterns.

    Args:
        dim: size of the input (state) patterns and of the output.
        num_heads: number of association heads.
        num_patterns: number of learned stored patterns.
        init_std: standard deviation of the (truncated normal) memory initialisation.
        **hopfield_kwargs: further :class:`Hopfield` arguments.
    """

    def __init__(self, dim: int, num_heads: int = 1, *, num_patterns: int, init_std: float = 0.02, **hopfield_kwargs):
        super().__init__()
        positive_int("num_patterns", num_patterns)
        self.patterns = nn.Parameter(torch.empty(num_patterns, dim))
        nn.init.trunc_normal_(self.patterns, std=init_std)
        self.hopfield = Hopfield(dim, num_heads, **hopfield_kwargs)

    def forward(self, state: Tensor, *, return_association: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``state`` ``(B, L, dim)`` -> retrieved ``(B, L, out_dim)`` (and the association)."""
        if state.dim() != 3:
            raise ValueError(f"state must have shape (batch, length, dim), got {tuple(state.shape)}")
        stored = repeat(self.patterns, "m d -> b m d", b=state.shape[0])
        return self.hopfield(state, stored, return_association=return_association)

    def energy(self, state: Tensor) -> Tensor:
        """Energy of each input against the learned memory, ``(B, heads, L)``."""
        return self.hopfield.energy(state, repeat(self.patterns, "m d -> b m d", b=state.shape[0]))
