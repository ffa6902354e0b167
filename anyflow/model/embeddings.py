"""What enters the blocks: video patches as tokens, the dual-timestep conditioning, the context; and the way back.

- :class:`PatchEmbed`: latents (B, F, C, H, W) -> tokens (B, L, D) in (frame, row, column) order,
  a Conv3d whose kernel equals its stride applied as one matmul over gathered patches;
  :func:`unpatchify` is its inverse for the head's outputs.
- :class:`DualTimestepEmbedding`: what makes the Wan2.1 DiT a flow map. Both the source timestep t
  and a second timestep (the target r, or the interval t - r) are embedded per latent frame and
  mixed with a fixed gate g::

      time_embedding  = (1 - g) * MLP_source(sinusoid(t)) + g * MLP_target(sinusoid(delta))   # the authors' rt
      time_modulation = Linear(SiLU(time_embedding))    # the six adaLN vectors of every block, the authors' mod

- :class:`TextProjection` and :class:`ImageProjection`: the conditioning context (UMT5 text,
  optional image tokens) to the model width.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import LayerNormFP32, Linear, linear


class PatchEmbed(nn.Module):
    """(B, F, C, H, W) latents -> (B, L, D) tokens in (frame, row, column) order.

    The weight keeps the Conv3d shape (D, C, pt, ph, pw) of the checkpoints. The temporal patch
    ``pt`` must be 1 (enforced by the config), so L = F * (H / ph) * (W / pw).
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: Tuple[int, int, int]):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        _, ph, pw = self.patch_size
        patches = rearrange(latents, "b f c (h ph) (w pw) -> b (f h w) (c ph pw)", ph=ph, pw=pw)
        weight = self.proj.weight.flatten(1)  # (D, C*pt*ph*pw), pt = 1
        return linear(patches, weight, self.proj.bias)


def unpatchify(tokens: torch.Tensor, grid: Tuple[int, int, int], patch_size: Tuple[int, int, int]) -> torch.Tensor:
    """(B, L, ph*pw*C) head outputs -> (B, F, C, H, W) latents.

    Each token's vector is laid out (ph, pw, C); ``grid`` is the patch grid (F, H/ph, W/pw).
    """
    f, h, w = grid
    _, ph, pw = patch_size
    return rearrange(tokens, "b (f h w) (ph pw c) -> b f c (h ph) (w pw)", f=f, h=h, w=w, ph=ph, pw=pw)


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
    Returns the mixed embedding (B, F, D), used by the output head, and the block modulation
    (B, F, 6, D), both in ``dtype``.
    """

    def __init__(self, freq_dim: int, hidden_size: int, gate_value: float, deltatime_type: str):
        super().__init__()
        self.freq_dim = freq_dim
        self.gate_value = gate_value
        self.deltatime_type = deltatime_type
        self.source_time_mlp = TimestepMLP(freq_dim, hidden_size)
        self.target_time_mlp = TimestepMLP(freq_dim, hidden_size)
        self.modulation_proj = Linear(hidden_size, 6 * hidden_size)
        # (g, 1 - g) for each dtype the model can be held in, rounded once here rather than at every call
        self.gates = {dtype: gate_weights(gate_value, dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)}

    def forward(
        self, timestep: torch.Tensor, r_timestep: torch.Tensor, dtype: torch.dtype
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """t and r (B, F) -> the time embedding (B, F, D) and the time modulation (B, F, 6, D)."""
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
        embedding = keep * source + gate * target  # (B*F, D)
        modulation = self.modulation_proj(F.silu(embedding))  # (B*F, 6D)
        return embedding.view(batch, frames, -1), modulation.view(batch, frames, 6, -1)


class TextProjection(nn.Module):
    """UMT5 embeddings (B, S, text_dim) -> (B, S, D): Linear, GELU (tanh), Linear."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.fc_in = Linear(text_dim, hidden_size)
        self.fc_out = Linear(hidden_size, hidden_size)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(text), approximate="tanh"))


class ImageProjection(nn.Module):
    """Image tokens (B, S_img, image_dim) -> (B, S_img, D).

    LayerNorm, Linear(image_dim -> image_dim), GELU (exact), Linear(image_dim -> D), LayerNorm;
    both norms are affine with eps 1e-5 and computed in float32.
    """

    def __init__(self, image_dim: int, hidden_size: int):
        super().__init__()
        self.norm_in = LayerNormFP32(image_dim, eps=1e-5)
        self.fc_in = Linear(image_dim, image_dim)
        self.fc_out = Linear(image_dim, hidden_size)
        self.norm_out = LayerNormFP32(hidden_size, eps=1e-5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.fc_out(F.gelu(self.fc_in(self.norm_in(image)))))
