"""How much computing a sampling run needs, estimated before the model loads, and how long that takes here.

A forward pass of ``L`` video tokens with ``S`` context tokens costs, per block and sample, the
matmuls of its linear layers (self-attention q, k, v, o; cross-attention q, o; the FFN: 2 FLOPs
per weight and token), the two products of self-attention (scores and weighted sum: ``4 L^2 D``)
and of cross-attention (``4 L S D``), plus the context keys and values (``4 S D^2``). Norms, RoPE
and the modulation are left out (a few percent). The time is the count over a matmul rate
measured on the device in the run's dtype: a rough figure, stated as such, that still tells an
hour from a week before anything is spent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from ..model.config import AnyFlowConfig, AnyFlowFARConfig


@dataclass(frozen=True)
class ComputeEstimate:
    """The FLOPs of a sampling run, its token count and forward passes, and a time at a measured rate."""

    flops: float
    tokens: int  # video tokens of the whole run's latents (per sample)
    forwards: int  # forward passes of the model (a FAR run counts its chunk steps and cache refreshes)
    rate: Optional[float] = None  # FLOP/s measured on the device

    @property
    def seconds(self) -> Optional[float]:
        return None if not self.rate else self.flops / self.rate

    def describe(self) -> str:
        text = f"{self.tokens:,} tokens, {self.forwards} forward pass(es), about {self.flops:.1e} FLOPs"
        if self.seconds is not None:
            text += f", about {duration(self.seconds)} at the {self.rate / 1e9:,.0f} GFLOP/s measured here"
        return text


def duration(seconds: float) -> str:
    """Seconds as ``42 s``, ``12 min`` or ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"


def forward_flops(config: AnyFlowConfig, batch: int, queries: int, keys: int, text_tokens: int) -> float:
    """FLOPs of one forward of ``queries`` tokens attending to ``keys`` tokens (``keys = queries`` when
    bidirectional) and to ``text_tokens`` context tokens."""
    d, layers = config.hidden_size, config.num_layers
    linear = 2 * (6 * d * d + 2 * d * config.ffn_dim)  # per token: self q, k, v, o; cross q, o; FFN in and out
    per_block = queries * (linear + 4 * keys * d + 4 * text_tokens * d) + 4 * text_tokens * d * d
    return float(layers * batch * per_block)


def estimate_sampling_compute(config: AnyFlowConfig, latent_shape: Tuple[int, int, int, int, int], text_tokens: int,
                              steps: int, guided: bool = False) -> ComputeEstimate:
    """The compute of :func:`anyflow.sample`: ``steps`` forwards over every token (a doubled batch when guided)."""
    b, f, _, h, w = latent_shape
    _, ph, pw = config.patch_size
    tokens = f * (h // ph) * (w // pw)
    batch = b * (2 if guided else 1)
    return ComputeEstimate(steps * forward_flops(config, batch, tokens, tokens, text_tokens), tokens, steps)


def estimate_far_sampling_compute(config: AnyFlowFARConfig, latent_shape: Tuple[int, int, int, int, int],
                                  text_tokens: int, steps: int, chunk_partition: Sequence[int],
                                  given_frames: int = 0, context_window: Optional[int] = None,
                                  sink_frames: int = 0) -> ComputeEstimate:
    """The compute of :func:`anyflow.sample_far`: each generated chunk's steps over its own tokens, attending to
    the cache (older chunks compressed, the last ``full_chunk_limit - 1`` at full resolution; with a
    ``context_window`` at most ``sink_frames + context_window`` compressed frames) and to itself, and one
    cache refresh per chunk but the last (counted as one more pass over the chunk: an upper bound)."""
    b, f, _, h, w = latent_shape
    _, ph, pw = config.patch_size
    _, ch, cw = config.compressed_patch_size
    full, compressed = (h // ph) * (w // pw), (h // ch) * (w // cw)
    flops, forwards, start = 0.0, 0, 0
    for index, frames in enumerate(chunk_partition):
        older = chunk_partition[:index]
        kept = older[len(older) - (config.full_chunk_limit - 1):] if config.full_chunk_limit > 1 else []
        compressed_frames = sum(older) - sum(kept)
        if context_window is not None:
            compressed_frames = min(compressed_frames, sink_frames + context_window)
        keys = compressed_frames * compressed + (sum(kept) + frames) * full
        passes = (steps if start + frames > given_frames else 0) + (index < len(chunk_partition) - 1)
        flops += passes * forward_flops(config, b, frames * full, keys, text_tokens)
        forwards += passes
        start += frames
    return ComputeEstimate(flops, f * full, forwards)


def measure_matmul_rate(device, dtype, width: int, seconds: float = 0.05) -> float:
    """FLOP/s of a (1024, k) @ (k, k) matmul on ``device`` in ``dtype``, k = ``width`` within [256, 2048]:
    the best of repeats over about ``seconds``."""
    import torch

    k = max(256, min(2048, width))
    with torch.no_grad():
        a = torch.randn(1024, k, device=device).to(dtype)
        b = torch.randn(k, k, device=device).to(dtype)
        best, spent = float("inf"), 0.0
        for repeat in range(50):
            _synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _synchronize(device)
            elapsed = time.perf_counter() - start
            if repeat:  # the first call warms up
                best, spent = min(best, elapsed), spent + elapsed
            if spent > seconds:
                break
    return 2 * 1024 * k * k / max(best, 1e-9)


def _synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
