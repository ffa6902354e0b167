"""3D rotary position embedding over (frame, row, column) of the patch grid: the rotation tables.

A head of dimension d holds d/2 rotation pairs (x[2i], x[2i+1]). They are split
``[d/2 - 2*(d//6), d//6, d//6]`` over the frame, row and column axes. An axis with n pairs
rotates pair j by ``position * theta^(-j/n)``. Rotations are formed in float64 and stored as
float32 (cos, sin) pairs; :func:`anyflow.model.layers.rotate_pairs` applies them to q and k.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .layers import cached_unless_compiling

CACHED_TABLES = 8  # a video's table and a FAR run's chunk and cache tables


def rope_axis_pairs(head_dim: int) -> Tuple[int, int, int]:
    """Rotation pairs given to the (frame, row, column) axes for a head of ``head_dim``."""
    spatial = head_dim // 6
    return head_dim // 2 - 2 * spatial, spatial, spatial


def axis_rotations(start: int, size: int, pairs: int, pool: int, device: torch.device, theta: float) -> torch.Tensor:
    """(cos, sin) of the rotations of grid positions ``start .. start + size - 1`` along one axis,
    (size, pairs, 2) float64.

    With ``pool`` > 1 the grid is coarser than the full-resolution one: position i covers full
    positions ``pool*i .. pool*i + pool - 1``, and its rotation is the mean of theirs scaled back
    to unit length (the average-pooled, renormalised rotation of the FAR compressed tokens).
    """
    freqs = theta ** (-torch.arange(pairs, dtype=torch.float64, device=device) / pairs)
    positions = torch.arange(start * pool, (start + size) * pool, dtype=torch.float64, device=device)
    angles = torch.outer(positions, freqs)  # (size * pool, pairs)
    rotations = torch.stack((angles.cos(), angles.sin()), dim=-1)
    if pool > 1:
        rotations = rotations.view(size, pool, pairs, 2).mean(dim=1)
        rotations = rotations / rotations.norm(dim=-1, keepdim=True)
    return rotations


def rope_rotations(
    grid: Tuple[int, int, int],
    head_dim: int,
    device: torch.device,
    frame_offset: int = 0,
    pool: Tuple[int, int] = (1, 1),
    theta: float = 10000.0,
) -> torch.Tensor:
    """Every token's rotations as (cos, sin) pairs, (L, 1, head_dim/2, 2) float32.

    ``grid`` is the patch grid (F, h, w) of the tokens, in (frame, row, column) order; frames are
    at positions ``frame_offset ..``. ``pool`` is (rows, columns) of full-resolution patches per
    token, for the FAR model's compressed tokens. The last :data:`CACHED_TABLES` tables are cached,
    so a sampler's steps reuse one table instead of rebuilding it in float64 every forward.
    """
    return _cached_rope_rotations(tuple(grid), head_dim, torch.device(device), frame_offset, tuple(pool), theta)


def build_rope_rotations(grid: Tuple[int, int, int], head_dim: int, device: torch.device, frame_offset: int,
                         pool: Tuple[int, int], theta: float) -> torch.Tensor:
    """:func:`rope_rotations` made anew."""
    f, h, w = grid
    frame_pairs, row_pairs, column_pairs = rope_axis_pairs(head_dim)
    frames = axis_rotations(frame_offset, f, frame_pairs, 1, device, theta)
    rows = axis_rotations(0, h, row_pairs, pool[0], device, theta)
    columns = axis_rotations(0, w, column_pairs, pool[1], device, theta)
    per_token = torch.cat(
        [
            frames[:, None, None].expand(f, h, w, -1, 2),
            rows[None, :, None].expand(f, h, w, -1, 2),
            columns[None, None, :].expand(f, h, w, -1, 2),
        ],
        dim=-2,
    )  # (F, h, w, d/2, 2): one rotation for every head
    return per_token.reshape(f * h * w, 1, head_dim // 2, 2).float()


_cached_rope_rotations = cached_unless_compiling(maxsize=CACHED_TABLES)(build_rope_rotations)
