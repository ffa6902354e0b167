"""How much memory a sampling run needs, estimated before anything is allocated, and how much there is.

The estimate adds the weights, the latents, the prepared text context and the largest activation
of a forward pass. Inside a block the token stream (B, L, D) lives in several copies at once
(the stream, its modulated and normalised forms, q, k, v, the attention output, float32
intermediates of the norms, RoPE and the gated adds). Measured on a CPU for a 1.3B-wide block
(the growth of peak RSS between 7,800 and 32,760 tokens; ``scripts/bench.py`` prints the estimate
beside the measured growth): about 24 bytes per token and hidden unit in float32 and 19 in
bfloat16 (native or float32-computed kernels alike). The constants below are a third above
those, so the estimate errs towards refusing. The feed-forward hidden activation adds one chunk
of (tokens, ffn_dim).

The estimate bounds the tensors alive at once. On Linux, glibc's allocator may keep freed blocks
resident on top of that, trading memory for speed: a FAR run at 480p (1.3B widths, 2 layers, bf16)
peaked at 605 MB of RSS growth with every freed block returned (``MALLOC_MMAP_THRESHOLD_=65536``,
35% slower) and at 1,319 MB with glibc's defaults; the estimate was 997 MB.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from .config import AnyFlowConfig, AnyFlowFARConfig

# bytes per token per hidden unit at a block's peak, by the model's element size
STREAM_BYTES_PER_UNIT = {4: 32, 2: 24}
FFN_TOKENS_PER_CHUNK = 4096  # anyflow.block.FeedForward.tokens_per_chunk (at most; fewer in half precision on CPU)
ROPE_BYTES_PER_TOKEN_AND_HEAD_DIM = 16  # float64 angles, their cos and sin, the float32 table


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a sampling run needs, by part."""

    weights: int
    latents: int
    context: int
    activations: int
    cache: int = 0  # the FAR sampler's key/value cache

    @property
    def total(self) -> int:
        return self.weights + self.latents + self.context + self.activations + self.cache

    def describe(self) -> str:
        parts = [("weights", self.weights), ("latents", self.latents), ("text context", self.context),
                 ("activations", self.activations)] + ([("cache", self.cache)] if self.cache else [])
        return f"{gib(self.total)} (" + ", ".join(f"{name} {gib(n)}" for name, n in parts) + ")"


def gib(nbytes: float) -> str:
    """Bytes as ``12.3 GiB`` (or MiB below one GiB)."""
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def estimate_sampling_memory(
    config: AnyFlowConfig,
    weight_bytes: int,
    latent_shape: Tuple[int, int, int, int, int],
    text_tokens: int,
    element_size: int,
    guided: bool = False,
) -> MemoryEstimate:
    """Estimate the peak memory of :func:`anyflow.sample`.

    Args:
        config: the model's config.
        weight_bytes: the weights as held (fp32 islands included).
        latent_shape: the noise (B, F, C, H, W).
        text_tokens: context tokens per sample (text, plus image tokens if any).
        element_size: bytes per element of the model's dtype: 4 (float32) or 2 (bfloat16, float16).
        guided: classifier-free guidance (the model sees twice the batch).
    """
    b, f, c, h, w = latent_shape
    batch = b * (2 if guided else 1)
    _, ph, pw = config.patch_size
    tokens = f * (h // ph) * (w // pw)
    # float32 noise, the latents, the model input and the velocity in the model's dtype
    latents = math.prod(latent_shape) * (4 + 3 * element_size) * (2 if guided else 1)
    context = config.num_layers * 2 * batch * text_tokens * config.hidden_size * element_size
    return MemoryEstimate(weight_bytes, latents, context, _forward_activations(config, batch, tokens, element_size))


def estimate_far_sampling_memory(
    config: AnyFlowFARConfig,
    weight_bytes: int,
    latent_shape: Tuple[int, int, int, int, int],
    text_tokens: int,
    element_size: int,
    chunk_partition: Sequence[int],
) -> MemoryEstimate:
    """Estimate the peak memory of :func:`anyflow.sample_far`: as :func:`estimate_sampling_memory`, with the
    largest pass either a refresh of the cache (the full-resolution chunks and one chunk aging into the
    compressed part) or a step (one chunk), and the cache twice (the old one beside the new while
    refreshing, or the cache beside its copy joined to a step's own keys)."""
    b, f, c, h, w = latent_shape
    _, ph, pw = config.patch_size
    _, ch, cw = config.compressed_patch_size
    full, compressed = (h // ph) * (w // pw), (h // ch) * (w // cw)
    largest, kept = max(chunk_partition), config.full_chunk_limit - 1
    pass_tokens = max(kept * largest * full + largest * compressed, largest * full)
    cache_tokens = f * compressed + kept * largest * full
    cache = config.num_layers * 2 * b * cache_tokens * config.hidden_size * element_size
    plain = estimate_sampling_memory(config, weight_bytes, latent_shape, text_tokens, element_size)
    return MemoryEstimate(weight_bytes, plain.latents, plain.context,
                          _forward_activations(config, b, pass_tokens, element_size), 2 * cache)


def _forward_activations(config: AnyFlowConfig, batch: int, tokens: int, element_size: int) -> int:
    """Bytes of the largest activations of a forward over ``tokens`` tokens (see the module docstring)."""
    stream = batch * tokens * config.hidden_size * STREAM_BYTES_PER_UNIT[element_size]
    ffn_chunk = batch * min(tokens, FFN_TOKENS_PER_CHUNK) * config.ffn_dim * 4 * 2
    rope = tokens * config.attention_head_dim * ROPE_BYTES_PER_TOKEN_AND_HEAD_DIM
    return stream + ffn_chunk + rope


def available_memory(device) -> Optional[int]:
    """Bytes free for a run on ``device`` (a ``torch.device``), or None where it cannot be told.

    CPU: the kernel's MemAvailable, bounded by a cgroup (container) limit if one is set; CUDA: the
    free device memory.
    """
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = _meminfo_available()
    limit = _cgroup_headroom()
    if free is None:
        return limit
    return free if limit is None else min(free, limit)


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_headroom() -> Optional[int]:
    """memory.max - memory.current of this process's cgroup (v2), when a limit is set."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            return max(int(limit) - int(f.read().strip()), 0)
    except (OSError, ValueError):
        return None


# The Wan VAE decoder's peak above what it holds while it decodes one latent frame into 4 video
# frames, per output pixel and base_dim channel, in float32: its full-resolution stage holds several
# (base_dim, 4, H, W) tensors beside the causal caches. Measured: 51 bytes at 240 x 416 (472 MiB, the
# released VAE's base_dim 96, the second latent frame, peak RSS above RSS before it); a third above.
VAE_DECODE_BYTES_PER_PIXEL_AND_CHANNEL = 68


@dataclass(frozen=True)
class StagedMemory:
    """Bytes held through a whole ``generate`` run (``held``) and what each stage adds while it runs."""

    held: Tuple[Tuple[str, int], ...]
    stages: Tuple[Tuple[str, int], ...]

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda item: item[1])[0]

    @property
    def peak(self) -> int:
        return sum(n for _, n in self.held) + max(n for _, n in self.stages)

    def describe(self) -> str:
        held = ", ".join(f"{name} {gib(n)}" for name, n in self.held)
        stages = ", ".join(f"{name} +{gib(n)}" for name, n in self.stages)
        return f"about {gib(self.peak)} at the peak ({self.peak_stage}): {held} held; {stages}"


def estimate_generation_memory(
    sampling: MemoryEstimate,
    vae_weight_bytes: int,
    vae_base_dim: int,
    text_block_bytes: int,
    text_width: int,
    text_ffn_width: int,
    text_heads: int,
    height: int,
    width: int,
    batch: int = 1,
    text_tokens: int = 512,
) -> StagedMemory:
    """The stages of a prompt-to-video run: the transformer and the VAE stay loaded throughout; the text
    encoder streams one block at a time (its weights, the embedding rows of the prompt, its activations);
    sampling adds what :func:`estimate_sampling_memory` counts besides the weights; decoding adds one
    latent frame's worth of the VAE decoder and the decoded frames of a chunk."""
    text_activations = batch * text_tokens * (8 * text_width + 3 * text_ffn_width) * 4
    text_scores = 2 * batch * text_heads * text_tokens * text_tokens * 4
    text = text_block_bytes + batch * text_tokens * text_width * 4 + text_activations + text_scores
    decode = VAE_DECODE_BYTES_PER_PIXEL_AND_CHANNEL * batch * height * width * vae_base_dim
    return StagedMemory(
        held=(("transformer", sampling.weights), ("VAE", vae_weight_bytes)),
        stages=(("text encoder", text), ("sampling", sampling.total - sampling.weights), ("decoding", decode)),
    )
