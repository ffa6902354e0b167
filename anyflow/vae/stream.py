"""Decoding a video's latents as they arrive, chunk by chunk, with the causal state kept between chunks.

The frame-autoregressive AnyFlow model generates a video a few latent frames at a time; each
chunk can be pushed here as soon as it exists, and its frames come back at once. The frames are
exactly those of decoding the whole video in one call, since both run the same layers on the same
frames in the same order (:func:`anyflow.vae.cache.run_frames`).
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch

from .cache import TemporalCache, run_frames
from .tiling import TilePlan, blend_tiles, plan_tiles


class VAEDecoderStream:
    """One video's decoder state: :meth:`push` latent chunks in order, get their frames.

    Made by :meth:`WanVAE.decoder_stream`. The first pushed latent frame gives one video frame,
    every later one ``time_stride`` (4) more.
    """

    def __init__(self, vae, frames_first: bool = False, tile=False):
        self.vae = vae
        self.frames_first = frames_first
        self.tile = tile
        self.latent_frames = 0  # pushed so far
        self._grid: Optional[Tuple[int, int, int]] = None  # (B, h, w) of the first chunk
        self._plan: Optional[TilePlan] = None
        self._caches: Dict[Tuple[int, int], TemporalCache] = {}  # per tile (0, 0 when untiled)
        self._layers = [vae.latent_proj, *vae.decoder.layers()]

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> torch.Tensor:
        """The next normalised latent frames (B, z_dim, n, h, w) (or (B, n, z_dim, h, w) with
        ``frames_first``) -> their video frames (B, C_out, m, 8h, 8w) in [-1, 1], in the model's dtype;
        m = 4n, less 3 on the first push."""
        if self.frames_first and isinstance(latents, torch.Tensor) and latents.dim() == 5:
            latents = latents.transpose(1, 2)
        self._check(latents)
        config = self.vae.config
        b, _, n, h, w = latents.shape
        s, ts = config.spatial_stride, config.time_stride
        frames = ts * n - (ts - 1 if self.latent_frames == 0 else 0)
        video = torch.empty(b, config.out_channels, frames, s * h, s * w, dtype=self.vae.dtype, device=self.vae.device)
        done = 0
        for k in range(n):
            for frame in self._decode_frame(self.vae.denormalize(latents[:, :, k])):  # (B, z, h, w) in
                video[:, :, done] = frame.clamp_(-1.0, 1.0)
                done += 1
        self.latent_frames += n
        return video

    def _decode_frame(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """One latent frame (B, z, h, w) -> its video frames (B, C_out, H, W), unclamped."""
        if self._plan is None:
            yield from run_frames(self._layers, x, self._caches.setdefault((0, 0), TemporalCache()))
            return
        decoded = [[list(run_frames(self._layers, tile, self._caches.setdefault((r, c), TemporalCache())))
                    for c, tile in enumerate(row)] for r, row in enumerate(self._plan.tiles(x))]
        for f in range(len(decoded[0][0])):
            yield blend_tiles([[frames[f] for frames in row] for row in decoded], self._plan)

    def _check(self, latents: torch.Tensor) -> None:
        z = self.vae.config.z_dim
        layout = "(B, F, C, h, w)" if self.frames_first else "(B, C, F, h, w)"
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            what = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a {layout} tensor, got {what}")
        b, c, n, h, w = latents.shape
        shown = tuple(latents.transpose(1, 2).shape) if self.frames_first else tuple(latents.shape)
        if c != z:
            raise ValueError(f"latents {shown} have {c} channels; this VAE's latents have {z} (layout {layout})")
        if n == 0 or h == 0 or w == 0:
            raise ValueError(f"latents {shown} are empty")
        if not latents.is_floating_point():
            raise ValueError(f"latents must be floating point, got {latents.dtype}")
        if self._grid is None:
            self._grid = (b, h, w)
            self._plan = plan_tiles(self.tile, h, w, self.vae.config.spatial_stride)
        elif self._grid != (b, h, w):
            raise ValueError(f"latents {shown} do not continue the video: its earlier chunks had batch {self._grid[0]} "
                             f"and {self._grid[1]} x {self._grid[2]} latents")
