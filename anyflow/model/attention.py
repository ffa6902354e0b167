"""Self-attention (with 3D RoPE) and cross-attention of the DiT blocks, and the token plan they follow.

Both normalise q and k with an RMSNorm over the whole width D (all heads together) before
splitting heads. Attention is plain scaled dot-product attention, scale 1/sqrt(head_dim): over
all keys (the bidirectional model), over the keys each chunk of queries may see (block-causal FAR
streams), or over cached keys of earlier frames followed by the stream's own (the FAR model's
cached steps). No mask and no padding enter the softmax.

A :class:`TokenPlan` describes one forward's token stream as data:

- ``segments``: (frames, tokens per frame) runs in stream order. The bidirectional model's stream
  is one segment, F frames of (H/ph)*(W/pw) tokens; a FAR stream joins segments whose frames hold
  different numbers of tokens (compressed older frames, then full-resolution ones). The per-frame
  modulation of a frame applies to its tokens.
- ``rope``: the rotations of the stream's tokens (:func:`anyflow.model.rope.rope_rotations`).
- ``visible``: for each chunk of queries (a token range), the key ranges it attends to, over the
  keys ``[past | stream]`` (``past``: keys of earlier frames held in a cache); None: every query
  attends to every key. Each chunk is attended on its own keys, so no L x L mask is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from .layers import Linear, RMSNorm, attend, rotate_pairs

Segment = Tuple[int, int]  # (frames, tokens per frame)
Span = Tuple[int, int]  # [start, stop) in tokens
Visibility = Tuple[Tuple[Span, Tuple[Span, ...]], ...]  # (query span, key spans) per chunk of queries
KeyValue = Tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TokenPlan:
    """One forward pass's token stream: its frame segments, RoPE rotations (L, 1, head_dim/2, 2) and
    attention pattern (see the module docstring)."""

    segments: Tuple[Segment, ...]
    rope: torch.Tensor
    visible: Optional[Visibility] = None

    @property
    def num_tokens(self) -> int:
        return sum(frames * tokens for frames, tokens in self.segments)

    @property
    def num_frames(self) -> int:
        return sum(frames for frames, _ in self.segments)


@dataclass(frozen=True)
class KeyValueSlot:
    """One block's preallocated self-attention keys (rotated) and values, (B, capacity, H, d) each.

    The first ``start`` tokens hold those of earlier frames. A forward writes its stream's keys
    and values in place at ``start .. start + L`` and attends over the first ``start + L`` tokens,
    so the earlier ones are never copied (:class:`anyflow.model.far_cache.FarKVCache` holds one per block).

    ``placement`` writes the stream in pieces instead: ``(stream start, stream stop, storage start)``
    each, in stream order, the attention then covering the storage up to the end of the furthest
    piece (a windowed cache puts a chunk's compressed frames into the ring slots of the frames it
    evicts, :class:`anyflow.model.far_cache.ContextWindow`).
    """

    keys: torch.Tensor
    values: torch.Tensor
    start: int
    scratch: bool = False  # the stream's keys and values are a step's, not kept (overwritten by the next step)
    placement: Optional[Tuple[Tuple[int, int, int], ...]] = None

    def write(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Write the stream's keys and values (B, L, H, d) into the storage; returns how many stored tokens the
        stream attends over."""
        pieces = self.placement or ((0, k.shape[1], self.start),)
        for first, last, at in pieces:
            self.keys[:, at:at + last - first] = k[:, first:last]  # in place: the earlier keys stay where they are
            self.values[:, at:at + last - first] = v[:, first:last]
        return max(at + last - first for first, last, at in pieces)


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         visible: Optional[Visibility] = None) -> torch.Tensor:
    """q (B, Lq, H, d), k and v (B, Lk, H, d) -> (B, Lq, H*d); each chunk of queries of ``visible``
    attends to its key spans alone (None: every query to every key)."""
    if visible is None:
        return attend(q, k, v)
    outputs = []
    for (q_start, q_stop), spans in visible:
        if len(spans) == 1:
            (k_start, k_stop), = spans
            keys, values = k[:, k_start:k_stop], v[:, k_start:k_stop]
        else:
            keys = torch.cat([k[:, a:b] for a, b in spans], dim=1)
            values = torch.cat([v[:, a:b] for a, b in spans], dim=1)
        outputs.append(attend(q[:, q_start:q_stop], keys, values))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


class Attention(nn.Module):
    """The projections both attentions share: q, k, v, o Linear(D -> D) and RMSNorms of q and k over D."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(hidden_size, hidden_size)
        self.k = Linear(hidden_size, hidden_size)
        self.v = Linear(hidden_size, hidden_size)
        self.o = Linear(hidden_size, hidden_size)
        self.norm_q = RMSNorm(hidden_size, eps)
        self.norm_k = RMSNorm(hidden_size, eps)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, H, d)."""
        return x.unflatten(2, (self.num_heads, -1))


class SelfAttention(Attention):
    """Self-attention over the video tokens, RoPE on q and k, as the :class:`TokenPlan` says.

    ``attend`` computes the attention of the rotated q, k, v; sequence parallelism replaces it on an
    instance with one that exchanges heads for tokens (:mod:`anyflow.runtime.sequence_parallel`).
    """

    attend = staticmethod(multi_head_attention)

    def forward(self, x: torch.Tensor, plan: TokenPlan, slot: Optional[KeyValueSlot] = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D).

        ``slot``: where this block's keys (rotated) and values are kept: the stream's are written
        into it after the ``slot.start`` cached ones of earlier frames, and attended after them.
        Rotating a key depends on its position only, so cached keys are kept rotated.
        """
        q = rotate_pairs(self.split_heads(self.norm_q(self.q(x))), plan.rope)  # (B, L, H, d)
        k = rotate_pairs(self.split_heads(self.norm_k(self.k(x))), plan.rope)
        v = self.split_heads(self.v(x))
        if slot is not None and slot.scratch and torch.is_grad_enabled():
            # with autograd a step's keys are joined to a copy of the cached ones, not written into the
            # room: the next step's write there would change what this step saved for its backward
            k = torch.cat([slot.keys[:, :slot.start], k], dim=1)
            v = torch.cat([slot.values[:, :slot.start], v], dim=1)
        elif slot is not None:
            stop = slot.write(k, v)
            k, v = slot.keys[:, :stop], slot.values[:, :stop]  # views (B, stop, H, d)
        return self.o(self.attend(q, k, v, plan.visible))


class CrossAttention(Attention):
    """Attention from video tokens to the context tokens (image tokens first, then text)."""

    def context_kv(self, context: torch.Tensor) -> KeyValue:
        """Keys and values of the context (B, S, D), each (B, S, H, d).

        They depend on the context only, so a sampler can compute them once for all its steps.
        """
        return self.split_heads(self.norm_k(self.k(context))), self.split_heads(self.v(context))

    def forward(self, x: torch.Tensor, context_kv: KeyValue) -> torch.Tensor:
        return self.o(multi_head_attention(self.split_heads(self.norm_q(self.q(x))), *context_kv))
