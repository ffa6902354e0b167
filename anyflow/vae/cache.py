"""What a causal video network remembers between frames, and how frames flow through its layers.

The Wan VAE is causal in time: each output frame depends on the current input frame and earlier
ones only. So a video can go through it one frame at a time, each layer keeping just what it needs
of the frames before (a 3-tap causal convolution: its last two input frames). A
:class:`TemporalCache` holds that state for one video; layers take it as an argument, so one model
can encode or decode several videos at once, each with its own cache.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Sequence

import torch
from torch import nn


class TemporalCache:
    """For one video: each layer's state between frames (its past input frames, or a marker).

    Frames are kept by reference, never copied: a layer must not modify a frame in place after
    handing it to :meth:`window`.
    """

    def __init__(self) -> None:
        self._state: Dict[nn.Module, Any] = {}

    def get(self, layer: nn.Module) -> Any:
        """What ``layer`` stored, or None before its first frame."""
        return self._state.get(layer)

    def put(self, layer: nn.Module, state: Any) -> None:
        """Store ``layer``'s state for its next frame."""
        self._state[layer] = state

    def window(self, layer: nn.Module, frame: torch.Tensor, size: int) -> List[torch.Tensor]:
        """The last ``size`` input frames of ``layer``, ending with ``frame`` (B, C, H, W); zero frames
        stand in before the video's first. The newest ``size - 1`` are kept for the next frame."""
        past = self._state.get(layer)
        if past is None:
            past = [torch.zeros_like(frame)] * (size - 1)
        window = [*past, frame]
        self._state[layer] = window[1:]
        return window


class Resample(nn.Module):
    """A layer that may change the frame rate: its forward yields 0, 1 or 2 frames per input frame."""


def run_frames(layers: Sequence[nn.Module], frame: torch.Tensor, cache: TemporalCache) -> Iterator[torch.Tensor]:
    """Push one frame (B, C, H, W) through ``layers`` in order; yield what comes out of the last one.

    Depth first: a frame that a :class:`Resample` makes goes through every later layer before its
    sibling is made, so at most one frame per resolution is alive at a time.
    """
    for i, layer in enumerate(layers):
        if isinstance(layer, Resample):
            for out in layer(frame, cache):
                yield from run_frames(layers[i + 1:], out, cache)
            return
        frame = layer(frame, cache)
    yield frame
