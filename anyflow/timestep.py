"""The dual-timestep embedding: what makes the Wan2.1 DiT a flow map.

Both the source timestep t and a second timestep (the target r, or the interval t - r) are
embedded per latent frame and mixed with a fixed gate g:

    rt  = (1 - g) * MLP_source(sinusoid(t)) + g * MLP_target(sinusoid(delta))
    mod = Linear(SiLU(rt))            # the six adaLN vectors of every block, (B, F, 6, D)
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


def timestep_sinusoid(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps in [0, 1000] -> (N, dim) float32 embedding ``[cos(a), sin(a)]``.

    ``a_k = t * exp(-ln(max_period) * k / (dim/2))`` for k = 0 .. dim/2 - 1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None, :]  # (N, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def gate_weights(gate_value: float, dtype: torch.dtype) -> Tuple[float, float]:
    """(g, 1 - g) with g rounded to ``dtype`` and 1 - g computed and rounded in ``dtype``, as Python floats."""
    gate = torch.tensor(gate_value, dtype=dtype, device="cpu")
    return gate.item(), (1 - gate).item()


class TimestepMLP(nn.Module):
    """Linear(freq_dim -> D), SiLU, Linear(D -> D) applied to a timestep sinusoid."""

    def __init__(self, freq_dim: int, hidden_size: int):
        super().__init__()
        self.fc_in = Linear(freq_dim, hidden_size)
        self.fc_out = Linear(hidden_size, hidden_size)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        sinusoid = sinusoid.to(self.fc_in.weight.dtype)
        return self.fc_out(F.silu(self.fc_in(sinusoid)))


class DualTimestepEmbedding(nn.Module):
    """Per-frame conditioning on the source timestep t and the target timestep r.

    ``deltatime_type`` "r" feeds r itself to the target-time MLP, "t-r" feeds the interval.
    Returns the mixed embedding ``rt`` (B, F, D), used by the output head, and the block
    modulation ``mod`` (B, F, 6, D), both in ``dtype``.
    """

    def __init__(self, freq_dim: int, hidden_size: int, gate_value: float, deltatime_type: str):
        super().__init__()
        self.freq_dim = freq_dim
        self.gate_value = gate_value
        self.deltatime_type = deltatime_type
        self.source_time_mlp = TimestepMLP(freq_dim, hidden_size)
        self.target_time_mlp = TimestepMLP(freq_dim, hidden_size)
        self.modulation_proj = Linear(hidden_size, 6 * hidden_size)
        # (g, 1 - g) for each dtype the model can be held in, made once here (not traced under torch.compile)
        self.gates = {dtype: gate_weights(gate_value, dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)}

    def forward(
        self, timestep: torch.Tensor, r_timestep: torch.Tensor, dtype: torch.dtype
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """t and r (B, F) -> ``rt`` (B, F, D) and ``mod`` (B, F, 6, D)."""
        delta = r_timestep if self.deltatime_type == "r" else timestep - r_timestep
        return self.embed(timestep, delta, dtype)

    def embed(self, timestep: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """The same from t and the value the target-time MLP embeds (r or t - r) directly."""
        batch, frames = timestep.shape
        source = self.source_time_mlp(timestep_sinusoid(timestep.reshape(-1), self.freq_dim)).to(dtype)
        target = self.target_time_mlp(timestep_sinusoid(delta.reshape(-1), self.freq_dim)).to(dtype)
        # The gate is a constant rounded to the target MLP's dtype (as in the released code), and so is 1 - gate;
        # given as Python numbers, they reach the kernels as scalars: no tensor is copied to the device
        gate, keep = self.gates[self.target_time_mlp.fc_in.weight.dtype]
        rt = keep * source + gate * target  # (B*F, D)
        mod = self.modulation_proj(F.silu(rt))  # (B*F, 6D)
        return rt.view(batch, frames, -1), mod.view(batch, frames, 6, -1)
