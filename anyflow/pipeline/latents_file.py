"""A video's latents written as they are made, into the safetensors file ``anyflow sample`` writes.

A safetensors file cannot be appended to: its header, at the front, gives every tensor's shape and
offsets, and the one tensor (``latents``, (B, C, F, h, w), the diffusers layout) holds each channel's
frames together, so a chunk's frames land in C places. :class:`LatentsFile` therefore appends each
chunk's raw bytes to a spill file beside the output as it comes (chunk after chunk, each (B, n, C, h, w)
as made), and :meth:`LatentsFile.finish` writes the safetensors file from the spill, one channel of one
video at a time (memory: (F, h, w) of one channel, a sixteenth of the latents), then removes the spill.
The file is the one a whole-video run writes: ``--context-latents``, ``scripts/encode_decode.py`` and
``VideoPipeline.decode`` read it as before.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from weights_convert.partials import discard, partial_path
from weights_convert.safetensors_io import dtype_code, header_bytes

BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # raw elements of each size, read back as bytes


class LatentsFile:
    """Latent chunks appended as they come, written as one safetensors tensor at the end.

    ``path``: the file to write (the caller's partial name, renamed when complete); the spill is a
    hidden partial beside ``target`` (:mod:`weights_convert.partials`), removed by :meth:`finish` or on
    leaving the ``with`` block.
    """

    def __init__(self, path: str, target: str, key: str = "latents"):
        self.path, self.key = path, key
        self.spill = partial_path(target + ".spill")
        self._file = open(self.spill, "wb")
        self._chunks: List[Tuple[int, ...]] = []  # (B, n, C, h, w) of each chunk, in order
        self._dtype: Optional[torch.dtype] = None

    def __enter__(self) -> "LatentsFile":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        discard(self.spill)

    def append(self, latents: torch.Tensor) -> None:
        """The next chunk's latents (B, n, C, h, w), frames before channels, as the samplers make them."""
        if self._chunks and (tuple(latents.shape[:1] + latents.shape[2:]) != self._chunks[0][:1] + self._chunks[0][2:]
                             or latents.dtype != self._dtype):
            raise ValueError(f"latent chunk {tuple(latents.shape)} {latents.dtype} does not follow the earlier "
                             f"{self._chunks[0]} {self._dtype}")
        self._dtype = latents.dtype
        self._chunks.append(tuple(latents.shape))
        flat = latents.detach().to("cpu").contiguous().reshape(-1)
        self._file.write(memoryview(flat.view(torch.uint8).numpy()))

    @property
    def shape(self) -> Tuple[int, int, int, int, int]:
        """(B, C, F, h, w) of the tensor :meth:`finish` writes."""
        b, _, c, h, w = self._chunks[0]
        return b, c, sum(chunk[1] for chunk in self._chunks), h, w

    def finish(self, metadata: Optional[Dict[str, str]] = None) -> Tuple[int, int, int, int, int]:
        """Write ``path``: the latents (B, C, F, h, w) under ``key``, read back from the spill a channel at a time;
        returns their shape."""
        if not self._chunks:
            raise ValueError("no latents were appended")
        self._file.close()
        size = torch.empty(0, dtype=self._dtype).element_size()
        b, c, _, h, w = self.shape
        chunks, offset = [], 0
        for shape in self._chunks:  # each chunk's frames, mapped from the spill, not read into memory
            chunks.append(np.memmap(self.spill, dtype=BITS[size], mode="r", offset=offset, shape=shape))
            offset += int(np.prod(shape)) * size
        with open(self.path, "wb") as out:
            out.write(header_bytes([(self.key, dtype_code(self._dtype), self.shape)], metadata))
            for video in range(b):
                for channel in range(c):  # (F, h, w) of one channel: its frames, chunk after chunk
                    out.write(np.concatenate([chunk[video, :, channel] for chunk in chunks]).tobytes())
        del chunks
        discard(self.spill)
        return self.shape
