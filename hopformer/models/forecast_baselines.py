"""Simple forecasting baselines run by the same code and splits as STanHop-Net.

- ``RepeatLast``: the naive forecast, every future step equals the last observed value.
- ``DLinear`` (Zeng et al., AAAI 2023, "Are Transformers Effective for Time Series Forecasting?"):
  moving-average trend + remainder, each mapped ``input_len -> horizon`` by a linear layer.

Both take ``x`` ``(batch, input_len, C)`` and return ``(batch, horizon, C)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

__all__ = ["RepeatLast", "DLinear"]


def _check_input(x: torch.Tensor, input_len: int, num_series: int | None) -> None:
    if x.dim() != 3 or x.shape[1] != input_len or (num_series is not None and x.shape[2] != num_series):
        raise ValueError(
            f"x: expected (batch, input_len={input_len}, num_series={num_series}), got {tuple(x.shape)}"
        )


class RepeatLast(nn.Module):
    """Naive forecast: ``y[t] = x[-1]`` for every future step.

    Args:
        input_len: rows of history (checked only).
        horizon: rows to forecast.
        num_series: number of series C (checked only; ``None`` accepts any).
    """

    def __init__(self, input_len: int, horizon: int, num_series: int | None = None) -> None:
        super().__init__()
        self.input_len, self.horizon, self.num_series = input_len, horizon, num_series

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.input_len, self.num_series)
        return repeat(x[:, -1], "b c -> b h c", h=self.horizon)


class DLinear(nn.Module):
    """DLinear: series decomposition by a moving average, then one linear map per component.

    Args:
        input_len: rows of history L.
        horizon: rows to forecast H.
        num_series: number of series C.
        kernel_size: moving-average window of the trend (paper: 25); edges replicate-padded.
        individual: one pair of linear maps per series (True) or shared across series (False).
    """

    def __init__(
        self, input_len: int, horizon: int, num_series: int, kernel_size: int = 25, individual: bool = False
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size}: expected a positive odd integer")
        self.input_len, self.horizon, self.num_series = input_len, horizon, num_series
        self.kernel_size, self.individual = kernel_size, individual
        n = num_series if individual else 1
        self.seasonal = nn.Parameter(torch.full((n, horizon, input_len), 1.0 / input_len))
        self.trend = nn.Parameter(torch.full((n, horizon, input_len), 1.0 / input_len))
        self.bias = nn.Parameter(torch.zeros(n, horizon, 2))

    def decompose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split ``(batch, C, L)`` into (remainder, moving-average trend)."""
        pad = (self.kernel_size - 1) // 2
        trend = F.avg_pool1d(F.pad(x, (pad, pad), mode="replicate"), self.kernel_size, stride=1)
        return x - trend, trend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.input_len, self.num_series)
        seasonal, trend = self.decompose(rearrange(x, "b l c -> b c l"))
        c = self.num_series
        w_s, w_t, bias = (p.expand(c, -1, -1) for p in (self.seasonal, self.trend, self.bias))
        out = torch.einsum("chl,bcl->bch", w_s, seasonal) + torch.einsum("chl,bcl->bch", w_t, trend)
        out = out + bias.sum(-1)
        return rearrange(out, "b c h -> b h c")
