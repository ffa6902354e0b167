"""The Wan VAE's layers, each taking one frame (B, C, H, W) and the video's :class:`TemporalCache`.

Parameters keep the shapes of the checkpoints (Conv3d weights (C_out, C_in, kt, kh, kw), norm
scales (C, 1, 1, 1)), so loading is renaming only (``anyflow/vae/names.py``).
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .cache import Resample, TemporalCache
from .ops import as_frame, channel_rms_norm, conv_frames, downsample_conv, frame_major_, upsample_conv


class CausalConv3d(nn.Module):
    """A 3D convolution that sees the current frame and the ``kt - 1`` before it (zeros before the first).

    Height and width are zero padded to keep their size (``kh // 2``, ``kw // 2``). The weight keeps
    the checkpoints' shape; its memory is re-laid out on first use (:func:`.ops.frame_major_`).
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: Tuple[int, int, int]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, *kernel))
        self.bias = nn.Parameter(torch.empty(out_dim))

    @property
    def frames(self) -> int:
        """kt: the input frames each output frame sees."""
        return self.weight.shape[2]

    def conv(self, frames: List[torch.Tensor]) -> torch.Tensor:
        """The convolution over exactly ``kt`` frames (B, C_in, H, W), oldest first -> (B, C_out, H, W)."""
        return conv_frames(frames, frame_major_(self.weight), self.bias, padding=self.weight.shape[3] // 2)

    def forward(self, frame: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        if self.frames == 1:
            return self.conv([frame])
        return self.conv(cache.window(self, frame, self.frames))


class RMSNorm(nn.Module):
    """Wan's channel RMS norm: x / rms over channels, times a learned scale (kept as (C, 1, 1, 1), or
    (C, 1, 1) in attention blocks, as in the checkpoints)."""

    def __init__(self, dim: int, image: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, 1, 1) if image else torch.empty(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_rms_norm(x, self.weight)


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus the input (through a 1x1x1 conv when the width changes).

    Dropout, which Wan places before the second conv, is the identity at inference and left out.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3))
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3))
        self.shortcut = CausalConv3d(in_dim, out_dim, (1, 1, 1)) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x, cache)
        h = F.silu(self.norm2(self.conv1(F.silu(self.norm1(x), inplace=True), cache)), inplace=True)
        return self.conv2(h, cache).add_(skip)  # conv1's output is not kept alive during conv2


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (not across frames), plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, image=True)
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = as_frame(self.qkv(self.norm(x))).permute(0, 2, 3, 1).reshape(b, 1, h * w, 3 * c)
        q, k, v = qkv.chunk(3, dim=-1)  # (B, 1, H*W, C) each: one head over the pixels
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last
        return self.proj(out).add_(x)


class Head(nn.Module):
    """norm -> SiLU -> causal 3x3x3 conv: the last layer of the encoder and of the decoder."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = RMSNorm(in_dim)
        self.conv = CausalConv3d(in_dim, out_dim, (3, 3, 3))

    def forward(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        return self.conv(F.silu(self.norm(x), inplace=True), cache)


class Downsample(Resample):
    """Halve height and width (3x3 conv, stride 2); with ``temporal``, also halve time.

    Time: the video's first frame passes alone; after it, each pair of frames becomes one, through
    a stride-2 conv over (the frame before the pair, the pair). Yields 0 or 1 frames per frame.
    """

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1)) if temporal else None

    def forward(self, frame: torch.Tensor, cache: TemporalCache) -> Iterator[torch.Tensor]:
        frame = downsample_conv(frame, self.conv.weight, self.conv.bias)  # (B, C, H/2, W/2)
        if self.time_conv is None:
            yield frame
            return
        pending: Optional[List[torch.Tensor]] = cache.get(self)
        if pending is None:  # the first frame
            cache.put(self, [frame])
            yield frame
            return
        pending = [*pending, frame]
        if len(pending) == 3:
            yield self.time_conv.conv(pending)
            pending = pending[2:]
        cache.put(self, pending)


class Upsample(Resample):
    """Double height and width (nearest, then a 3x3 conv that halves the width); with ``temporal``,
    first double time.

    Time: the video's first frame passes alone; each later one becomes two, the two halves of a
    causal conv's (2C) output channels. Yields 1 or 2 frames per frame.
    """

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim // 2, 3, padding=1)
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1)) if temporal else None

    def forward(self, frame: torch.Tensor, cache: TemporalCache) -> Iterator[torch.Tensor]:
        if self.time_conv is None:
            frames: Tuple[torch.Tensor, ...] = (frame,)
        elif cache.get(self) is None:  # the first frame; the time conv starts at the second, with zeros before it
            cache.put(self, True)
            frames = (frame,)
        else:
            frames = self.time_conv(frame, cache).chunk(2, dim=1)  # (B, 2C, H, W) -> 2 x (B, C, H, W)
        for f in frames:
            yield upsample_conv(f, self.conv.weight, self.conv.bias)  # (B, C/2, 2H, 2W)
