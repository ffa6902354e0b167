"""How the VAE's primitives are computed, in one place.

Frames are (B, C, H, W) tensors held channels-last (NHWC in memory): the RMS norm then reduces
over contiguous channels (measured 2-10x faster than over dim 1 of NCHW) and the convolutions run
on oneDNN's NHWC kernels.

A causal 3D convolution over the last ``kt`` frames is one 2D convolution of those frames
concatenated along channels (frame ``k`` at channels ``k * C_in ...``), with the Conv3d weight
(C_out, C_in, kt, kh, kw) read as a (C_out, kt * C_in, kh, kw) Conv2d weight: one large matrix
product per frame, and no copy of the weight once it is laid out for it (:func:`frame_major_`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)


def as_frame(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) held channels-last, the layout every frame of the VAE has."""
    return x.contiguous(memory_format=torch.channels_last)


def conv_frames(frames: Sequence[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                padding: int) -> torch.Tensor:
    """``kt`` frames (B, C_in, H, W), oldest first, through a Conv3d weight (C_out, C_in, kt, kh, kw)
    -> one frame (B, C_out, H', W'); ``padding`` pads height and width, never time."""
    stacked = frames[0] if len(frames) == 1 else torch.cat(frames, dim=1)  # (B, kt * C_in, H, W)
    return F.conv2d(as_frame(stacked), weight.transpose(1, 2).flatten(1, 2), bias, padding=padding)


def frame_major_(weight: torch.Tensor) -> torch.Tensor:
    """Give a Conv3d weight (C_out, C_in, kt, kh, kw) the memory order (C_out, kh, kw, kt, C_in), in
    place (once: a weight already so is left alone); returns it, same shape and values.

    Its (C_out, kt * C_in, kh, kw) view in :func:`conv_frames` is then a channels-last Conv2d weight
    as it lies, where a contiguous one would be copied twice on every call (measured: 14 ms per
    call for the 384-wide convs on one core, a third of their time at 8x downsampling).
    """
    o, c, k, h, w = weight.shape
    if weight.stride() != (h * w * k * c, 1, c, w * k * c, k * c):
        with torch.inference_mode(False):  # a normal tensor, even when first used under inference mode
            weight.data = weight.data.permute(0, 3, 4, 2, 1).contiguous().permute(0, 4, 3, 1, 2)
    return weight


def channel_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) divided by its root mean square over channels, times ``weight`` (C) elementwise.

    As Wan: a unit L2 norm over channels (in float32 for half precision), times sqrt(C) * weight.
    """
    c = x.shape[1]
    nhwc = as_frame(x).permute(0, 2, 3, 1)  # (B, H, W, C), contiguous
    normed = F.normalize(nhwc.float() if x.dtype in HALF else nhwc, dim=-1).to(x.dtype)
    return normed.mul_(weight.reshape(c) * c**0.5).permute(0, 3, 1, 2)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) repeated to (B, C, 2H, 2W) (nearest), then a zero-padded 3x3 convolution -> (B, C_out, 2H, 2W).

    Computed without the repeated frame: each of the four output pixel phases is a 2x2 convolution
    of x (2.25x fewer products, and no 4x larger intermediate).
    """
    b, _, h, w = x.shape
    out = torch.empty(b, weight.shape[0], 2 * h, 2 * w, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    padded = F.pad(as_frame(x), (1, 1, 1, 1))
    for row, row_weight in enumerate(_phase_taps(weight, dim=2)):
        for col, phase_weight in enumerate(_phase_taps(row_weight, dim=3)):
            window = padded[:, :, row:row + h + 1, col:col + w + 1]  # phase 0 looks one pixel back, 1 ahead
            out[:, :, row::2, col::2] = F.conv2d(window, phase_weight, bias)
    return out


def _phase_taps(weight: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A 3-tap kernel along ``dim`` seen through a 2x nearest upsampling -> the 2-tap kernels of the even
    and odd output phases: (w0, w1 + w2) at offsets (-1, 0) and (w0 + w1, w2) at (0, +1)."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def downsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) -> (B, C_out, H/2, W/2): a 3x3 convolution of stride 2 with one zero row and
    column added at the bottom and right."""
    return F.conv2d(as_frame(F.pad(x, (0, 1, 0, 1))), weight, bias, stride=2)
