"""Normalisations whose statistics are always computed in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def layer_norm_fp32(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm over the last axis in float32; returns float32 (callers cast when they need to)."""
    return F.layer_norm(
        x.float(),
        x.shape[-1:],
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )


class LayerNormFP32(nn.Module):
    """Affine LayerNorm computed in float32, output in the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_fp32(x, self.eps, self.weight, self.bias).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale; the mean square is taken in float32.

    The normalised value is rounded to the weight's dtype before the scale is applied, as in
    the released checkpoints' reference code.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(self.weight.dtype) * self.weight

