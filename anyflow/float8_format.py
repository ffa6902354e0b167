"""The scaled float8 format of linear weights: float8 e4m3 values with one float32 scale per output row.

A weight W (out, in) is held as Q = W / s rounded to the nearest float8 e4m3 value, with
s_i = max_j |W_ij| / 448 for each output row i (448 is e4m3's largest finite value, so every row
uses the format's whole range; an all-zero row gets s = 1), and W is taken as Q * s. That is one
byte per weight instead of bfloat16's two, and a relative error of at most 2^-4 per weight (three
mantissa bits; rows are scaled, so only weights far below their row's largest fall into e4m3's
subnormals).

The model's layers (:mod:`anyflow.fp8`) and the converter (:mod:`weights_convert.scaled_fp8`) both
use these two functions; this module imports nothing of the project.
"""

from __future__ import annotations

from typing import Tuple

import torch

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SMALLEST_SCALE = torch.finfo(torch.float32).tiny  # a scale stays a normal float32, so W / s is finite


def quantise(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """W (out, in), any float dtype -> (Q (out, in) float8_e4m3fn, scales (out,) float32), Q * scales ~ W.

    Per row: scale = max |W| / 448 (1 for an all-zero row), Q = W / scale in float32, clamped to
    +-448 and rounded to the nearest e4m3 value. Computed where ``weight`` is.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantise takes a floating point weight (out, in), got {weight.dtype} {tuple(weight.shape)}")
    rows = weight.float()  # (out, in); a copy unless weight is float32
    absmax = rows.abs().amax(dim=1)  # (out,)
    if not torch.isfinite(absmax).all():
        raise ValueError(f"cannot quantise a weight {tuple(weight.shape)} with NaN or infinite values")
    scale = torch.where(absmax > 0, absmax / FLOAT8_MAX, 1.0).clamp_min_(SMALLEST_SCALE)
    return (rows / scale[:, None]).clamp_(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8), scale


def dequantise(quantised: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q (out, in) float8 and scales (out,) -> Q * scales (out, in) in ``dtype`` (made in float32, rounded once)."""
    weight = quantised.to(torch.float32)
    return weight.mul_(scale[:, None]).to(dtype)
