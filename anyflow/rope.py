"""3D rotary position embedding over (frame, row, column) of the patch grid.

A head of dimension d holds d/2 rotation pairs (x[2i], x[2i+1]). They are split
``[d/2 - 2*(d//6), d//6, d//6]`` over the frame, row and column axes. An axis with n pairs
rotates pair j by ``position * theta^(-j/n)``. Angles are formed in float64; the rotation runs in
float32: in eager mode as one complex multiply (each pair viewed as a complex number, one
kernel), under ``torch.compile`` as the same product in real arithmetic, which inductor fuses
(it generates no complex code).
"""

from __future__ import annotations

from typing import Tuple

import torch


def rope_axis_pairs(head_dim: int) -> Tuple[int, int, int]:
    """Rotation pairs given to the (frame, row, column) axes for a head of ``head_dim``."""
    spatial = head_dim // 6
    return head_dim // 2 - 2 * spatial, spatial, spatial


def rope_rotations(grid: Tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0) -> torch.Tensor:
    """Every token's rotations as (cos, sin) pairs, (L, 1, head_dim/2, 2) float32.

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
    return torch.stack((per_token.cos(), per_token.sin()), dim=-1).float()


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2i], x[2i+1]) of ``x`` (B, L, heads, d) by :func:`rope_rotations`."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, L, heads, d/2, 2)
    if torch.compiler.is_compiling():
        even, odd = pairs.unbind(-1)
        cos, sin = rotations.unbind(-1)
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rotations))
    return rotated.flatten(-2).to(x.dtype)
