"""Spatial tiling of the decoder, as diffusers' ``AutoencoderKLWan.enable_tiling()`` does it.

The latent frame is cut into overlapping square tiles (256 pixels every 192 by default), each
decoded on its own (with its own causal cache), and the decoded tiles are blended into one frame:
in raster order, each tile's top rows are cross-faded with the bottom rows of the (already
blended) tile above, then its left columns with the right columns of the tile to its left, and
each tile contributes its top-left ``stride`` pixels. Blending is per frame, so it streams.

Tiled and untiled decodes differ where tiles meet: each tile's convolutions see zeros, not its
neighbours, past its edges. On smooth content the difference is small, not zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

DEFAULT_TILE = (256, 192)  # diffusers' tile_sample_min_height/width and tile_sample_stride_height/width


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of a (h, w) latent frame lie, and how their decoded pixels are blended."""

    rows: Tuple[int, ...]  # latent row where each tile row starts
    cols: Tuple[int, ...]  # latent column where each tile column starts
    size: int  # tile side in latents
    blend: int  # pixels cross-faded with the tile above or to the left
    stride: int  # pixels each tile contributes
    height: int  # output pixels
    width: int

    def tiles(self, x: torch.Tensor) -> List[List[torch.Tensor]]:
        """A latent frame (B, C, h, w) cut into its tiles, row by row."""
        return [[x[:, :, i:i + self.size, j:j + self.size] for j in self.cols] for i in self.rows]


def plan_tiles(tile: Union[bool, Tuple[int, int]], h: int, w: int, spatial_stride: int) -> Optional[TilePlan]:
    """The tiling of a (h, w) latent frame for ``tile`` (True for the defaults, or (tile, stride) in
    pixels); None when tiling is off or the frame fits in one tile (decoded whole, as diffusers)."""
    if tile is False or tile is None:
        return None
    size_px, stride_px = DEFAULT_TILE if tile is True else tile
    for name, value in (("tile", size_px), ("stride", stride_px)):
        if not isinstance(value, int) or isinstance(value, bool) or value < spatial_stride or value % spatial_stride:
            raise ValueError(f"tile must be True or (tile, stride) in pixels, positive multiples of {spatial_stride}; "
                             f"got {name} {value!r}")
    if stride_px > size_px:
        raise ValueError(f"tile stride {stride_px} is larger than the tile {size_px}: tiles would leave gaps")
    size, stride = size_px // spatial_stride, stride_px // spatial_stride
    if h <= size and w <= size:
        return None
    return TilePlan(tuple(range(0, h, stride)), tuple(range(0, w, stride)), size, size_px - stride_px, stride_px,
                    h * spatial_stride, w * spatial_stride)


def blend_tiles(tiles: List[List[torch.Tensor]], plan: TilePlan) -> torch.Tensor:
    """Decoded tiles of one frame (B, C, th, tw), row by row -> the frame (B, C, H, W); the tiles are
    blended in place."""
    rows = []
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            if r > 0:
                _cross_fade_(tiles[r - 1][c], tile, plan.blend, dim=2)
            if c > 0:
                _cross_fade_(row[c - 1], tile, plan.blend, dim=3)
        rows.append(torch.cat([t[:, :, :plan.stride, :plan.stride] for t in row], dim=3))
    return torch.cat(rows, dim=2)[:, :, :plan.height, :plan.width]


def _cross_fade_(before: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """tile's first e rows (dim 2) or columns (dim 3) <- before's last e * (1 - y/e) + tile's * y/e.

    The weights are rounded to float32 and each product to the tiles' dtype, as diffusers' Python
    float arithmetic on tensors does, so the result is the same to the bit.
    """
    e = min(before.shape[dim], tile.shape[dim], extent)
    if e == 0:
        return
    shape = [1, 1, 1, 1]
    shape[dim] = e
    fade_in = torch.tensor([y / e for y in range(e)], dtype=torch.float64)
    keep = (1 - fade_in).to(torch.float32).view(shape).to(tile.device)
    take = fade_in.to(torch.float32).view(shape).to(tile.device)
    head = tile.narrow(dim, 0, e)
    tail = before.narrow(dim, before.shape[dim] - e, e)
    head.copy_((tail * keep).to(tile.dtype) + (head * take).to(tile.dtype))
