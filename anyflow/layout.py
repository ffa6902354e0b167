"""How a token stream divides into frames, and which keys each chunk of queries attends to.

The bidirectional model's stream is one segment, F frames of (H/ph)*(W/pw) tokens, and every token
attends to every token. A frame-autoregressive (FAR) stream joins segments whose frames hold
different numbers of tokens (older frames through the compressed patch embedding, then
full-resolution frames, in training also clean copies of those), and attention is block-causal
over chunks of frames. Both are described here as data; the blocks apply them:

- ``segments``: (frames, tokens per frame) runs in stream order; the per-frame modulation of a
  frame applies to its tokens.
- ``visible``: for each chunk of queries (a token range), the key ranges it attends to, over
  the keys ``[past | stream]`` (``past``: keys of earlier frames held in a cache). ``None``: every
  query attends to every key. Attention is computed chunk by chunk on those keys alone, so no
  L x L mask is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import torch

if TYPE_CHECKING:
    from .sequence_parallel import TokenSplit

Segment = Tuple[int, int]  # (frames, tokens per frame)
Span = Tuple[int, int]  # [start, stop) in tokens
Visibility = Tuple[Tuple[Span, Tuple[Span, ...]], ...]  # (query span, key spans) per chunk of queries


@dataclass(frozen=True)
class TokenPlan:
    """One forward pass's token stream: its frame segments, RoPE rotations and attention pattern.

    ``rope`` holds the rotations of the stream's tokens, (L, 1, head_dim/2, 2), as made by
    :func:`anyflow.rope.rope_rotations`; a query and a key at the same stream position share them.
    With ``sequence`` the stream is one rank's tokens of a stream split over ranks
    (:mod:`anyflow.sequence_parallel`), and self-attention exchanges heads for tokens.
    """

    segments: Tuple[Segment, ...]
    rope: torch.Tensor
    visible: Optional[Visibility] = None
    sequence: Optional["TokenSplit"] = None  # the stream is this rank's part of one split over ranks

    @property
    def num_tokens(self) -> int:
        return sum(frames * tokens for frames, tokens in self.segments)

    @property
    def num_frames(self) -> int:
        return sum(frames for frames, _ in self.segments)


def chunk_causal(chunk_tokens: Sequence[int], past: int = 0) -> Visibility:
    """Chunks in stream order, each attending to the ``past`` keys, itself and every earlier chunk."""
    groups, start = [], 0
    for tokens in chunk_tokens:
        groups.append(((start, start + tokens), ((0, past + start + tokens),)))
        start += tokens
    return tuple(groups)


def chunk_causal_with_clean(context_chunk_tokens: Sequence[int], noisy_chunk_tokens: Sequence[int]) -> Visibility:
    """The training rollout with clean copies: stream ``[context chunks | noisy chunks | clean copies]``.

    Context (compressed) chunks are block-causal among themselves. A noisy chunk sees all context,
    itself, and the clean copies of the earlier chunks (never their noisy versions). A clean copy sees
    all context and the clean copies up to its own chunk.
    """
    context = sum(context_chunk_tokens)
    noisy = sum(noisy_chunk_tokens)
    groups = list(chunk_causal(context_chunk_tokens))
    clean_start = context + noisy
    start = 0
    for tokens in noisy_chunk_tokens:
        spans = ((0, context), (context + start, context + start + tokens), (clean_start, clean_start + start))
        groups.append(((context + start, context + start + tokens), tuple(s for s in spans if s[1] > s[0])))
        start += tokens
    start = 0
    for tokens in noisy_chunk_tokens:
        spans = ((0, context), (clean_start, clean_start + start + tokens))
        groups.append(((clean_start + start, clean_start + start + tokens), tuple(s for s in spans if s[1] > s[0])))
        start += tokens
    return tuple(groups)
