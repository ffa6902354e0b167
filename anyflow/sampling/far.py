"""Sampling with the frame-autoregressive (FAR) model: chunk by chunk, each attending to the cache of the
clean frames made before it.

A video of any length: with no ``chunk_partition`` the checkpoint's own is extended by its rule
(:meth:`anyflow.AnyFlowFARConfig.chunk_partition_for`); past the frames it was trained on a
:class:`LongVideoWarning` says so once. ``context_window`` and ``sink_frames`` bound the cache
(:class:`anyflow.model.far_cache.ContextWindow`); a ``prompt_schedule`` changes the text from given
chunks on, the cached frames encoded again under the new one. :func:`sample_far_chunks` hands each
chunk out as it is made and keeps only the latents the cache may still need; :func:`sample_far`
returns the whole video.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..model.config import check_chunk_partition
from ..model.far_cache import ContextWindow
from ..model.transformer import Context, PreparedContext
from .checks import FiniteWatch, check_finite, check_model
from .noise import SeededNoise
from .schedule import TRAIN_TIMESTEPS, flow_map_sigmas, flow_map_step, steps_to_run

Noise = Union[torch.Tensor, SeededNoise]
PromptSchedule = Sequence[Tuple[int, Context]]


class LongVideoWarning(UserWarning):
    """A FAR video longer than the frames its checkpoint was trained on (:func:`long_video_note`)."""


def sample_far(
    model,
    noise: Noise,
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
    context_window: Optional[int] = None,
    sink_frames: int = 0,
    prompt_schedule: Optional[PromptSchedule] = None,
) -> torch.Tensor:
    """Sample latents chunk by chunk with an AnyFlow FAR model.

    Each chunk of ``chunk_partition`` runs the same flow-map schedule as :func:`sample`, attending
    to the clean frames made before it (a :class:`anyflow.FarKVCache`, refreshed after each
    chunk). Given frames (image or video conditioning) fill the first chunks: they are cached,
    never denoised.

    Args:
        model: an :class:`anyflow.AnyFlowFARTransformer3DModel`.
        noise: initial latents (B, F, C, H, W), standard normal, for any F; or a
            :class:`~anyflow.sampling.noise.SeededNoise` drawing them chunk by chunk.
        encoder_hidden_states: UMT5 embeddings (B, S, text_dim) or a :class:`PreparedContext`.
        num_steps, sigmas, shift, use_mean_velocity: the schedule of every chunk, as in :func:`sample`.
        chunk_partition: frames of each chunk, summing to F (default: the checkpoint's, extended to F by
            its rule, :meth:`anyflow.AnyFlowFARConfig.chunk_partition_for`: 1 3 3 ... 3 and the remainder for
            the released ones, their own 1 3 3 3 3 3 3 2 at 21 frames).
        context_latents: K given latent frames (B, K, C, H, W); K must end a chunk (1 for an image
            with the released split, 4 for 13 video frames, ...).
        callback: called after every step as ``callback(chunk_index, step_index, t, chunk_latents)``.
        incremental_cache: refresh the cache by encoding only what changed (default); False
            re-encodes every frame made so far after each chunk, as the reference does (same result).
        chunk_callback: called once per chunk, in order, as soon as its latents are final, as
            ``chunk_callback(chunk_index, chunk_latents)`` (B, frames of the chunk, C, H, W), the
            given chunks included: a caller can decode and show a chunk while the next is made.
        context_window: latent frames of compressed context the cache keeps behind its full-resolution
            chunks (None: all, the authors' model); the oldest leave it first. At least the largest chunk.
        sink_frames: the first latent frames, kept besides the window whatever the length (at most
            ``context_window``; with a window only).
        prompt_schedule: ``[(chunk, embeddings), ...]``: from each chunk (1 and on, in order) the video
            follows these embeddings (as ``encoder_hidden_states``), the cached frames encoded again under
            them at the switch.

    Returns:
        The latents (B, F, C, H, W) in the model's dtype (all frames, the given ones included). Latents
        that became NaN or infinite raise :class:`~anyflow.sampling.checks.NonFiniteLatents` naming the
        chunk and step and the likely cause, before the chunk is handed to ``chunk_callback``.
    """
    chunks = sample_far_chunks(model, noise, encoder_hidden_states, num_steps=num_steps, sigmas=sigmas, shift=shift,
                               use_mean_velocity=use_mean_velocity, chunk_partition=chunk_partition,
                               context_latents=context_latents, callback=callback, incremental_cache=incremental_cache,
                               context_window=context_window, sink_frames=sink_frames, prompt_schedule=prompt_schedule)
    latents, start = None, 0
    for index, chunk in chunks:
        if latents is None:
            latents = chunk.new_empty((chunk.shape[0], noise.shape[1], *chunk.shape[2:]))
        latents[:, start:start + chunk.shape[1]] = chunk
        start += chunk.shape[1]
        if chunk_callback is not None:
            chunk_callback(index, latents[:, start - chunk.shape[1]:start])
    return latents


def sample_far_chunks(
    model,
    noise: Noise,
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
    context_window: Optional[int] = None,
    sink_frames: int = 0,
    prompt_schedule: Optional[PromptSchedule] = None,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """:func:`sample_far` one chunk at a time: an iterator of ``(chunk_index, latents)``, the chunk's final
    latents (B, n, C, H, W) in the model's dtype as soon as they are made (the given chunks included).

    Every argument is checked when it is called, before any work. Nothing keeps the whole video: only the
    latents the cache may still need (the frames it will encode again, and with a ``prompt_schedule`` the
    ones it holds), so with a ``context_window`` a run holds the same memory at any length (noise drawn
    chunk by chunk from a :class:`~anyflow.sampling.noise.SeededNoise` too). The yielded latents are the
    sampler's own: read them, do not write into them.
    """
    check_model(model, far=True)
    schedule = flow_map_sigmas(num_steps, shift, sigmas)
    steps = steps_to_run(schedule)
    cfg = model.config
    if not isinstance(noise, SeededNoise) and (not isinstance(noise, torch.Tensor) or noise.dim() != 5):
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a 5-D tensor (B, F, C, H, W) or a SeededNoise, got {shape}")
    batch, frames = noise.shape[:2]
    partition = check_chunk_partition(cfg.chunk_partition_for(frames) if chunk_partition is None else chunk_partition,
                                      frames)
    given = check_given_frames(context_latents, tuple(noise.shape), partition)
    window = check_context_window(cfg, partition, context_window, sink_frames)
    if window is not None and not incremental_cache:
        raise ValueError("context_window: a windowed cache is refreshed incrementally; leave incremental_cache=True "
                         "(False re-encodes every frame, the unbounded reference's way)")
    switches = check_prompt_schedule(prompt_schedule, len(partition))
    for chunk, text in switches.items():
        if not isinstance(text, (torch.Tensor, PreparedContext)):
            raise ValueError(f"prompt_schedule: chunk {chunk}: embeddings (B, S, text_dim) or a PreparedContext, got "
                             f"{type(text).__name__}")
    check_finite(noise=noise if isinstance(noise, torch.Tensor) else None, encoder_hidden_states=encoder_hidden_states,
                 context_latents=context_latents, **{f"prompt_schedule[{i}]": text for i, text in enumerate(switches.values())})
    note = long_video_note(cfg, frames)
    if note is not None:
        warnings.warn(note, LongVideoWarning, stacklevel=2)
    return _chunks(model, noise, encoder_hidden_states, schedule, steps, use_mean_velocity, partition, given,
                   context_latents, callback, incremental_cache, window, switches)


def _chunks(model, noise: Noise, text: Context, schedule: torch.Tensor, steps: List[int], use_mean_velocity: bool,
            partition: Tuple[int, ...], given: int, context_latents: Optional[torch.Tensor], callback,
            incremental_cache: bool, window: Optional[ContextWindow],
            switches: Dict[int, Context]) -> Iterator[Tuple[int, torch.Tensor]]:
    """The work of :func:`sample_far_chunks`, its arguments checked."""
    device, dtype = model.device, model.dtype
    ends = [sum(partition[:i + 1]) for i in range(len(partition))]
    history = _History()
    with torch.no_grad():
        context = _prepared(model, text, device)
        cache = None
        watch = FiniteWatch(model, dict(noise=noise if isinstance(noise, torch.Tensor) else None,
                                        encoder_hidden_states=text if isinstance(text, torch.Tensor) else None,
                                        context_latents=context_latents))
        for chunk, (start, stop) in enumerate(zip([0] + ends[:-1], ends)):
            if chunk in switches:  # a new text from this chunk on: what the cache holds, encoded again under it
                context = _prepared(model, switches[chunk], device)
                if cache is not None:
                    cache = model.reencode_cache(cache, history.frames(cache.held_frames()), context)
            if stop > given:
                # a copy in the model's dtype: never written into the caller's noise
                z = _noise(noise, start, stop).to(device=device, dtype=dtype, copy=True)
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
            else:
                z = context_latents[:, start:stop].to(device=device, dtype=dtype)
            history.add(start, z)
            yield chunk, z
            if chunk < len(partition) - 1:
                first = 0 if cache is None or not incremental_cache else cache.compressed_frames
                cache = model.encode_cache(history.frames(((first, stop),)), partition[:chunk + 1], context,
                                           cache if incremental_cache else None,
                                           reserve_frames=partition[chunk + 1],  # the next chunk's steps write there
                                           window=window if cache is None else None)
                needed = [(cache.compressed_frames if incremental_cache else 0, stop)]
                if any(later > chunk for later in switches):
                    needed += cache.held_frames()
                history.keep(needed)


def _prepared(model, text: Context, device) -> Context:
    return model.prepare_context(text.to(device)) if isinstance(text, torch.Tensor) else text  # checks the embeddings


def _noise(noise: Noise, start: int, stop: int) -> torch.Tensor:
    return noise.frames(start, stop) if isinstance(noise, SeededNoise) else noise[:, start:stop]


class _History:
    """The latents of the chunks made so far that the cache may still need, by chunk."""

    def __init__(self):
        self.chunks: List[Tuple[int, torch.Tensor]] = []  # (first frame, latents (B, n, C, H, W))

    def add(self, start: int, latents: torch.Tensor) -> None:
        self.chunks.append((start, latents))

    def frames(self, runs: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """The frames of ``runs`` ([start, stop) each, in order), (B, n, C, H, W)."""
        pieces = [latents[:, max(start, first) - first:min(stop, first + latents.shape[1]) - first]
                  for start, stop in runs for first, latents in self.chunks
                  if first < stop and start < first + latents.shape[1]]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def keep(self, runs: Sequence[Tuple[int, int]]) -> None:
        """Forget the chunks holding no frame of ``runs``."""
        self.chunks = [(first, latents) for first, latents in self.chunks
                       if any(first < stop and start < first + latents.shape[1] for start, stop in runs)]


def long_video_note(config, frames: int) -> Optional[str]:
    """One line when ``frames`` latent frames go past those the checkpoint was trained on, else None."""
    trained = config.trained_frames
    if frames <= trained:
        return None
    return (f"{frames} latent frames ({4 * (frames - 1) + 1} video frames) go past the {trained} ({4 * (trained - 1) + 1} "
            f"video frames) this checkpoint was trained on: the frames after those extrapolate (docs/LONG_VIDEO.md)")


def check_context_window(config, chunk_partition: Sequence[int], context_window: Optional[int], sink_frames: int,
                         names: Tuple[str, str] = ("context_window", "sink_frames")) -> Optional[ContextWindow]:
    """``context_window`` and ``sink_frames`` checked against the chunks and the RoPE table: the
    :class:`~anyflow.model.far_cache.ContextWindow` of the run, or None (unbounded). ``names``: how the
    messages name the two (the CLIs' options)."""
    window_name, sink_name = names
    if isinstance(sink_frames, bool) or not isinstance(sink_frames, int) or sink_frames < 0:
        raise ValueError(f"{sink_name} must be an int >= 0 (the first latent frames kept), got {sink_frames!r}")
    if context_window is None:
        if sink_frames:
            raise ValueError(f"{sink_name} {sink_frames} needs {window_name}: without a window every frame is kept "
                             "already")
        return None
    if isinstance(context_window, bool) or not isinstance(context_window, int) or context_window < 1:
        raise ValueError(f"{window_name} must be a positive int (latent frames of compressed context kept), got "
                         f"{context_window!r}")
    largest = max(chunk_partition)
    if context_window < largest:
        raise ValueError(f"{window_name} {context_window} is smaller than a chunk ({largest} latent frames): a chunk "
                         f"ages into the compressed context whole, so the window holds at least {largest}")
    if sink_frames > context_window:
        raise ValueError(f"{sink_name} {sink_frames} is larger than {window_name} {context_window}: the sink is the "
                         "first few frames, kept beside the window")
    span = context_window + config.full_chunk_limit * largest
    if span > config.rope_max_seq_len:
        raise ValueError(f"{window_name} {context_window}: with {config.full_chunk_limit} chunks of {largest} frames "
                         f"at full resolution, attention spans {span} frames, past rope_max_seq_len="
                         f"{config.rope_max_seq_len}")
    return ContextWindow(context_window, sink_frames, largest)


def check_prompt_schedule(prompt_schedule: Optional[PromptSchedule], num_chunks: int,
                          name: str = "prompt_schedule") -> Dict[int, Context]:
    """``[(chunk, text), ...]`` -> {chunk: text}: chunks from 1 on (chunk 0 follows ``encoder_hidden_states``),
    in increasing order, each a chunk of the video (the texts are the caller's to check)."""
    switches: Dict[int, Context] = {}
    for entry in prompt_schedule or ():
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise ValueError(f"{name} holds (chunk, embeddings) pairs, got {entry!r}")
        chunk, text = entry
        if isinstance(chunk, bool) or not isinstance(chunk, int):
            raise ValueError(f"{name}: a chunk is an int, got {chunk!r}")
        if chunk < 1:
            raise ValueError(f"{name}: chunk {chunk}: switches start at chunk 1 (chunk 0 follows encoder_hidden_states)")
        if switches and chunk <= max(switches):
            raise ValueError(f"{name}: chunk {chunk} comes after chunk {max(switches)}; give the switches in order")
        if chunk >= num_chunks:
            raise ValueError(f"{name}: chunk {chunk} is past the end: the video has {num_chunks} chunks "
                             f"(0 to {num_chunks - 1})")
        switches[chunk] = text
    return switches


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
