"""One DiT block (adaLN-modulated self-attention, cross-attention and feed-forward) and the output head.

With ``m = modulation (1, 6, D) + time_modulation (B, F, 6, D)`` in float32, split into
(shift1, scale1, gate1, shift2, scale2, gate2), each applying to every token of its frame
(frames may hold different numbers of tokens: see :class:`anyflow.model.attention.TokenPlan`):

    x = x + gate1 * SelfAttn(LN(x) * (1 + scale1) + shift1)
    x = x + CrossAttn(LN_affine(x), context)
    x = x + gate2 * FFN(LN(x) * (1 + scale2) + shift2)

Norms and the gated residual adds run in float32; the stream is stored in the model's dtype.
The head modulates with the time embedding instead: ``proj(LN(x) * (1 + scale) + shift)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention, KeyValue, KeyValueSlot, Segment, SelfAttention, TokenPlan
from .layers import LayerNormFP32, Linear, computes_in_fp32, layer_norm_fp32

CPU_TOKENS_PER_CHUNK = 4096


class FeedForward(nn.Module):
    """Linear(D -> ffn_dim), GELU (tanh), Linear(ffn_dim -> D).

    The map is per token, so it can run on ``tokens_per_chunk`` tokens at a time: that changes
    nothing but the size of the (tokens, ffn_dim) hidden activation, the largest tensor of a block.
    ``tokens_per_chunk`` None (the default) chunks on CPUs only, :data:`CPU_TOKENS_PER_CHUNK` tokens
    at a time (a quarter as many in half precision computed in float32, :mod:`anyflow.model.layers`,
    which holds the activation in both dtypes and in float32 copies at once); a GPU runs every
    token at once. Set it with ``set_ffn_chunking`` on the model.
    """

    def __init__(self, hidden_size: int, ffn_dim: int):
        super().__init__()
        self.fc_in = Linear(hidden_size, ffn_dim)
        self.fc_out = Linear(ffn_dim, hidden_size)
        self.tokens_per_chunk: Optional[int] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens_per_chunk
        if tokens is None:
            if x.device.type != "cpu":
                return self._map(x)
            # (the bias is in the compute dtype, float8 weights or not)
            tokens = CPU_TOKENS_PER_CHUNK // (4 if computes_in_fp32(self.fc_in.bias) else 1)
        outs = [self._map(chunk) for chunk in x.split(tokens, dim=1)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


def modulation_table(rows: int, hidden_size: int) -> nn.Parameter:
    """A (1, rows, D) adaLN table drawn from N(0, 1/D).

    On the meta device nothing is drawn: random ops there go through torch's Python reference
    kernels, whose first use imports the compiler stack (seconds), for values that are never read.
    """
    table = torch.empty(1, rows, hidden_size)
    if not table.is_meta:
        table.normal_(std=hidden_size**-0.5)
    return nn.Parameter(table)


def frame_by_frame(fn, tokens: Sequence[torch.Tensor], frame_values: Sequence[torch.Tensor],
                   segments: Sequence[Segment]) -> torch.Tensor:
    """``fn(*token_views, *value_slices)`` segment by segment, joined back into (B, L, D).

    Token tensors (B, L, D) are viewed (B, F_s, T_s, D) per segment of (frames, tokens per frame),
    per-frame values (B, F, 1, D) sliced to that segment's frames, so each frame's value applies
    to its own tokens. One segment (the bidirectional model) is a single call without a copy.
    """
    b, _, d = tokens[0].shape
    frame_counts = [frames for frames, _ in segments]
    token_counts = [frames * count for frames, count in segments]
    token_pieces = [t.split(token_counts, dim=1) for t in tokens]
    value_pieces = [v.split(frame_counts, dim=1) for v in frame_values]
    outputs = [
        fn(*(p[i].view(b, frames, count, d) for p in token_pieces), *(p[i] for p in value_pieces)).view(b, -1, d)
        for i, (frames, count) in enumerate(segments)
    ]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
             segments: Sequence[Segment]) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` per frame; x (B, L, D), shift and scale (B, F, 1, D) float32."""
    normed = layer_norm_fp32(x, eps)  # (B, L, D) float32
    return frame_by_frame(lambda n, sh, sc: torch.addcmul(sh, n, 1 + sc), [normed], [shift, scale], segments).to(x.dtype)


def gated_residual(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor,
                   segments: Sequence[Segment]) -> torch.Tensor:
    """``x + update * gate`` in float32 per frame; x and update (B, L, D), gate (B, F, 1, D)."""
    # one fused kernel per segment; it computes in float32 (the gate is float32) whatever the dtype of x
    return frame_by_frame(torch.addcmul, [x, update], [gate], segments).to(x.dtype)


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

    def context_kv(self, context: torch.Tensor) -> KeyValue:
        """This block's cross-attention keys and values of the embedded context (B, S, D)."""
        return self.cross_attn.context_kv(context)

    def forward(
        self,
        x: torch.Tensor,
        context: Union[torch.Tensor, KeyValue],
        time_modulation: torch.Tensor,
        plan: TokenPlan,
        slot: Optional[KeyValueSlot] = None,
    ) -> torch.Tensor:
        """x (B, L, D); context: the embedded context (B, S, D) or this block's keys and values of it
        (:meth:`context_kv`); time_modulation (B, F, 6, D), one row per frame of ``plan.segments``;
        ``slot``: where this block's self-attention keys and values are kept (cached ones of earlier
        frames first, the stream's written after them). Returns the new x (B, L, D).
        """
        # (not through self.context_kv: under FSDP that method gathers and frees this block's weights itself)
        context_kv = context if isinstance(context, tuple) else self.cross_attn.context_kv(context)
        m = (self.modulation.float() + time_modulation.float()).unsqueeze(3)  # (B, F, 6, 1, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = m.unbind(2)  # each (B, F, 1, D)
        segments = plan.segments

        x = gated_residual(x, self.self_attn(modulate(x, shift1, scale1, self.eps, segments), plan, slot), gate1,
                           segments)
        h = x if self.cross_attn_norm is None else self.cross_attn_norm(x)
        x = x + self.cross_attn(h, context_kv)
        return gated_residual(x, self.ffn(modulate(x, shift2, scale2, self.eps, segments)), gate2, segments)


class OutputHead(nn.Module):
    """Final adaLN (modulated by the time embedding) and the projection to patch pixels."""

    def __init__(self, hidden_size: int, out_channels: int, patch_size: Tuple[int, int, int], eps: float):
        super().__init__()
        self.eps = eps
        self.modulation = modulation_table(2, hidden_size)
        self.proj = Linear(hidden_size, out_channels * math.prod(patch_size))

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """x (B, L, D), time_embedding (B, F, D) one row per frame of ``segments`` -> (B, L, ph*pw*C_out)."""
        m = (self.modulation.float() + time_embedding.float().unsqueeze(2)).unsqueeze(3)  # (B, F, 2, 1, D)
        shift, scale = m.unbind(2)
        return self.proj(modulate(x, shift, scale, self.eps, segments))
