"""Reversible instance normalisation (RevIN; Kim et al., ICLR 2022, "Reversible Instance
Normalization for Accurate Time-Series Forecasting against Distribution Shift"), eqs. (1)-(2).

Each input window is normalised per series by its own mean and standard deviation (optionally
followed by a learned per-series affine map); the forecast is mapped back with the same statistics.
This removes the level shift between the training and test periods that a model with learned
positions cannot extrapolate. Pure torch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RevIN"]


class RevIN(nn.Module):
    """``normalize(x)`` ``(B, L, C)`` keeps the window statistics; ``denormalize(y)`` ``(B, H, C)`` undoes them.

    Args:
        num_series: C, number of series (size of the affine parameters).
        affine: learn a per-series scale gamma and shift beta after normalising (RevIN eq. 1).
        eps: added to the variance before the square root (and to gamma when undoing the affine map).
    """

    def __init__(self, num_series: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_series, self.affine, self.eps = num_series, affine, eps
        if affine:
            self.weight = nn.Parameter(torch.ones(num_series))
            self.bias = nn.Parameter(torch.zeros(num_series))

    def normalize(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x`` ``(B, L, C)`` -> (normalised x, (mean, std) each ``(B, 1, C)``), RevIN eq. (1)."""
        if x.dim() != 3 or x.shape[-1] != self.num_series:
            raise ValueError(f"x: expected (batch, length, num_series={self.num_series}), got {tuple(x.shape)}")
        mean = x.mean(dim=1, keepdim=True).detach()
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps).detach()
        z = (x - mean) / std
        if self.affine:
            z = z * self.weight + self.bias
        return z, (mean, std)

    def denormalize(self, y: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
        """Forecast ``y`` ``(B, H, C)`` back to the input's scale, RevIN eq. (2)."""
        mean, std = stats
        if self.affine:
            y = (y - self.bias) / (self.weight + self.eps**2)
        return y * std + mean
