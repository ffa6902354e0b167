"""What a run of the app's snapshot needs, estimated before it starts: memory as ``anyflow generate`` estimates
it (text encoder, sampling, decoding, against what the device has free) and the sampling time (the compute
estimate at a matmul rate measured once at start-up)."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from .settings import far_window

TEXT_TOKENS = 512  # the pipelines pad every prompt to 512 tokens


class Estimates:
    """Memory and time of the runs of one snapshot on one device, from its headers and configs alone.

    ``options`` are the command's (``weight_dtype``, ``offload``), as ``generate``'s estimate reads them.
    """

    def __init__(self, snapshot, device: torch.device, dtype: torch.dtype, options: argparse.Namespace):
        from anyflow.pipeline.snapshot import component_sizes
        from anyflow.runtime.compute import measure_matmul_rate
        from weights_convert.sources import open_checkpoint

        self.device, self.dtype, self.options = device, dtype, options
        self.checkpoint = open_checkpoint(snapshot.folder("transformer"))  # headers only
        self.config = self.checkpoint.config
        self.far = hasattr(self.config, "chunk_partition")
        self.components = component_sizes(snapshot, torch.empty(0, dtype=dtype).element_size())
        self.rate = measure_matmul_rate(device, dtype, self.config.hidden_size)

    def memory(self, frames: int, height: int, width: int, chunks: Optional[Sequence[int]], guided: bool = False):
        """The staged memory (:class:`anyflow.runtime.memory.StagedMemory`) of one video of this size."""
        from anyflow.pipeline.estimates import estimate_sampling_run
        from anyflow.runtime.memory import estimate_generation_memory

        sampling = estimate_sampling_run(self.checkpoint, self._noise_shape(frames, height, width), TEXT_TOKENS,
                                         tuple(chunks) if chunks else None, guided, self.device, self.dtype,
                                         self.options.weight_dtype, self.options.offload, *far_window(chunks))
        return estimate_generation_memory(sampling, **self.components, height=height, width=width)

    def available(self) -> Optional[int]:
        """Bytes free on the device now (None when unknown)."""
        from anyflow.runtime.memory import available_memory

        return available_memory(self.device)

    def sampling_seconds(self, frames: int, height: int, width: int, steps: int, chunks: Optional[Sequence[int]],
                         given_latent_frames: int = 0, guided: bool = False) -> float:
        """The sampling's compute at the measured matmul rate, in seconds."""
        from anyflow.runtime.compute import estimate_far_sampling_compute, estimate_sampling_compute

        shape = self._noise_shape(frames, height, width)
        if self.far:
            compute = estimate_far_sampling_compute(self.config, shape, TEXT_TOKENS, steps, chunks, given_latent_frames,
                                                    *far_window(chunks))
        else:
            compute = estimate_sampling_compute(self.config, shape, TEXT_TOKENS, steps, guided)
        return compute.flops / self.rate

    def check_fits(self, label: str, frames: int, height: int, width: int, chunks, guided: bool = False) -> None:
        """A ValueError naming ``label`` when a video of this size needs more memory than the device has free."""
        from anyflow.runtime.memory import gib

        memory, free = self.memory(frames, height, width, chunks, guided), self.available()
        if free is not None and memory.peak > free:
            raise ValueError(f"{label}: {frames} frames of {width} x {height} need about {gib(memory.peak)} at the "
                             f"peak ({memory.peak_stage}), but {self.device} has {gib(free)} free; "
                             "choose fewer frames or a smaller size")

    def _noise_shape(self, frames: int, height: int, width: int):
        from anyflow.runtime.video_shape import latent_shape

        latent_frames, h, w = latent_shape(frames, height, width)
        return (1, latent_frames, self.config.in_channels, h, w)
