"""Ulysses sequence parallelism: the token stream split over the ranks of a process group.

Each of P ranks holds a contiguous range of the tokens (sizes differ by one at most, so no token
is padding and nothing extra enters a softmax). Everything per token (norms, modulation, the q/k
RMSNorm over all heads, RoPE, the FFN, cross-attention to the whole text context) runs on the
rank's own tokens. Self-attention needs all tokens: q, k and v are exchanged together in one
``all_to_all_single`` so that every rank holds all tokens for H/P heads, attends them, and
the output is exchanged back. The head's outputs are gathered once at the end.

The model knows nothing of it: :func:`apply_sequence_parallel` installs hooks on its modules (the patch
embedding's output is cut to this rank's tokens; each block and the head get this rank's frames of the
per-frame modulation, segments and RoPE rotations; the head's output is gathered) and gives every
self-attention the exchanging attention function (:class:`UlyssesSplit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..model.attention import Segment, TokenPlan, Visibility
from ..model.layers import attend


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
    for frames, tokens_per_frame in segments:
        for f in range(frames):
            begin, end = max(position, start), min(position + tokens_per_frame, stop)
            if begin < end:
                count = end - begin
                if local and local[-1][1] == count:  # one more frame of as many tokens
                    local[-1] = (local[-1][0] + 1, count)
                else:
                    local.append((1, count))
                first = frame if first is None else first
                last = frame
            frame += 1
            position += tokens_per_frame
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


class UlyssesSplit:
    """The hooks and the attention function that run a model's token stream split over the ranks of ``group``.

    Each forward's split is made where the tokens are (the patch embedding's output) and kept here for
    the blocks, the self-attentions and the head of that forward.
    """

    def __init__(self, group: "dist.ProcessGroup"):
        self.group = group
        self.split: Optional[TokenSplit] = None
        self.plan: Optional[TokenPlan] = None  # the whole stream's plan, and this rank's part of it:
        self.local: Optional[Tuple[TokenPlan, int, int]] = None  # (plan, first frame, last frame + 1)

    def take_tokens(self, module: nn.Module, args, tokens: torch.Tensor) -> torch.Tensor:
        """Forward hook of the patch embedding: (B, L, D) -> this rank's tokens (B, L_rank, D)."""
        if torch.is_grad_enabled():
            raise RuntimeError("sequence parallelism runs inference only: call the model under torch.no_grad() "
                               "(to train, shard the weights alone)")
        self.split, self.plan, self.local = split_tokens(tokens.shape[1], self.group), None, None
        return tokens[:, self.split.start:self.split.stop]

    def block_inputs(self, module: nn.Module, args):
        """Forward pre-hook of a block: (x, context, time_modulation (B, F, 6, D), plan, ...) with this rank's
        frames of the modulation and its part of the plan."""
        x, context, time_modulation, plan, *rest = args
        local_plan, first, last = self._local(plan)
        return (x, context, time_modulation[:, first:last], local_plan, *rest)

    def head_inputs(self, module: nn.Module, args):
        """Forward pre-hook of the head: (x, time_embedding (B, F, D), segments) -> this rank's frames."""
        x, time_embedding, segments = args
        local, first, last = local_segments(segments, self.split.start, self.split.stop)
        return x, time_embedding[:, first:last], local

    def head_output(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        """Forward hook of the head: this rank's (B, L_rank, C) -> every token's (B, L, C)."""
        return gather_tokens(out, self.split)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               visible: Optional[Visibility] = None) -> torch.Tensor:
        """Self-attention of this rank's q, k, v (B, L_rank, H, d): heads exchanged for tokens, all tokens
        attended for H/P heads, exchanged back -> (B, L_rank, H*d)."""
        if visible is not None:
            raise ValueError("sequence parallelism attends every token to every token (no block-causal streams)")
        q, k, v = heads_to_tokens(q, k, v, self.split)  # each (B, L, H/P, d)
        return tokens_to_heads(attend(q, k, v).unflatten(-1, (q.shape[2], -1)), self.split).flatten(2)

    def _local(self, plan: TokenPlan) -> Tuple[TokenPlan, int, int]:
        if self.plan is not plan:  # the first block of a forward; the others reuse it
            local, first, last = local_segments(plan.segments, self.split.start, self.split.stop)
            self.plan = plan
            self.local = TokenPlan(local, plan.rope[self.split.start:self.split.stop], plan.visible), first, last
        return self.local


def apply_sequence_parallel(model: nn.Module, group: "dist.ProcessGroup") -> UlyssesSplit:
    """Split every forward's token stream of ``model`` (a bidirectional AnyFlow transformer) over the ranks of
    ``group``, in place, by hooks and an attention function (see the module docstring)."""
    split = UlyssesSplit(group)
    model.patch_embed.register_forward_hook(split.take_tokens)
    for block in model.blocks:
        block.register_forward_pre_hook(split.block_inputs)
        block.self_attn.attend = split.attend
    model.head.register_forward_pre_hook(split.head_inputs)
    model.head.register_forward_hook(split.head_output)
    return split
