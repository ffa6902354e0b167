"""The initial noise of a run drawn from a seed, handed out chunk by chunk, so that a long FAR video never holds
the noise of all its frames at once."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

NORMALS_AT_ONCE = 16  # torch's CPU generator turns uniforms into normals 16 at a time


class SeededNoise:
    """Standard normal noise of ``shape`` (B, F, C, H, W), float32 on the CPU: the numbers
    ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` draws at once.

    :meth:`frames` hands them out chunk by chunk, in order. For one video whose frames hold whole
    runs of 16 numbers (every FAR video: H and W are multiples of 4) each chunk is drawn as it is
    asked for, the generator's stream read in the same order as one draw reads it; otherwise (a
    batch, whose frames interleave in the one draw) the whole noise is drawn at the first call.
    """

    def __init__(self, shape: Tuple[int, int, int, int, int], seed: int):
        self.shape = tuple(shape)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._drawn = 0
        self._whole: Optional[torch.Tensor] = None
        self._by_chunk = self.shape[0] == 1 and math.prod(self.shape[2:]) % NORMALS_AT_ONCE == 0

    def frames(self, start: int, stop: int) -> torch.Tensor:
        """The noise of frames ``start .. stop - 1``, (B, stop - start, C, H, W); chunks are asked for in order (the
        frames skipped are drawn and dropped)."""
        if not self._by_chunk:
            if self._whole is None:
                self._whole = torch.randn(self.shape, generator=self._generator)
            return self._whole[:, start:stop]
        if start < self._drawn or not start < stop <= self.shape[1]:
            raise ValueError(f"SeededNoise hands out frames in order: {self._drawn} next, of {self.shape[1]}; "
                             f"asked for {start}..{stop - 1}")
        if start > self._drawn:  # frames skipped (given ones): drawn all the same, so that the later ones follow
            torch.randn((self.shape[0], start - self._drawn, *self.shape[2:]), generator=self._generator)
        self._drawn = stop
        return torch.randn((self.shape[0], stop - start, *self.shape[2:]), generator=self._generator)
