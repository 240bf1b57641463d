"""STanHop-Net (Wu et al. 2024, ICLR, "STanHop: Sparse Tandem Hopfield Model for Memory-Enhanced
Time Series Prediction"), Crossformer-style (Zhang & Yan 2023).

Input ``x`` ``(batch, input_len, C)`` -> forecast ``(batch, horizon, C)``:

1. Patch embedding (paper sec. 4.1): each series is cut into ``seg_len`` patches (front-padded with
   its first value when ``input_len`` is not a multiple), ``Linear(seg_len -> d_model)`` + a learned
   position tensor ``(C, n_patches, d_model)`` + LayerNorm.
2. Encoder of scales (sec. 4.4): scale 1 is a STanHop block, each later scale first coarse-grains
   (merges ``win_size`` neighbouring patches: LayerNorm + ``Linear(win_size * d -> d)``) then applies a
   STanHop block.
3. STanHop block (sec. 4.2, Fig. 2), tokens ``(B, C, S, d)``:
   - optional external memory (sec. 4.3, :mod:`hopformer.models.stanhop_memory`) on its input;
   - TimeGSH: self-association of the S patches of each series, residual + LN + MLP + LN;
   - SeriesGSH: ``num_router`` learned, initialised router patterns R_s **per patch position s**
     (Crossformer's two-stage attention keeps one router set per segment, ``(seg_num, factor, d)``)
     associate with the C series tokens of that position (``B_s = GSH(R_s, Z_s)``), then the series
     tokens associate with that buffer (``Z'_s = GSH(Z_s, B_s)``), residual + LN + MLP + LN.
4. Decoder: learned position queries ``(C, n_out_patches, d)``; decoder layer i applies a STanHop
   block, cross-associates with encoder output i (embedding, then each scale), residual + LN + MLP +
   LN, and ``Linear(d -> seg_len)`` predicts the patches; the per-scale predictions are summed.
5. Optional reversible instance normalisation (:class:`hopformer.models.revin.RevIN`) around all of it.

Every association is a Hopfield layer built by :func:`build_hopfield` from the layer spec shared with the
vision models (``attention``, ``separation``, ``attn_kwargs``; :mod:`hopformer.layers.registry`), by default
the generalized sparse Hopfield layer (alpha-entmax, eq. 3.3) with one learnable alpha per layer
(``attn_kwargs={"alpha_per_head": True}`` for one per head). Pure torch.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from ..checks import positive_int
from ..layers.registry import check_spec, hopfield_layer
from .revin import RevIN
from .stanhop_memory import PlugAndPlayMemory, TuneAndPlayMemory, build_memory

__all__ = ["build_hopfield", "PatchEmbedding", "CoarseGrain", "STanHopBlock",
           "STanHopDecoderLayer", "STanHopNet"]

def build_hopfield(attention: str, dim: int, num_heads: int, *, separation: Any = "learnable", dropout: float = 0.0,
                   attn_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """One association of STanHop-Net: a :class:`~hopformer.layers.Hopfield` for the layer spec
    (:mod:`hopformer.layers.registry`; default the generalized sparse Hopfield layer GSH, alpha-entmax with a
    learned alpha, eq. 3.3).

    Args:
        attention: ``"hopfield"``, ``"kernelized"`` (U-Hop feature map) or ``"continuous"`` (continuous memory).
        dim: pattern size (state = stored = d_model).
        num_heads: association heads.
        separation: ``"learnable"`` (GSH), ``"softmax"``, ``"sparsemax"``, ``"entmax15"`` or a float alpha.
        dropout: dropout on the association weights.
        attn_kwargs: further layer options (e.g. ``alpha``, ``alpha_per_head``, ``kernel_dim``, ``num_basis``).
    """
    return hopfield_layer(dim, num_heads, attention, separation, attn_kwargs, dropout=dropout)


def _mlp(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class PatchEmbedding(nn.Module):
    """Per-series patch embedding with learned positions (paper sec. 4.1).

    Args:
        num_series: C.
        input_len: rows of history; front-padded (first value repeated) to a multiple of ``seg_len``.
        seg_len: patch length P.
        d_model: embedding size.
    """

    def __init__(self, num_series: int, input_len: int, seg_len: int, d_model: int) -> None:
        super().__init__()
        self.seg_len, self.num_patches = seg_len, math.ceil(input_len / seg_len)
        self.pad = self.num_patches * seg_len - input_len
        self.linear = nn.Linear(seg_len, d_model)
        self.position = nn.Parameter(torch.empty(num_series, self.num_patches, d_model))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, C)`` -> tokens ``(B, C, n_patches, d_model)``."""
        x = rearrange(x, "b l c -> b c l")
        if self.pad:
            x = torch.cat([repeat(x[..., :1], "b c 1 -> b c p", p=self.pad), x], dim=-1)
        patches = rearrange(x, "b c (s p) -> b c s p", p=self.seg_len)
        return self.norm(self.linear(patches) + self.position)


class CoarseGrain(nn.Module):
    """Merge ``win_size`` neighbouring patches: LayerNorm + ``Linear(win_size * d -> d)`` (paper sec. 4.4).

    A patch count that is not a multiple of ``win_size`` is end-padded by repeating the last patch
    (Crossformer repeats the last ``pad`` patches, which fails when there are fewer than ``pad``).
    """

    def __init__(self, d_model: int, win_size: int) -> None:
        super().__init__()
        self.win_size = win_size
        self.norm = nn.LayerNorm(win_size * d_model)
        self.linear = nn.Linear(win_size * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, S, d)`` -> ``(B, C, ceil(S / win_size), d)``."""
        pad = -x.shape[2] % self.win_size
        if pad:
            x = torch.cat([x, repeat(x[:, :, -1], "b c d -> b c p d", p=pad)], dim=2)
        merged = rearrange(x, "b c (s w) d -> b c s (w d)", w=self.win_size)
        return self.linear(self.norm(merged))


class STanHopBlock(nn.Module):
    """One STanHop block: optional memory, TimeGSH, then SeriesGSH through learned router patterns.

    Args:
        d_model: token size d.
        num_heads: association heads.
        d_ff: hidden size of the MLPs.
        num_router: number of learned router patterns in the cross-series stage (Crossformer's ``factor``).
        dropout: dropout on residual branches and association weights.
        attention, separation, attn_kwargs: the layer spec of the three associations (see :func:`build_hopfield`).
        num_segments: patch positions S of the tokens this block sees: one router set per position,
            ``(S, num_router, d)`` as Crossformer; ``None`` shares one ``(num_router, d)`` set across
            positions (the earlier variant, which cannot tell positions apart in the cross-series stage).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        num_router: int = 10,
        dropout: float = 0.0,
        attention: str = "hopfield",
        separation: Any = "learnable",
        attn_kwargs: Mapping[str, Any] | None = None,
        num_segments: int | None = None,
    ) -> None:
        super().__init__()
        if num_segments is not None:
            positive_int("num_segments", num_segments)
        spec = dict(separation=separation, dropout=dropout, attn_kwargs=attn_kwargs)
        self.num_segments = num_segments
        self.time_hopfield = build_hopfield(attention, d_model, num_heads, **spec)
        shape = (num_router, d_model) if num_segments is None else (num_segments, num_router, d_model)
        self.router = nn.Parameter(torch.empty(shape))
        nn.init.trunc_normal_(self.router, std=0.02)  # initialised (the public code left torch.empty)
        self.series_sender = build_hopfield(attention, d_model, num_heads, **spec)
        self.series_receiver = build_hopfield(attention, d_model, num_heads, **spec)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(4))
        self.time_mlp, self.series_mlp = _mlp(d_model, d_ff, dropout), _mlp(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)
        self.memory: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, S, d)`` -> ``(B, C, S, d)``."""
        batch, num_series = x.shape[0], x.shape[1]
        if self.num_segments is not None and x.shape[2] != self.num_segments:
            raise ValueError(f"x: expected {self.num_segments} patch positions (num_segments), got shape {tuple(x.shape)}")
        if self.memory is not None:
            tokens = self.memory(rearrange(x, "b c s d -> b (c s) d"))
            x = rearrange(tokens, "b (c s) d -> b c s d", c=num_series)
        # TimeGSH: each series' patches associate with each other
        z = rearrange(x, "b c s d -> (b c) s d")
        z = self.norms[0](z + self.dropout(self.time_hopfield(z)))
        z = self.norms[1](z + self.dropout(self.time_mlp(z)))
        # SeriesGSH: router patterns gather from the series, series read back from the router buffer
        z = rearrange(z, "(b c) s d -> (b s) c d", b=batch)
        if self.num_segments is None:
            router = repeat(self.router, "r d -> n r d", n=z.shape[0])
        else:  # (b s) ordering: batch-major, position-minor
            router = repeat(self.router, "s r d -> (b s) r d", b=batch)
        buffer = self.series_sender(router, z)
        z = self.norms[2](z + self.dropout(self.series_receiver(z, buffer)))
        z = self.norms[3](z + self.dropout(self.series_mlp(z)))
        return rearrange(z, "(b s) c d -> b c s d", b=batch)


class STanHopDecoderLayer(nn.Module):
    """Decoder layer: STanHop block on the queries, cross-association with one encoder scale, patch readout.

    Args:
        seg_len: patch length predicted per output token.
        d_model, num_heads, d_ff, num_router, dropout, attention, separation, attn_kwargs, num_segments: as
            :class:`STanHopBlock` (``num_segments``: the output patches).
    """

    def __init__(self, seg_len: int, d_model: int, num_heads: int, d_ff: int, num_router: int = 10,
                 dropout: float = 0.0, attention: str = "hopfield", separation: Any = "learnable",
                 attn_kwargs: Mapping[str, Any] | None = None, num_segments: int | None = None) -> None:
        super().__init__()
        self.block = STanHopBlock(d_model, num_heads, d_ff, num_router, dropout, attention, separation, attn_kwargs,
                                  num_segments)
        self.cross_hopfield = build_hopfield(attention, d_model, num_heads, separation=separation, dropout=dropout,
                                             attn_kwargs=attn_kwargs)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.mlp = _mlp(d_model, d_model, dropout)
        self.dropout = nn.Dropout(dropout)
        self.predict = nn.Linear(d_model, seg_len)

    def forward(self, x: Tensor, cross: Tensor) -> tuple[Tensor, Tensor]:
        """Queries ``(B, C, S_out, d)``, encoder scale ``(B, C, S_in, d)`` -> (next queries, patches ``(B, C, S_out, seg_len)``)."""
        batch = x.shape[0]
        x = rearrange(self.block(x), "b c s d -> (b c) s d")
        cross = rearrange(cross, "b c s d -> (b c) s d")
        x = self.norm1(x + self.dropout(self.cross_hopfield(x, cross)))
        x = self.norm2(x + self.dropout(self.mlp(x)))
        x = rearrange(x, "(b c) s d -> b c s d", b=batch)
        return x, self.predict(x)


class STanHopNet(nn.Module):
    """STanHop-Net for multivariate forecasting, ``(B, input_len, C) -> (B, horizon, C)``.

    Args:
        num_series: C, the number of input series.
        input_len: rows of history (any length; front-padded to a multiple of ``seg_len``).
        horizon: rows to forecast (any length; the last patch is cut).
        seg_len: patch length P (paper Table 7: 12).
        win_size: patches merged per coarse-graining step (paper Table 7: 2).
        num_layers: encoder scales (paper: 1 for horizons 96/192, 2 for 336/720); the decoder has one more.
        d_model: token size (paper: 256).
        num_heads: association heads.
        d_ff: hidden size of the block MLPs.
        num_router: learned router patterns of the cross-series stage.
        dropout: dropout rate.
        attention: every association's layer kind (:mod:`hopformer.layers.registry`): ``"hopfield"`` (default),
            ``"kernelized"`` (U-Hop feature map) or ``"continuous"`` (continuous-time memory).
        separation: ``"learnable"`` (default: GSH, alpha-entmax with learned alpha, eq. 3.3), ``"softmax"``,
            ``"sparsemax"``, ``"entmax15"`` or a float alpha in [1, 2].
        attn_kwargs: further layer options (e.g. ``{"alpha": 1.5, "alpha_per_head": True}``, ``kernel_dim``,
            ``num_basis``). Before issue 10 these were ``hopfield`` ("generalized", "dense", "sparse",
            "kernelized", "continuous") and ``hopfield_kwargs`` (``learnable_alpha``): see docs/ARCHITECTURE.md.
        memory: external memory attached to every encoder block: None, "plug" (Plug-and-Play) or
            "tune" (Tune-and-Play); see :meth:`attach_memory`.
        memory_kwargs: arguments of the memory modules (e.g. ``{"size": 256}``).
        router_per_segment: one router set per patch position in every cross-series stage (Crossformer;
            default). False shares one set across positions (the earlier variant, kept for ablation).
        revin: reversible instance normalisation of each input window (RevIN, Kim et al. 2022): the
            window's per-series mean and std are removed before the network and restored on the forecast.
        revin_affine: learn RevIN's per-series affine map (eq. 1 of that paper).
    """

    def __init__(
        self,
        num_series: int,
        input_len: int,
        horizon: int,
        seg_len: int = 12,
        win_size: int = 2,
        num_layers: int = 1,
        d_model: int = 256,
        num_heads: int = 4,
        d_ff: int = 512,
        num_router: int = 10,
        dropout: float = 0.2,
        attention: str = "hopfield",
        separation: Any = "learnable",
        attn_kwargs: Mapping[str, Any] | None = None,
        memory: str | None = None,
        memory_kwargs: dict | None = None,
        router_per_segment: bool = True,
        revin: bool = False,
        revin_affine: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("num_series", num_series), ("input_len", input_len), ("horizon", horizon),
                            ("seg_len", seg_len), ("win_size", win_size), ("num_layers", num_layers),
                            ("d_model", d_model), ("num_heads", num_heads), ("d_ff", d_ff), ("num_router", num_router)):
            positive_int(name, value)
        check_spec(attention, separation, attn_kwargs)
        if seg_len > input_len:
            raise ValueError(f"seg_len={seg_len} is longer than input_len={input_len}")
        self.num_series, self.input_len, self.horizon, self.seg_len = num_series, input_len, horizon, seg_len
        self.d_model, self.num_heads = d_model, num_heads
        blocks = dict(d_model=d_model, num_heads=num_heads, d_ff=d_ff, num_router=num_router, dropout=dropout,
                      attention=attention, separation=separation, attn_kwargs=attn_kwargs)
        self.revin = RevIN(num_series, affine=revin_affine) if revin else None
        self.embedding = PatchEmbedding(num_series, input_len, seg_len, d_model)
        self.coarse = nn.ModuleList(
            nn.Identity() if i == 0 or win_size == 1 else CoarseGrain(d_model, win_size) for i in range(num_layers)
        )
        positions = [self.embedding.num_patches]  # patch positions at each encoder scale
        for i in range(1, num_layers):
            positions.append(positions[-1] if win_size == 1 else math.ceil(positions[-1] / win_size))
        self.encoder = nn.ModuleList(
            STanHopBlock(**blocks, num_segments=s if router_per_segment else None) for s in positions
        )
        self.out_patches = math.ceil(horizon / seg_len)
        self.decoder_position = nn.Parameter(torch.empty(num_series, self.out_patches, d_model))
        nn.init.trunc_normal_(self.decoder_position, std=0.02)
        out = self.out_patches if router_per_segment else None
        self.decoder = nn.ModuleList(
            STanHopDecoderLayer(seg_len, **blocks, num_segments=out) for _ in range(num_layers + 1)
        )
        self.memory_kind: str | None = None
        if memory is not None:
            self.attach_memory(memory, **(memory_kwargs or {}))

    # ------------------------------------------------------------------ memory plugins
    def attach_memory(self, kind: str, **kwargs) -> None:
        """Attach a Plug-and-Play ("plug") or Tune-and-Play ("tune") memory to every encoder block.

        Plug-and-Play memories hold no parameters and must be filled with :meth:`fill_memory`
        before use; Tune-and-Play memories are learned patterns trained with the task loss.
        """
        for block in self.encoder:
            block.memory = build_memory(kind, self.d_model, self.num_heads, **kwargs)
        self.memory_kind = kind

    def detach_memory(self) -> None:
        """Remove every memory plugin (the network is then the plain STanHop-Net)."""
        for block in self.encoder:
            block.memory = None
        self.memory_kind = None

    @torch.no_grad()
    def fill_memory(self, windows: Tensor) -> None:
        """Store the encoder-block inputs of ``windows`` ``(N, input_len, C)`` in the memory plugins.

        Blocks are filled in order, so block i stores inputs computed with blocks ``< i`` already
        retrieving. Plug-and-Play memories keep a random subset of these tokens (their ``size``);
        Tune-and-Play memories use them to initialise their learned patterns.
        """
        self._check(windows)
        if self.revin is not None:
            windows, _ = self.revin.normalize(windows)
        was_training = self.training
        self.eval()
        for i, block in enumerate(self.encoder):
            if block.memory is None:
                continue
            block.memory.collecting = True
            self.encode(windows, num_scales=i + 1)
            block.memory.collecting = False
        self.train(was_training)

    # ------------------------------------------------------------------ forward
    def _check(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.input_len or x.shape[2] != self.num_series:
            raise ValueError(
                f"x: expected (batch, input_len={self.input_len}, num_series={self.num_series}), got {tuple(x.shape)}"
            )

    def encode(self, x: Tensor, num_scales: int | None = None) -> list[Tensor]:
        """Embedding and the first ``num_scales`` (default all) encoder scales, ``[(B, C, S_0, d), (B, C, S_1, d), ...]``."""
        z = self.embedding(x)
        scales = [z]
        for coarse, block in list(zip(self.coarse, self.encoder))[:num_scales]:
            z = block(coarse(z))
            scales.append(z)
        return scales

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(B, input_len, C)`` -> forecast ``(B, horizon, C)``."""
        self._check(x)
        stats = None
        if self.revin is not None:
            x, stats = self.revin.normalize(x)
        scales = self.encode(x)
        queries = repeat(self.decoder_position, "c s d -> b c s d", b=x.shape[0])
        prediction = 0.0
        for layer, cross in zip(self.decoder, scales):
            queries, patches = layer(queries, cross)
            prediction = prediction + patches
        forecast = rearrange(prediction, "b c s p -> b (s p) c")[:, : self.horizon]
        if stats is not None:
            forecast = self.revin.denormalize(forecast, stats)
        return forecast.contiguous()
