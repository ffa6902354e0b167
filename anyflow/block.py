"""One DiT block: adaLN-modulated self-attention, cross-attention and feed-forward.

With ``m = modulation (1, 6, D) + mod (B, F, 6, D)`` in float32, split into
(shift1, scale1, gate1, shift2, scale2, gate2), each applying to every token of its frame:

    x = x + gate1 * SelfAttn(LN(x) * (1 + scale1) + shift1)
    x = x + CrossAttn(LN_affine(x), context)
    x = x + gate2 * FFN(LN(x) * (1 + scale2) + shift2)

Norms and the gated residual adds run in float32; the stream is stored in the model's dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention, SelfAttention
from .linear import Linear, computes_in_fp32
from .norms import LayerNormFP32, layer_norm_fp32


class FeedForward(nn.Module):
    """Linear(D -> ffn_dim), GELU (tanh), Linear(ffn_dim -> D).

    Applied to ``tokens_per_chunk`` tokens at a time: the map is per token, so chunking changes
    nothing but the size of the (tokens, ffn_dim) hidden activation, the largest tensor of a block.
    Half precision computed in float32 (:mod:`anyflow.linear`) holds that activation in both
    dtypes and in float32 copies at once, so it takes a quarter as many tokens at a time.
    """

    tokens_per_chunk = 4096

    def __init__(self, hidden_size: int, ffn_dim: int):
        super().__init__()
        self.fc_in = Linear(hidden_size, ffn_dim)
        self.fc_out = Linear(ffn_dim, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens_per_chunk // (4 if computes_in_fp32(self.fc_in.weight) else 1)
        chunks = x.split(tokens, dim=1)
        outs = [self.fc_out(F.gelu(self.fc_in(chunk), approximate="tanh")) for chunk in chunks]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def modulation_table(rows: int, hidden_size: int) -> nn.Parameter:
    """A (1, rows, D) adaLN table drawn from N(0, 1/D).

    On the meta device nothing is drawn: random ops there go through torch's Python reference
    kernels, whose first use imports the compiler stack (seconds), for values that are never read.
    """
    table = torch.empty(1, rows, hidden_size)
    if not table.is_meta:
        table.normal_(std=hidden_size**-0.5)
    return nn.Parameter(table)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` per frame; x (B, L, D), shift and scale (B, F, 1, D) float32."""
    b, length, d = x.shape
    frames = shift.shape[1]
    normed = layer_norm_fp32(x, eps).view(b, frames, length // frames, d)  # (B, F, T, D)
    return torch.addcmul(shift, normed, 1 + scale).view(b, length, d).to(x.dtype)


def gated_residual(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + update * gate`` in float32 per frame; x and update (B, L, D), gate (B, F, 1, D)."""
    b, length, d = x.shape
    frames = gate.shape[1]
    # one fused kernel; it computes in float32 (the gate is float32) whatever the dtype of x
    out = torch.addcmul(x.view(b, frames, -1, d), update.view(b, frames, -1, d), gate)
    return out.view(b, length, d).to(x.dtype)


class DiTBlock(nn.Module):
    """A Wan2.1 DiT block conditioned per latent frame by the dual-timestep modulation."""

    def __init__(self, hidden_size: int, num_heads: int, ffn_dim: int, cross_attn_norm: bool, eps: float):
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttention(hidden_size, num_heads, eps)
        self.cross_attn_norm: Optional[LayerNormFP32] = LayerNormFP32(hidden_size, eps) if cross_attn_norm else None
        self.cross_attn = CrossAttention(hidden_size, num_heads, eps)
        self.ffn = FeedForward(hidden_size, ffn_dim)
        self.modulation = modulation_table(6, hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        context_kv: Tuple[torch.Tensor, torch.Tensor],
        mod: torch.Tensor,
        rope: torch.Tensor,
    ) -> torch.Tensor:
        """x (B, L, D); context_kv from ``cross_attn.context_kv``; mod (B, F, 6, D); rope from ``rope_rotations``."""
        m = (self.modulation.float() + mod.float()).unsqueeze(3)  # (B, F, 6, 1, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = m.unbind(2)  # each (B, F, 1, D)

        x = gated_residual(x, self.self_attn(modulate(x, shift1, scale1, self.eps), rope), gate1)
        h = x if self.cross_attn_norm is None else self.cross_attn_norm(x)
        x = x + self.cross_attn(h, context_kv)
        return gated_residual(x, self.ffn(modulate(x, shift2, scale2, self.eps)), gate2)
