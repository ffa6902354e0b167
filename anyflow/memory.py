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
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from .config import AnyFlowConfig

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

    @property
    def total(self) -> int:
        return self.weights + self.latents + self.context + self.activations

    def describe(self) -> str:
        parts = (("weights", self.weights), ("latents", self.latents), ("text context", self.context),
                 ("activations", self.activations))
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
    d = config.hidden_size
    latent_elements = math.prod(latent_shape)
    # float32 noise, the latents, the model input and the velocity in the model's dtype
    latents = latent_elements * (4 + 3 * element_size) * (2 if guided else 1)
    context = config.num_layers * 2 * batch * text_tokens * d * element_size
    stream = batch * tokens * d * STREAM_BYTES_PER_UNIT[element_size]
    ffn_chunk = batch * min(tokens, FFN_TOKENS_PER_CHUNK) * config.ffn_dim * 4 * 2
    rope = tokens * config.attention_head_dim * ROPE_BYTES_PER_TOKEN_AND_HEAD_DIM
    return MemoryEstimate(weight_bytes, latents, context, stream + ffn_chunk + rope)


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
