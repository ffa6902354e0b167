"""Video latents to tokens and back.

The patch embedding is a Conv3d whose kernel equals its stride, i.e. a linear map of each
non-overlapping (pt, ph, pw) patch; it is applied as one matmul over gathered patches.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .linear import linear


class PatchEmbed(nn.Module):
    """(B, F, C, H, W) latents -> (B, L, D) tokens in (frame, row, column) order.

    The weight keeps the Conv3d shape (D, C, pt, ph, pw) of the checkpoints. The temporal patch
    ``pt`` must be 1 (enforced by the config), so L = F * (H / ph) * (W / pw).
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: Tuple[int, int, int]):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        _, ph, pw = self.patch_size
        b, f, c, h, w = latents.shape
        patches = latents.view(b, f, c, h // ph, ph, w // pw, pw)
        patches = patches.permute(0, 1, 3, 5, 2, 4, 6)  # (B, F, h, w, C, ph, pw)
        patches = patches.reshape(b, f * (h // ph) * (w // pw), c * ph * pw)  # (B, L, C*ph*pw)
        weight = self.proj.weight.flatten(1)  # (D, C*pt*ph*pw), pt = 1
        return linear(patches, weight, self.proj.bias)


def unpatchify(tokens: torch.Tensor, grid: Tuple[int, int, int], patch_size: Tuple[int, int, int]) -> torch.Tensor:
    """(B, L, ph*pw*C) head outputs -> (B, F, C, H, W) latents.

    Each token's vector is laid out (ph, pw, C); ``grid`` is the patch grid (F, H/ph, W/pw).
    """
    f, h, w = grid
    _, ph, pw = patch_size
    b = tokens.shape[0]
    c = tokens.shape[-1] // (ph * pw)
    x = tokens.view(b, f, h, w, ph, pw, c)
    x = x.permute(0, 1, 6, 2, 4, 3, 5)  # (B, F, C, h, ph, w, pw)
    return x.reshape(b, f, c, h * ph, w * pw)
