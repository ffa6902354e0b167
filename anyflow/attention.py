"""Self-attention (with 3D RoPE) and cross-attention of the DiT blocks.

Both normalise q and k with an RMSNorm over the whole width D (all heads together) before
splitting heads. Attention is plain scaled dot-product attention, scale 1/sqrt(head_dim): over
all keys (the bidirectional model), over the keys each chunk of queries may see (block-causal
FAR streams, :mod:`anyflow.layout`), or over cached keys of earlier frames followed by the
stream's own (the FAR model's cached steps). No mask and no padding enter the softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layout import TokenPlan, Visibility
from .linear import Linear, computes_in_fp32
from .norms import RMSNorm
from .rope import apply_rope
from .sequence_parallel import TokenSplit, heads_to_tokens, tokens_to_heads

HEADS_PER_FP32_GROUP = 4
KeyValue = Tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class KeyValueSlot:
    """One block's preallocated self-attention keys (rotated) and values, (B, capacity, H, d) each.

    The first ``start`` tokens hold those of earlier frames. A forward writes its stream's keys
    and values in place at ``start .. start + L`` and attends over the first ``start + L`` tokens,
    so the earlier ones are never copied (:class:`anyflow.far.FarKVCache` holds one per block).
    """

    keys: torch.Tensor
    values: torch.Tensor
    start: int
    scratch: bool = False  # the stream's keys and values are a step's, not kept (overwritten by the next step)


def multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Optional[Visibility] = None,
    sequence: Optional[TokenSplit] = None,
) -> torch.Tensor:
    """q (B, Lq, H, d), k and v (B, Lk, H, d) -> (B, Lq, H*d).

    ``visible`` (see :mod:`anyflow.layout`) restricts each chunk of queries to its key spans: each
    chunk is attended on its own keys, so the cost is that of the keys it sees, and no L x L mask
    is built. ``None``: every query sees every key. With ``sequence`` the tokens are this rank's
    part of a stream split over ranks: heads are exchanged for tokens, all tokens attended for
    H/P heads, and exchanged back (:mod:`anyflow.sequence_parallel`).
    """
    if sequence is not None:
        if visible is not None:
            raise ValueError("sequence parallelism attends every token to every token (no block-causal streams)")
        q, k, v = heads_to_tokens(q, k, v, sequence)  # each (B, L, H/P, d)
        return tokens_to_heads(_attend_heads(q, k, v).unflatten(-1, (q.shape[2], -1)), sequence).flatten(2)
    if visible is None:
        return _attend_heads(q, k, v)
    outputs = []
    for (q_start, q_stop), spans in visible:
        if len(spans) == 1:
            (k_start, k_stop), = spans
            keys, values = k[:, k_start:k_stop], v[:, k_start:k_stop]
        else:
            keys = torch.cat([k[:, a:b] for a, b in spans], dim=1)
            values = torch.cat([v[:, a:b] for a, b in spans], dim=1)
        outputs.append(_attend_heads(q[:, q_start:q_stop], keys, values))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def _attend_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs on a CPU without native half units are attended in float32
    (see :mod:`anyflow.linear`), a few heads at a time so that the float32 copies stay small,
    each result rounded back once."""
    if not computes_in_fp32(q):
        return _attend(q, k, v)
    groups = zip(*(t.split(HEADS_PER_FP32_GROUP, dim=2) for t in (q, k, v)))
    return torch.cat([_attend(qg.float(), kg.float(), vg.float()).to(q.dtype) for qg, kg, vg in groups], dim=-1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)  # (B, Lq, heads*d)


class SelfAttention(nn.Module):
    """Self-attention over the video tokens, RoPE on q and k, as the :class:`TokenPlan` says."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(hidden_size, hidden_size)
        self.k = Linear(hidden_size, hidden_size)
        self.v = Linear(hidden_size, hidden_size)
        self.o = Linear(hidden_size, hidden_size)
        self.norm_q = RMSNorm(hidden_size, eps)
        self.norm_k = RMSNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, plan: TokenPlan, slot: Optional[KeyValueSlot] = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D).

        ``slot``: where this block's keys (rotated) and values are kept: the stream's are written
        into it after the ``slot.start`` cached ones of earlier frames, and attended after them.
        Rotating a key depends on its position only, so cached keys are kept rotated.
        """
        heads = (self.num_heads, -1)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(2, heads), plan.rope)  # (B, L, H, d)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(2, heads), plan.rope)
        v = self.v(x).unflatten(2, heads)
        if slot is not None and slot.scratch and torch.is_grad_enabled():
            # with autograd a step's keys are joined to a copy of the cached ones, not written into the
            # room: the next step's write there would change what this step saved for its backward
            k = torch.cat([slot.keys[:, :slot.start], k], dim=1)
            v = torch.cat([slot.values[:, :slot.start], v], dim=1)
        elif slot is not None:
            stop = slot.start + k.shape[1]
            slot.keys[:, slot.start:stop] = k  # in place: the earlier keys and values stay where they are
            slot.values[:, slot.start:stop] = v
            k, v = slot.keys[:, :stop], slot.values[:, :stop]  # views (B, start + L, H, d)
        return self.o(multi_head_attention(q, k, v, plan.visible, plan.sequence))


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
