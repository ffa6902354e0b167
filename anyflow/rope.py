"""3D rotary position embedding over (frame, row, column) of the patch grid.

A head of dimension d holds d/2 rotation pairs (x[2i], x[2i+1]). They are split
``[d/2 - 2*(d//6), d//6, d//6]`` over the frame, row and column axes. An axis with n pairs
rotates pair j by ``position * theta^(-j/n)``. Angles are formed in float64 and the rotation
is applied in float32, then cast back.
"""

from __future__ import annotations

from typing import Tuple

import torch


def rope_axis_pairs(head_dim: int) -> Tuple[int, int, int]:
    """Rotation pairs given to the (frame, row, column) axes for a head of ``head_dim``."""
    spatial = head_dim // 6
    return head_dim // 2 - 2 * spatial, spatial, spatial


def rope_cos_sin(
    grid: Tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of every token's rotation angles, each (L, 1, head_dim/2) float32.

    ``grid`` is the patch grid (F, h, w); tokens are in (frame, row, column) order.
    """
    angles = []
    for size, pairs in zip(grid, rope_axis_pairs(head_dim)):
        freqs = theta ** (-torch.arange(pairs, dtype=torch.float64, device=device) / pairs)
        positions = torch.arange(size, dtype=torch.float64, device=device)
        angles.append(torch.outer(positions, freqs))  # (size, pairs)
    f, h, w = grid
    per_token = torch.cat(
        [
            angles[0][:, None, None, :].expand(f, h, w, -1),
            angles[1][None, :, None, :].expand(f, h, w, -1),
            angles[2][None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, head_dim // 2)  # (L, 1, d/2): one rotation for every head
    return per_token.cos().float(), per_token.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of ``x`` (B, L, heads, d) by the angles of :func:`rope_cos_sin`."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, L, heads, d/2, 2)
    even, odd = pairs.unbind(-1)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
