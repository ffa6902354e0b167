"""Self-attention (with 3D RoPE) and cross-attention of the DiT blocks.

Both normalise q and k with an RMSNorm over the whole width D (all heads together) before
splitting heads. Attention is plain scaled dot-product attention, scale 1/sqrt(head_dim), no mask.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear, computes_in_fp32
from .norms import RMSNorm
from .rope import apply_rope


HEADS_PER_FP32_GROUP = 4


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, Lq, H, d), k and v (B, Lk, H, d) -> (B, Lq, H*d).

    Half-precision inputs on a CPU without native half units are attended in float32
    (see :mod:`anyflow.linear`), a few heads at a time so that the float32 copies stay small,
    each result rounded back once.
    """
    if not computes_in_fp32(q):
        return _attend(q, k, v)
    groups = zip(*(t.split(HEADS_PER_FP32_GROUP, dim=2) for t in (q, k, v)))
    return torch.cat([_attend(qg.float(), kg.float(), vg.float()).to(q.dtype) for qg, kg, vg in groups], dim=-1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)  # (B, Lq, heads*d)


class SelfAttention(nn.Module):
    """Bidirectional self-attention over all video tokens, RoPE on q and k."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(hidden_size, hidden_size)
        self.k = Linear(hidden_size, hidden_size)
        self.v = Linear(hidden_size, hidden_size)
        self.o = Linear(hidden_size, hidden_size)
        self.norm_q = RMSNorm(hidden_size, eps)
        self.norm_k = RMSNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), rope the (L, 1, d/2, 2) rotations of :func:`anyflow.rope.rope_rotations`."""
        heads = (self.num_heads, -1)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(2, heads), rope)  # (B, L, H, d)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(2, heads), rope)
        v = self.v(x).unflatten(2, heads)
        return self.o(multi_head_attention(q, k, v))


class CrossAttention(nn.Module):
    """Attention from video tokens to the context tokens (image tokens first, then text)."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(hidden_size, hidden_size)
        self.k = Linear(hidden_size, hidden_size)
        self.v = Linear(hidden_size, hidden_size)
        self.o = Linear(hidden_size, hidden_size)
        self.norm_q = RMSNorm(hidden_size, eps)
        self.norm_k = RMSNorm(hidden_size, eps)

    def context_kv(self, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the context (B, S, D), each (B, S, H, d).

        They depend on the context only, so a sampler can compute them once for all its steps.
        """
        heads = (self.num_heads, -1)
        return self.norm_k(self.k(context)).unflatten(2, heads), self.v(context).unflatten(2, heads)

    def forward(self, x: torch.Tensor, context_kv: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(2, (self.num_heads, -1))
        return self.o(multi_head_attention(q, *context_kv))
