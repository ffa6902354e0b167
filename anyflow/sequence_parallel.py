"""Ulysses sequence parallelism: the token stream split over the ranks of a process group.

Each of P ranks holds a contiguous range of the tokens (sizes differ by one at most, so no token
is padding and nothing extra enters a softmax). Everything per token (norms, modulation, the q/k
RMSNorm over all heads, RoPE, the FFN, cross-attention to the whole text context) runs on the
rank's own tokens. Self-attention needs all tokens: q, k and v are exchanged together in one
``all_to_all_single`` so that every rank holds all tokens for H/P heads, attends them, and
the output is exchanged back. The head's outputs are gathered once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.distributed as dist

from .layout import Segment


@dataclass(frozen=True)
class TokenSplit:
    """Which tokens each rank of ``group`` holds: contiguous ranges of ``sizes`` tokens, in rank order."""

    group: "dist.ProcessGroup"
    sizes: Tuple[int, ...]
    rank: int

    @property
    def start(self) -> int:
        return sum(self.sizes[:self.rank])

    @property
    def stop(self) -> int:
        return self.start + self.sizes[self.rank]


def split_tokens(length: int, group: "dist.ProcessGroup") -> TokenSplit:
    """Split ``length`` tokens over the ranks of ``group`` as evenly as whole tokens allow."""
    parts = dist.get_world_size(group)
    if length < parts:
        raise ValueError(f"sequence parallelism over {parts} ranks needs at least {parts} tokens, got {length}")
    sizes = tuple(length // parts + (r < length % parts) for r in range(parts))
    return TokenSplit(group, sizes, dist.get_rank(group))


def local_segments(segments: Sequence[Segment], start: int, stop: int) -> Tuple[Tuple[Segment, ...], int, int]:
    """The (frames, tokens per frame) segments of tokens ``start .. stop - 1`` of a stream, and the
    frames they touch (first, last + 1); a frame cut by the range becomes a one-frame segment of
    the tokens it keeps."""
    local, frame, position = [], 0, 0
    first = last = None
    for frames, per_frame in segments:
        for f in range(frames):
            begin, end = max(position, start), min(position + per_frame, stop)
            if begin < end:
                count = end - begin
                if local and local[-1][1] == count:  # one more frame of as many tokens
                    local[-1] = (local[-1][0] + 1, count)
                else:
                    local.append((1, count))
                first = frame if first is None else first
                last = frame
            frame += 1
            position += per_frame
    return tuple(local), first, last + 1


def heads_to_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    split: TokenSplit) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, L_rank, H, d) of this rank's tokens -> each (B, L, H/P, d): all tokens, this rank's
    heads; the three are exchanged together in one ``all_to_all_single``."""
    parts = len(split.sizes)
    b, length, heads, d = q.shape
    group_heads = heads // parts
    # to rank j goes head group j of our q, k and v: (P, L_rank, B, 3, H/P, d), laid out in one copy
    send = torch.stack([t.reshape(b, length, parts, group_heads, d).permute(2, 1, 0, 3, 4) for t in (q, k, v)], dim=3)
    received = q.new_empty(sum(split.sizes), b, 3, group_heads, d)
    dist.all_to_all_single(received, send.view(parts * length, b, 3, group_heads, d), list(split.sizes),
                           [length] * parts, group=split.group)
    return received.transpose(0, 1).unbind(2)  # ranks' tokens come back in rank (token) order


def tokens_to_heads(x: torch.Tensor, split: TokenSplit) -> torch.Tensor:
    """(B, L, H/P, d) -> (B, L_rank, H, d): the inverse exchange of :func:`heads_to_tokens`."""
    parts = len(split.sizes)
    b, _, group_heads, d = x.shape
    length = split.sizes[split.rank]
    send = x.transpose(0, 1).contiguous()  # (L, B, H/P, d): the tokens of rank j go to rank j
    received = x.new_empty(parts * length, b, group_heads, d)
    dist.all_to_all_single(received, send, [length] * parts, list(split.sizes), group=split.group)
    # (P, L_rank, B, H/P, d) with head group j from rank j -> (B, L_rank, H, d)
    return received.view(parts, length, b, group_heads, d).permute(2, 1, 0, 3, 4).reshape(b, length, parts * group_heads, d)


def gather_tokens(x: torch.Tensor, split: TokenSplit) -> torch.Tensor:
    """(B, L_rank, C) on every rank -> (B, L, C) on every rank."""
    most = max(split.sizes)
    padded = torch.zeros(most, *x.shape[:1], *x.shape[2:], dtype=x.dtype, device=x.device)
    padded[:x.shape[1]] = x.transpose(0, 1)
    gathered = x.new_empty(len(split.sizes) * most, *padded.shape[1:])
    # torch 2.13 renamed all_gather_into_tensor (a deprecated alias there) to all_gather_single
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(gathered, padded, group=split.group)
    pieces = [gathered[r * most:r * most + size] for r, size in enumerate(split.sizes)]
    return torch.cat(pieces).transpose(0, 1)


def shard_stream(group: "dist.ProcessGroup", tokens: torch.Tensor, segments: Sequence[Segment], rope: torch.Tensor,
                 per_frame: Sequence[torch.Tensor]):
    """This rank's part of a token stream (B, L, D) with its segments, RoPE rotations and the
    per-frame values (B, F, ...) of the frames it touches: (tokens, segments, rope, per_frame, split)."""
    split = split_tokens(tokens.shape[1], group)
    local, first, last = local_segments(segments, split.start, split.stop)
    values = tuple(v[:, first:last] for v in per_frame)
    return tokens[:, split.start:split.stop], local, rope[split.start:split.stop], values, split
