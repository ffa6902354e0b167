"""Sampling with the frame-autoregressive (FAR) model: chunk by chunk, each attending to the cache of the
clean frames made before it."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from ..model.config import check_chunk_partition
from ..model.transformer import Context
from .checks import FiniteWatch, check_finite, check_model
from .schedule import TRAIN_TIMESTEPS, flow_map_sigmas, flow_map_step, steps_to_run


def sample_far(
    model,
    noise: torch.Tensor,
    encoder_hidden_states: Context,
    *,
    num_steps: int = 4,
    sigmas: Optional[Sequence[float]] = None,
    shift: float = 5.0,
    use_mean_velocity: bool = True,
    chunk_partition: Optional[Sequence[int]] = None,
    context_latents: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[int, int, float, torch.Tensor], None]] = None,
    incremental_cache: bool = True,
    chunk_callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Sample latents chunk by chunk with an AnyFlow FAR model.

    Each chunk of ``chunk_partition`` runs the same flow-map schedule as :func:`sample`, attending
    to the clean frames made before it (a :class:`anyflow.FarKVCache`, refreshed after each
    chunk). Given frames (image or video conditioning) fill the first chunks: they are cached,
    never denoised.

    Args:
        model: an :class:`anyflow.AnyFlowFARTransformer3DModel`.
        noise: initial latents (B, F, C, H, W), standard normal.
        encoder_hidden_states: UMT5 embeddings (B, S, text_dim) or a :class:`PreparedContext`.
        num_steps, sigmas, shift, use_mean_velocity: the schedule of every chunk, as in :func:`sample`.
        chunk_partition: frames of each chunk, summing to F (default: the model config's, the released
            81-frame split).
        context_latents: K given latent frames (B, K, C, H, W); K must end a chunk (1 for an image
            with the released split, 4 for 13 video frames, ...).
        callback: called after every step as ``callback(chunk_index, step_index, t, chunk_latents)``.
        incremental_cache: refresh the cache by encoding only what changed (default); False
            re-encodes every frame made so far after each chunk, as the reference does (same result).
        chunk_callback: called once per chunk, in order, as soon as its latents are final, as
            ``chunk_callback(chunk_index, chunk_latents)`` (B, frames of the chunk, C, H, W), the
            given chunks included: a caller can decode and show a chunk while the next is made.

    Returns:
        The latents (B, F, C, H, W) in the model's dtype (all frames, the given ones included). Latents
        that became NaN or infinite raise :class:`~anyflow.sampling.checks.NonFiniteLatents` naming the
        chunk and step and the likely cause, before the chunk is handed to ``chunk_callback``.
    """
    check_model(model, far=True)
    schedule = flow_map_sigmas(num_steps, shift, sigmas)
    steps = steps_to_run(schedule)
    cfg = model.config
    if not isinstance(noise, torch.Tensor) or noise.dim() != 5:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a 5-D tensor (B, F, C, H, W), got {shape}")
    batch, frames = noise.shape[:2]
    partition = check_chunk_partition(cfg.chunk_partition if chunk_partition is None else chunk_partition, frames)
    ends = [sum(partition[:i + 1]) for i in range(len(partition))]
    given = check_given_frames(context_latents, tuple(noise.shape), partition)
    check_finite(noise=noise, encoder_hidden_states=encoder_hidden_states, context_latents=context_latents)

    device, dtype = model.device, model.dtype
    latents = noise.to(device=device, dtype=dtype, copy=True)  # never write into the caller's noise
    if given:
        latents[:, :given] = context_latents.to(device=device, dtype=dtype)
    with torch.no_grad():
        context = encoder_hidden_states
        if isinstance(context, torch.Tensor):
            context = model.prepare_context(context.to(device))  # checks the embeddings
        cache = None
        watch = FiniteWatch(model, dict(noise=noise, encoder_hidden_states=encoder_hidden_states
                                        if isinstance(encoder_hidden_states, torch.Tensor) else None,
                                        context_latents=context_latents))
        for chunk, (start, stop) in enumerate(zip([0] + ends[:-1], ends)):
            if stop > given:
                z = latents[:, start:stop]
                for n, i in enumerate(steps):
                    t = (schedule[i] * TRAIN_TIMESTEPS).item()
                    r = (schedule[i + 1] * TRAIN_TIMESTEPS).item() if use_mean_velocity else t
                    # (B, F_chunk) float32 timesteps filled in on the device: one compiled graph for every step
                    t_grid, r_grid = (torch.full(z.shape[:2], value, device=device) for value in (t, r))
                    z = flow_map_step(z, model.step(z, t_grid, r_grid, context, cache), schedule, i)
                    watch.step(z, f"chunk {chunk + 1} of {len(partition)}, step {n + 1} of {len(steps)} "
                                  f"(t = {t:.1f} -> r = {r:.1f})")
                    if callback is not None:
                        callback(chunk, i, t, z)
                watch.check()  # once a chunk, before it is handed on or cached
                latents[:, start:stop] = z
            if chunk_callback is not None:
                chunk_callback(chunk, latents[:, start:stop])
            if chunk < len(partition) - 1:
                cache = model.encode_cache(latents[:, :stop], partition[:chunk + 1], context,
                                           cache if incremental_cache else None,
                                           reserve_frames=partition[chunk + 1])  # the next chunk's steps write there
    return latents


def check_given_frames(context_latents: Optional[torch.Tensor], noise_shape: Tuple[int, ...],
                       chunk_partition: Sequence[int]) -> int:
    """The number K of frames given to :func:`sample_far`, checked against the noise's shape and to end a chunk."""
    if context_latents is None:
        return 0
    chunk_ends = [sum(chunk_partition[:i + 1]) for i in range(len(chunk_partition))]
    b, f, c, h, w = noise_shape
    if (not isinstance(context_latents, torch.Tensor) or context_latents.dim() != 5 or context_latents.shape[0] != b
            or tuple(context_latents.shape[2:]) != (c, h, w)):
        shape = tuple(context_latents.shape) if isinstance(context_latents, torch.Tensor) else type(context_latents).__name__
        raise ValueError(f"context_latents must be (B={b}, K, C={c}, H={h}, W={w}), got {shape}")
    given = context_latents.shape[1]
    if given >= f:
        raise ValueError(f"context_latents gives {given} frames but the video has {f}: nothing would be generated")
    if given not in chunk_ends:
        raise ValueError(
            f"context_latents gives {given} frames, which do not fill whole chunks (chunks end after frames "
            f"{chunk_ends[:-1]}); give that many frames or choose a chunk_partition with a chunk ending at {given}"
        )
    return given
