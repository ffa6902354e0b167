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

Block offload (:mod:`anyflow.runtime.offload`) keeps the DiT blocks in host memory: the device holds the
weights outside the blocks and two blocks' copies (the block that runs and the next, being
copied). Float8 weights (``weight_dtype="float8_e4m3fn"``) hold each block linear weight in one
byte per element plus a float32 scale per output row, and dequantise one layer's weight to the
compute dtype while it runs. :func:`estimate_device_memory` puts these together from a config
alone, and :func:`fits_on_device` answers whether a run fits a card.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

from ..model.block import CPU_TOKENS_PER_CHUNK  # what a block's feed-forward takes at a time on a CPU (at most)
from ..model.config import AnyFlowConfig, AnyFlowFARConfig
from ..model.far_cache import ContextWindow
from ..model.parameters import FLOAT8_NAME, is_float8_weight, is_fp32_island, parameter_shapes
from .video_shape import latent_shape

# bytes per token per hidden unit at a block's peak, by the model's element size
STREAM_BYTES_PER_UNIT = {4: 32, 2: 24}
ROPE_BYTES_PER_TOKEN_AND_HEAD_DIM = 16  # float64 angles, their cos and sin, the float32 table
OFFLOADED_BLOCKS_ON_DEVICE = 2  # anyflow.runtime.offload: the block that runs and the next one, being copied
# What a CUDA process holds before any tensor (context, cuBLAS and attention workspaces; about 0.5 GiB
# on recent GPUs), and a margin for the caching allocator's fragmentation: taken off a card's memory.
CUDA_RESERVED_BYTES = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a sampling run needs, by part."""

    weights: int
    latents: int
    context: int
    activations: int
    cache: int = 0  # the FAR sampler's key/value cache
    host_weights: int = 0  # block offload: the DiT blocks, in host memory (not in ``total``)

    @property
    def total(self) -> int:
        """Bytes on the device the model runs on."""
        return self.weights + self.latents + self.context + self.activations + self.cache

    def describe(self) -> str:
        parts = [("weights", self.weights), ("latents", self.latents), ("text context", self.context),
                 ("activations", self.activations)] + ([("cache", self.cache)] if self.cache else [])
        offloaded = f"; the DiT blocks' {gib(self.host_weights)} in host memory" if self.host_weights else ""
        return f"{gib(self.total)} (" + ", ".join(f"{name} {gib(n)}" for name, n in parts) + ")" + offloaded


@dataclass(frozen=True)
class WeightBytes:
    """A model's weights as held, split where block offload splits them."""

    block: int  # one DiT block
    outside: int  # everything outside the blocks: embeddings, context projections, head
    num_blocks: int
    upcast: int = 0  # float8 weights: the largest block linear weight while it is dequantised (anyflow.runtime.fp8)

    @property
    def total(self) -> int:
        return self.outside + self.num_blocks * self.block


def weight_bytes(config: AnyFlowConfig, element_size: int, weight_dtype: Optional[str] = None) -> WeightBytes:
    """The weights of the model ``config`` describes, held in a dtype of ``element_size`` bytes (the fp32
    islands in float32) and, with ``weight_dtype="float8_e4m3fn"``, every block linear weight in one byte
    per element plus a float32 scale per output row. A float8 layer dequantises its weight as it runs: made in
    float32, then rounded to the compute dtype, both alive at once (``upcast``, the largest such layer)."""
    if weight_dtype not in (None, FLOAT8_NAME):
        raise ValueError(f"weight_dtype must be None or {FLOAT8_NAME!r}, got {weight_dtype!r}")
    block = outside = upcast = 0
    for name, shape in parameter_shapes(config).items():
        n = math.prod(shape)
        if weight_dtype is not None and is_float8_weight(name):
            size = n + 4 * shape[0]
            upcast = max(upcast, n * (4 + (element_size if element_size != 4 else 0)))
        else:
            size = n * (4 if is_fp32_island(name) else element_size)
        if not name.startswith("blocks."):
            outside += size
        elif name.startswith("blocks.0."):
            block += size
    return WeightBytes(block, outside, config.num_layers, upcast)


def with_block_offload(estimate: MemoryEstimate, weights: WeightBytes, host_is_device: bool = False) -> MemoryEstimate:
    """``estimate`` (whose ``weights`` are the whole model's) for a run with block offload: the device holds
    the weights outside the blocks and two blocks' copies, host memory the blocks (``host_weights``).
    ``host_is_device`` (offload on the CPU): the blocks stay where they are and the copies come on top."""
    copies = OFFLOADED_BLOCKS_ON_DEVICE * weights.block
    if host_is_device:
        return replace(estimate, weights=estimate.weights + copies)
    blocks = weights.num_blocks * weights.block
    return replace(estimate, weights=estimate.weights - blocks + copies, host_weights=blocks)


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
    kernels: Optional["ForwardKernels"] = None,
) -> MemoryEstimate:
    """Estimate the peak memory of :func:`anyflow.sample`.

    Args:
        config: the model's config.
        weight_bytes: the weights as held (fp32 islands included).
        latent_shape: the noise (B, F, C, H, W).
        text_tokens: context tokens per sample (text, plus image tokens if any).
        element_size: bytes per element of the model's dtype: 4 (float32) or 2 (bfloat16, float16).
        guided: classifier-free guidance (the model sees twice the batch).
        kernels: the device's kernels (:meth:`ForwardKernels.on`); default: the CPU's.
    """
    b, f, c, h, w = latent_shape
    batch = b * (2 if guided else 1)
    _, ph, pw = config.patch_size
    tokens = f * (h // ph) * (w // pw)
    # float32 noise, the latents, the model input and the velocity in the model's dtype
    latents = math.prod(latent_shape) * (4 + 3 * element_size) * (2 if guided else 1)
    context = config.num_layers * 2 * batch * text_tokens * config.hidden_size * element_size
    return MemoryEstimate(weight_bytes, latents, context,
                          _forward_activations(config, batch, tokens, element_size, kernels or ForwardKernels()))


def estimate_far_sampling_memory(
    config: AnyFlowFARConfig,
    weight_bytes: int,
    latent_shape: Tuple[int, int, int, int, int],
    text_tokens: int,
    element_size: int,
    chunk_partition: Sequence[int],
    kernels: Optional["ForwardKernels"] = None,
    context_window: Optional[int] = None,
    sink_frames: int = 0,
) -> MemoryEstimate:
    """Estimate the peak memory of :func:`anyflow.sample_far`: as :func:`estimate_sampling_memory`, with the
    largest pass either a refresh of the cache (the full-resolution chunks and one chunk aging into the
    compressed part) or a step (one chunk), and the cache: its storage with room for a chunk after the
    cached tokens (a step writes there in place), and one block's old storage beside its new one while
    a refresh moves the cache to larger storage, block by block (:mod:`anyflow.model.far_cache`).

    With a ``context_window`` the cache is allocated once at its bound (``sink_frames`` and
    ``context_window`` compressed frames, the full-resolution chunks and the room: :func:`far_cache_bytes`)
    and the latents held are those the cache may need again, whatever the length."""
    b, f, c, h, w = latent_shape
    largest, kept = max(chunk_partition), config.full_chunk_limit - 1
    compressed, full = _frame_tokens(config, h, w)
    pass_tokens = max(kept * largest * full + largest * compressed, largest * full)
    plain = estimate_sampling_memory(config, weight_bytes, latent_shape, text_tokens, element_size)
    if context_window is None:
        cache_tokens = f * compressed + kept * largest * full
        per_block = 2 * b * (cache_tokens + largest * full) * config.hidden_size * element_size  # keys, values, room
        cache, latents = (config.num_layers + 1) * per_block, plain.latents
    else:
        cache = far_cache_bytes(config, b, h, w, element_size, context_window, sink_frames, largest)
        held = sink_frames + context_window + config.full_chunk_limit * largest  # frames of latents kept
        latents = plain.latents * min(f, held) // f
    return MemoryEstimate(weight_bytes, latents, plain.context,
                          _forward_activations(config, b, pass_tokens, element_size, kernels or ForwardKernels()),
                          cache)


def far_cache_bytes(config: AnyFlowFARConfig, batch: int, height: int, width: int, element_size: int,
                    context_window: int, sink_frames: int, chunk_frames: int) -> int:
    """Bytes of a FAR cache bounded by a context window (latents ``height`` x ``width``): every block's keys and
    values of the ``sink_frames`` and ``context_window`` compressed frames, ``full_chunk_limit - 1`` chunks of
    ``chunk_frames`` at full resolution and the room for the next chunk
    (:meth:`anyflow.model.far_cache.ContextWindow.capacity`), plus the sink's keys kept once positions re-base."""
    compressed, full = _frame_tokens(config, height, width)
    tokens = ContextWindow(context_window, sink_frames, chunk_frames).capacity((compressed, full), config.full_chunk_limit)
    per_token = 2 * config.num_layers * batch * config.hidden_size * element_size  # keys and values of every block
    return per_token * tokens + per_token // 2 * sink_frames * compressed


def _frame_tokens(config: AnyFlowFARConfig, height: int, width: int) -> Tuple[int, int]:
    """Tokens of a compressed latent frame and of a full-resolution one, for latents ``height`` x ``width``."""
    _, ph, pw = config.patch_size
    _, ch, cw = config.compressed_patch_size
    return (height // ch) * (width // cw), (height // ph) * (width // pw)


@dataclass(frozen=True)
class ForwardKernels:
    """What the device's kernels make a forward hold besides the token stream.

    ``ffn_tokens_per_chunk``: tokens the feed-forward takes at a time (None: all; see
    :meth:`AnyFlowBackbone.set_ffn_chunking`). ``materialised_scores``: attention runs on the math
    kernel, which holds the (B, heads, L, L) scores, their softmax and a float32 copy (bfloat16 on
    CUDA GPUs before Ampere; :func:`anyflow.runtime.devices.attention_materialises_scores`).
    """

    ffn_tokens_per_chunk: Optional[int] = CPU_TOKENS_PER_CHUNK
    materialised_scores: bool = False

    @staticmethod
    def on(device, dtype) -> "ForwardKernels":
        """The kernels a model in ``dtype`` runs on ``device`` (torch device and dtype) by default."""
        from .devices import attention_materialises_scores

        return ForwardKernels(CPU_TOKENS_PER_CHUNK if device.type == "cpu" else None,
                              attention_materialises_scores(device, dtype))


def _forward_activations(config: AnyFlowConfig, batch: int, tokens: int, element_size: int,
                         kernels: ForwardKernels = ForwardKernels()) -> int:
    """Bytes of the largest activations of a forward over ``tokens`` tokens (see the module docstring)."""
    stream = batch * tokens * config.hidden_size * STREAM_BYTES_PER_UNIT[element_size]
    chunk = tokens if kernels.ffn_tokens_per_chunk is None else min(tokens, kernels.ffn_tokens_per_chunk)
    ffn_chunk = batch * chunk * config.ffn_dim * 4 * 2
    rope = tokens * config.attention_head_dim * ROPE_BYTES_PER_TOKEN_AND_HEAD_DIM
    scores = batch * config.num_attention_heads * tokens * tokens * (2 * element_size + 4) if kernels.materialised_scores else 0
    return stream + ffn_chunk + rope + scores


def estimate_device_memory(
    config: AnyFlowConfig,
    num_frames: int = 81,
    height: int = 480,
    width: int = 832,
    *,
    element_size: int = 2,
    weight_dtype: Optional[str] = None,
    offload: Optional[str] = None,
    text_tokens: int = 512,
) -> MemoryEstimate:
    """The peak device memory of sampling one video of ``num_frames`` x ``height`` x ``width`` pixels with the
    model ``config`` describes, from the config alone: :func:`estimate_sampling_memory` (a FAR config:
    :func:`estimate_far_sampling_memory` with its chunk partition) with the weights of :func:`weight_bytes`,
    one dequantised layer's weight with float8 weights, and :func:`with_block_offload` for
    ``offload="blocks"``. The text encoder and the VAE are not counted (``anyflow generate`` runs them
    before and after sampling)."""
    if offload not in (None, "blocks"):
        raise ValueError(f"offload must be None or 'blocks', got {offload!r}")
    frames, h, w = latent_shape(num_frames, height, width)
    weights = weight_bytes(config, element_size, weight_dtype)
    shape = (1, frames, config.in_channels, h, w)
    if isinstance(config, AnyFlowFARConfig):
        estimate = estimate_far_sampling_memory(config, weights.total, shape, text_tokens, element_size,
                                                config.chunk_partition)
    else:
        estimate = estimate_sampling_memory(config, weights.total, shape, text_tokens, element_size)
    estimate = replace(estimate, activations=estimate.activations + weights.upcast)
    return estimate if offload is None else with_block_offload(estimate, weights)


def fits_on_device(config: AnyFlowConfig, device_bytes: int, **run) -> bool:
    """Whether sampling with the model ``config`` describes fits a CUDA device of ``device_bytes`` bytes:
    :func:`estimate_device_memory` (``run``: its keyword arguments) plus :data:`CUDA_RESERVED_BYTES`."""
    return estimate_device_memory(config, **run).total + CUDA_RESERVED_BYTES <= device_bytes


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
    vae_tile: Optional[int] = None,
    prompts: int = 1,
) -> StagedMemory:
    """The stages of a prompt-to-video run: the transformer and the VAE stay loaded throughout; the text
    encoder streams one block at a time (its weights, the embedding rows of the ``prompts`` encoded in one
    pass, their activations side by side); sampling adds what :func:`estimate_sampling_memory` counts
    besides the weights; decoding adds one
    latent frame's worth of the VAE decoder (of one ``vae_tile`` x ``vae_tile`` tile when the decoder tiles)
    and the decoded frames of a chunk."""
    encoded = batch * prompts
    text_activations = encoded * text_tokens * (8 * text_width + 3 * text_ffn_width) * 4
    text_scores = 2 * encoded * text_heads * text_tokens * text_tokens * 4
    text = text_block_bytes + encoded * text_tokens * text_width * 4 + text_activations + text_scores
    pixels = height * width if vae_tile is None else min(height, vae_tile) * min(width, vae_tile)
    decode = VAE_DECODE_BYTES_PER_PIXEL_AND_CHANNEL * batch * pixels * vae_base_dim
    if vae_tile is not None:  # the tiles of a frame, and the blended frame, in float32 beside the working tile
        decode += 2 * batch * height * width * 3 * 4 * 4
    return StagedMemory(
        held=(("transformer", sampling.weights), ("VAE", vae_weight_bytes)),
        stages=(("text encoder", text), ("sampling", sampling.total - sampling.weights), ("decoding", decode)),
    )
