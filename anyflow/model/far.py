"""The frame-autoregressive (FAR) AnyFlow transformer: the same blocks, attending causally over chunks of frames.

A video of F latent frames is made in chunks of frames (``chunk_partition``). Looking at a video,
the model sees the most recent chunks at full resolution and older ones through a second patch
embedding with a larger patch (``far_patch_embed``: 4x fewer tokens with the released
(1, 4, 4)), whose RoPE rotations are the full grid's averaged over each compressed patch; frame
positions are absolute. The token stream is ``[compressed older chunks | full-resolution chunks]``
and a token attends to its own chunk and every earlier one (:class:`anyflow.model.attention.TokenPlan`).

Three ways to run it:

- :meth:`AnyFlowFARTransformer.forward`: a whole video at once, as in training (the
  ``full_chunk_limit`` last chunks at full resolution), optionally with clean copies of the
  full-resolution frames; returns the velocity of the full-resolution frames.
- :meth:`~AnyFlowFARTransformer.encode_cache`: the clean frames generated so far, encoded
  into a :class:`FarKVCache` of every block's keys and values at ``t = r = 0`` (there the
  ``full_chunk_limit - 1`` last chunks are at full resolution).
- :meth:`~AnyFlowFARTransformer.step`: one chunk of noisy frames attending to the cache
  and to itself; returns its velocity. The sampler (:func:`anyflow.sample_far`) calls it for
  every step of every chunk and refreshes the cache after each chunk.

Refreshing the cache re-encodes only what changed: a compressed chunk's keys and values depend on
the compressed chunks before it alone, so once computed they never change. After a chunk is
generated, only the chunk that ages into the compressed part and the full-resolution chunks are
encoded, whatever the length of the video (the reference re-encodes the whole prefix).

The cache is :class:`anyflow.model.far_cache.FarKVCache`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .attention import TokenPlan, Visibility
from .checks import TimestepLike, check_latents, timestep_grid
from .config import AnyFlowFARConfig, check_chunk_partition
from .embeddings import PatchEmbed, unpatchify
from .far_cache import ContextWindow, FarKVCache, KeyValueSlot, cache_storage, rebased
from .rope import rope_rotations
from .transformer import AnyFlowBackbone, Context, PreparedContext, Transformer3DOutput


class AnyFlowFARTransformer(AnyFlowBackbone):
    """The frame-autoregressive AnyFlow flow-map transformer (see the module docstring)."""

    config_class = AnyFlowFARConfig

    def __init__(self, config: AnyFlowFARConfig):
        super().__init__(config)
        self.far_patch_embed = PatchEmbed(config.in_channels, config.hidden_size, config.compressed_patch_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: TimestepLike,
        r_timestep: TimestepLike,
        encoder_hidden_states: Context,
        chunk_partition: Optional[Sequence[int]] = None,
        clean_hidden_states: Optional[torch.Tensor] = None,
        clean_timestep: Optional[TimestepLike] = None,
        encoder_hidden_states_image: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[Transformer3DOutput, Tuple[torch.Tensor]]:
        """Mean velocity from t to r of a whole video, block-causal over its chunks (the training rollout).

        Args:
            hidden_states: latents (B, F, C_in, H, W).
            timestep, r_timestep: t and r: a number, a 0-d or (B,) tensor, or one per frame (B, F).
            encoder_hidden_states: UMT5 embeddings (B, S, text_dim), or a :class:`PreparedContext`.
            chunk_partition: frames of each chunk, summing to F (default: the config's). All chunks
                but the ``full_chunk_limit`` last are compressed.
            clean_hidden_states: clean copies (B, F_full, C_in, H, W) of the full-resolution frames;
                a noisy chunk then sees the clean copies of the earlier chunks instead of their
                noisy frames, and each clean copy sees the clean copies up to its own chunk.
            clean_timestep: the clean copies' timestep (default 0), embedded as t and as the target
                MLP's input alike, as the reference does.
            encoder_hidden_states_image: image tokens when the config has ``image_dim``.
            return_dict: return a :class:`Transformer3DOutput` (else a 1-tuple).

        Returns:
            The velocity (B, F_full, C_out, H, W) of the full-resolution (last) frames.
        """
        cfg = self.config
        grid = check_latents(self.config, hidden_states)
        batch, frames = hidden_states.shape[:2]
        partition = check_chunk_partition(cfg.chunk_partition if chunk_partition is None else chunk_partition, frames)
        context = self._context(encoder_hidden_states, encoder_hidden_states_image, batch)
        t, r = self._timesteps(timestep, r_timestep, batch, frames)

        num_compressed = max(0, len(partition) - cfg.full_chunk_limit)
        compressed_frames = sum(partition[:num_compressed])
        full_frames = frames - compressed_frames
        chunk_tokens = self._chunk_tokens(partition, num_compressed, grid)
        latents = hidden_states.to(self.device, self.dtype)
        tokens, segments, rope = self._stream(latents[:, :compressed_frames], latents[:, compressed_frames:], grid,
                                              ((0, compressed_frames),), compressed_frames)
        visible = chunk_causal(chunk_tokens)
        time_embedding, time_modulation = self.time_embed(t, r, self.dtype)  # (B, F, D), (B, F, 6, D)
        if clean_hidden_states is not None:
            expected = (batch, full_frames, *hidden_states.shape[2:])
            if not isinstance(clean_hidden_states, torch.Tensor) or tuple(clean_hidden_states.shape) != expected:
                shape = tuple(clean_hidden_states.shape) if isinstance(clean_hidden_states, torch.Tensor) else None
                raise ValueError(f"clean_hidden_states must be (B, F_full, C, H, W) = {expected}, clean copies of the "
                                 f"{full_frames} full-resolution frames; got {shape}")
            clean_t = timestep_grid(0 if clean_timestep is None else clean_timestep, "clean_timestep", batch,
                                    full_frames, self.device)
            _, clean_modulation = self.time_embed.embed(clean_t, clean_t, self.dtype)
            time_modulation = torch.cat([time_modulation, clean_modulation], dim=1)
            tokens[0] = torch.cat([tokens[0], self.patch_embed(clean_hidden_states.to(self.device, self.dtype))], dim=1)
            segments = segments + segments[-1:]  # the clean copies: full-resolution frames again
            rope = torch.cat([rope, rope[-full_frames * grid[1] * grid[2]:]])  # at the same positions
            visible = chunk_causal_with_clean(chunk_tokens[:num_compressed], chunk_tokens[num_compressed:])
        elif clean_timestep is not None:
            raise ValueError("clean_timestep was given without clean_hidden_states")

        x = self._run_blocks(tokens, context, time_modulation, TokenPlan(segments, rope, visible))
        start = sum(chunk_tokens[:num_compressed])
        full = x[:, start:start + sum(chunk_tokens[num_compressed:])]  # the noisy full-resolution tokens
        head_segments = ((full_frames, grid[1] * grid[2]),)
        velocity = unpatchify(self.head(full, time_embedding[:, compressed_frames:], head_segments), (full_frames, *grid[1:]),
                              cfg.patch_size)  # (B, F_full, C_out, H, W)
        return Transformer3DOutput(velocity) if return_dict else (velocity,)

    def encode_cache(
        self,
        latents: torch.Tensor,
        chunk_partition: Sequence[int],
        encoder_hidden_states: Context,
        cache: Optional[FarKVCache] = None,
        encoder_hidden_states_image: Optional[torch.Tensor] = None,
        reserve_frames: int = 0,
        window: Optional[ContextWindow] = None,
    ) -> FarKVCache:
        """Encode the clean frames made so far, in chunks of ``chunk_partition``, at t = r = 0.

        Without ``cache`` every chunk is encoded (as the reference does after each chunk), ``latents``
        (B, F, C, H, W) holding all F frames. With the cache of the first of these chunks (made from these
        same frames), only what changed is: the chunks that age into the compressed part (attending to the
        compressed chunks already cached) and the full-resolution chunks; the result is the same, and
        ``latents`` may hold only the last frames, from the first chunk encoded on. The new cache takes the
        given one's storage over, writing in place where it has room (the given cache is spent).

        ``reserve_frames``: room for that many full-resolution frames after the cached ones (the
        next chunk's), so that its :meth:`step` calls write there in place instead of growing the
        cache (:func:`anyflow.sample_far` reserves the next chunk); positions are re-based when those
        frames would end past ``rope_max_seq_len`` (:mod:`anyflow.model.far_cache`).

        ``window`` (with ``cache`` None): a bounded cache that keeps of the compressed chunks only the
        sink and the last ``window.frames`` frames (:class:`~anyflow.model.far_cache.ContextWindow`), in
        storage allocated once; its refreshes age one chunk in at a time, as sampling does.
        """
        cfg = self.config
        grid = check_latents(self.config, latents, frames_in_table=False)
        batch = latents.shape[0]
        partition = check_chunk_partition(chunk_partition)
        frames = sum(partition)
        if isinstance(reserve_frames, bool) or not isinstance(reserve_frames, int) or reserve_frames < 0:
            raise ValueError(f"reserve_frames must be an int >= 0 (frames of room after the cached ones), "
                             f"got {reserve_frames!r}")
        if window is not None:
            if cache is not None:
                raise ValueError("window is given with cache=None only: a cache keeps the window it was made with")
            cache = self._empty_cache(batch, grid, window)
        context = self._context(encoder_hidden_states, encoder_hidden_states_image, batch)
        num_compressed = max(0, len(partition) - (cfg.full_chunk_limit - 1))
        reused = 0 if cache is None else self._reusable_chunks(cache, partition, num_compressed, latents)
        if cache is not None and cache.window is not None and max(partition[reused:] + (reserve_frames,)) > \
                cache.window.chunk_frames:
            raise ValueError(f"chunks of up to {max(partition[reused:] + (reserve_frames,))} frames do not fit a "
                             f"cache whose ContextWindow is made for chunks of at most {cache.window.chunk_frames}")
        latents = self._frames_from(latents, sum(partition[:reused]), partition, cache is not None)
        if cache is not None and cache.window is not None:
            for aged in range(reused + 1, num_compressed):  # one chunk ages in per pass, as during sampling
                chunks = aged + cfg.full_chunk_limit - 1
                cache = self.encode_cache(latents[:, :sum(partition[:chunks]) - sum(partition[:reused])],
                                          partition[:chunks], encoder_hidden_states, cache, encoder_hidden_states_image)
                latents, reused = latents[:, partition[reused]:], reused + 1
        first = sum(partition[:reused])  # the first frame encoded
        compressed_frames = sum(partition[:num_compressed])
        base = rebased(0 if cache is None else cache.position_base, None if cache is None else cache.window,
                       frames + reserve_frames, compressed_frames, cfg.rope_max_seq_len)
        latents = latents.to(self.device, self.dtype)
        tokens, segments, rope = self._stream(latents[:, :compressed_frames - first], latents[:, compressed_frames - first:],
                                              grid, ((first - base, compressed_frames - first),),
                                              compressed_frames - base)
        chunk_tokens = self._chunk_tokens(partition[reused:], num_compressed - reused, grid)
        frame_tokens = self._frame_tokens(grid)
        if cache is not None:
            cache.rebase(base)
        if cache is None or cache.window is None:
            past_tokens = cache.compressed_tokens if reused else 0  # the compressed chunks kept, never re-encoded
            num_tokens = past_tokens + sum(chunk_tokens)
            capacity = num_tokens + reserve_frames * frame_tokens[1]
            shape = (batch, capacity, cfg.num_attention_heads, cfg.attention_head_dim)
            storage = cache_storage(len(self.blocks), shape, self.dtype, self.device,
                                    None if cache is None else cache.take_storage(), past_tokens)
            start, pieces, held = past_tokens, None, past_tokens + sum(chunk_tokens[:num_compressed - reused])
        else:
            start, pieces, held = cache.placement(first, compressed_frames, sum(chunk_tokens))
            num_tokens = held + sum(chunk_tokens[num_compressed - reused:])
            storage = cache.take_storage()  # allocated at its bound: written in place
        zeros = torch.zeros(batch, frames - first, device=self.device)  # clean frames: t = r = 0
        _, time_modulation = self.time_embed(zeros, zeros, self.dtype)
        aging = sum(chunk_tokens[:num_compressed - reused])
        plan = TokenPlan(segments, rope, chunk_causal(chunk_tokens, held - aging))
        self._run_blocks(tokens, context, time_modulation, plan, [KeyValueSlot(k, v, start, placement=pieces)
                                                                  for k, v in storage])
        if cache is None:
            return FarKVCache(partition, num_compressed, held, tuple(latents.shape[-2:]), storage, num_tokens,
                              frame_tokens=frame_tokens, position_base=base)
        return cache.refreshed(partition, num_compressed, held, storage, num_tokens)

    def reencode_cache(
        self,
        cache: FarKVCache,
        latents: torch.Tensor,
        encoder_hidden_states: Context,
        encoder_hidden_states_image: Optional[torch.Tensor] = None,
    ) -> FarKVCache:
        """The frames ``cache`` holds, encoded again from scratch under another text (a prompt that changes).

        The keys and values of later blocks depend on the text through cross-attention, so a new prompt
        needs them anew. ``latents`` (B, n, C, H, W) are the frames ``cache.held_frames()`` lists, in
        order; they are encoded as the cache holds them (the compressed frames it keeps, in their chunks,
        each attending to those before it; then the full-resolution chunks), at their positions. The new
        cache takes the given one's storage over (the given cache is spent).
        """
        cfg = self.config
        grid = check_latents(self.config, latents, frames_in_table=False)
        runs = cache.held_frames()
        held_frames = sum(stop - start for start, stop in runs)
        if latents.shape[0] != cache.batch_size or tuple(latents.shape[-2:]) != cache.latent_size \
                or latents.shape[1] != held_frames:
            raise ValueError(f"latents must be the {held_frames} frames the cache holds ({list(runs)}), batch "
                             f"{cache.batch_size}, latents {cache.latent_size}; got {tuple(latents.shape)}")
        self._check_cache_storage(cache)
        context = self._context(encoder_hidden_states, encoder_hidden_states_image, latents.shape[0])
        compressed_frames, base = cache.compressed_frames, cache.position_base
        compressed_runs = tuple((start, min(stop, compressed_frames) - start) for start, stop in runs
                                if start < compressed_frames)
        kept = sum(n for _, n in compressed_runs)
        chunk_tokens, start, frame_tokens = [], 0, self._frame_tokens(grid)
        for index, size in enumerate(cache.chunk_partition):  # each chunk cut to the frames the cache keeps of it
            kept_frames = sum(max(0, min(stop, start + size) - max(first, start)) for first, stop in runs)
            if kept_frames:
                chunk_tokens.append(kept_frames * frame_tokens[index >= cache.num_compressed_chunks])
            start += size
        latents = latents.to(self.device, self.dtype)
        tokens, segments, rope = self._stream(latents[:, :kept], latents[:, kept:], grid,
                                              tuple((first - base, n) for first, n in compressed_runs),
                                              compressed_frames - base)
        storage = cache.take_storage()
        zeros = torch.zeros(latents.shape[0], held_frames, device=self.device)  # clean frames: t = r = 0
        _, time_modulation = self.time_embed(zeros, zeros, self.dtype)
        plan = TokenPlan(segments, rope, chunk_causal(chunk_tokens))
        self._run_blocks(tokens, context, time_modulation, plan, [KeyValueSlot(k, v, 0) for k, v in storage])
        window = cache.window
        ring_origin = max(window.sink, compressed_runs[-1][0]) if window and compressed_runs else cache.ring_origin
        return cache.refreshed(cache.chunk_partition, cache.num_compressed_chunks, cache.compressed_tokens, storage,
                               cache.num_tokens, ring_origin=ring_origin, sink_keys=None)

    def step(
        self,
        chunk: torch.Tensor,
        timestep: TimestepLike,
        r_timestep: TimestepLike,
        encoder_hidden_states: Context,
        cache: Optional[FarKVCache],
        encoder_hidden_states_image: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Mean velocity (B, F_chunk, C_out, H, W) of the next chunk of noisy frames (B, F_chunk, C, H, W),
        which attends to every cached frame (``cache`` None: the first chunk) and to itself.

        The chunk's keys and values are written into the room after the cached ones, as scratch that
        the next step overwrites: what the cache holds is unchanged. A cache without room for the
        chunk (made without ``reserve_frames``) grows once to fit it, with one copy.
        """
        grid = check_latents(self.config, chunk)
        batch, frames = chunk.shape[:2]
        offset = 0
        if cache is not None:
            if cache.batch_size != batch or cache.latent_size != tuple(chunk.shape[-2:]):
                raise ValueError(
                    f"the cache was made for batch {cache.batch_size} and latents {cache.latent_size}, the chunk is "
                    f"batch {batch} and {tuple(chunk.shape[-2:])}"
                )
            self._check_cache_storage(cache)
            offset = cache.num_frames - cache.position_base  # the chunk's first position
        if offset + frames > self.config.rope_max_seq_len:
            raise ValueError(f"positions {offset}..{offset + frames - 1} exceed rope_max_seq_len="
                             f"{self.config.rope_max_seq_len}; encode the cache with reserve_frames={frames} (its "
                             "positions are then re-based)")
        context = self._context(encoder_hidden_states, encoder_hidden_states_image, batch)
        t, r = self._timesteps(timestep, r_timestep, batch, frames)
        tokens = [self.patch_embed(chunk.to(self.device, self.dtype))]  # (B, L, D), taken by the blocks
        time_embedding, time_modulation = self.time_embed(t, r, self.dtype)
        segments = ((frames, grid[1] * grid[2]),)
        plan = TokenPlan(segments, rope_rotations(grid, self.config.attention_head_dim, self.device, frame_offset=offset))
        slots = None
        if cache is not None:
            cache.make_room(plan.num_tokens)
            slots = cache.slots(cache.num_tokens)  # the chunk's keys and values go after the cached ones
        x = self._run_blocks(tokens, context, time_modulation, plan, slots)
        return unpatchify(self.head(x, time_embedding, segments), grid, self.config.patch_size)

    def _frame_tokens(self, grid: Tuple[int, int, int]) -> Tuple[int, int]:
        """Tokens of a compressed frame and of a full-resolution one."""
        _, h, w = grid
        _, ph, pw = self.config.patch_size
        _, ch, cw = self.config.compressed_patch_size
        return (h * ph // ch) * (w * pw // cw), h * w

    def _chunk_tokens(self, partition: Sequence[int], num_compressed: int, grid: Tuple[int, int, int]) -> List[int]:
        """Tokens of each chunk: the first ``num_compressed`` chunks compressed, the rest at full resolution."""
        tokens_per_frame = self._frame_tokens(grid)
        return [frames * tokens_per_frame[i >= num_compressed] for i, frames in enumerate(partition)]

    def _stream(self, compressed: torch.Tensor, full: torch.Tensor, grid: Tuple[int, int, int],
                compressed_at: Sequence[Tuple[int, int]], full_at: int):
        """Tokens ``[compressed frames | full-resolution frames]``: ([tokens (B, L, D)], segments, RoPE rotations),
        the tokens in a list that :meth:`_run_blocks` takes them from. ``compressed_at``: the runs (position of
        the first frame, frames) the compressed frames lie at, in order; the full-resolution ones follow from
        position ``full_at``."""
        _, h, w = grid
        _, ph, pw = self.config.patch_size
        _, ch, cw = self.config.compressed_patch_size
        pool = (ch // ph, cw // pw)
        head_dim, device = self.config.attention_head_dim, self.device
        parts, segments, ropes = [], [], []
        if compressed.shape[1]:
            small = (h // pool[0], w // pool[1])
            parts.append(self.far_patch_embed(compressed))
            segments.append((compressed.shape[1], small[0] * small[1]))
            ropes += [rope_rotations((frames, *small), head_dim, device, first, pool) for first, frames in compressed_at]
        parts.append(self.patch_embed(full))
        segments.append((full.shape[1], h * w))
        ropes.append(rope_rotations((full.shape[1], h, w), head_dim, device, full_at))
        return [torch.cat(parts, dim=1)], tuple(segments), torch.cat(ropes)

    def _empty_cache(self, batch: int, grid: Tuple[int, int, int], window: ContextWindow) -> FarKVCache:
        """A bounded cache of no frames yet, its storage allocated at the window's bound."""
        cfg = self.config
        frame_tokens = self._frame_tokens(grid)
        shape = (batch, window.capacity(frame_tokens, cfg.full_chunk_limit), cfg.num_attention_heads,
                 cfg.attention_head_dim)
        storage = cache_storage(len(self.blocks), shape, self.dtype, self.device, None, 0)
        _, h, w = grid
        _, ph, pw = cfg.patch_size
        return FarKVCache((), 0, 0, (h * ph, w * pw), storage, 0, window=window, frame_tokens=frame_tokens,
                          ring_origin=window.sink)

    @staticmethod
    def _frames_from(latents: torch.Tensor, first: int, partition: Tuple[int, ...], incremental: bool) -> torch.Tensor:
        """The frames from ``first`` on, of ``latents`` holding all the partition's frames or (``incremental``) its
        last ones."""
        frames, given = sum(partition), latents.shape[1]
        if given == frames or (incremental and frames - first <= given < frames):
            return latents[:, given - (frames - first):]
        if incremental and given < frames:
            raise ValueError(f"latents hold {given} frames; encoding chunks {list(partition)} with this cache needs "
                             f"the last {frames - first} (frames {first}..{frames - 1})")
        raise ValueError(f"chunk_partition {list(partition)} sums to {frames} latent frames, the video has {given}")

    def _reusable_chunks(self, cache: FarKVCache, partition: Tuple[int, ...], num_compressed: int,
                         latents: torch.Tensor) -> int:
        """How many compressed chunks of ``cache`` stay valid for ``partition`` (its chunks must come first)."""
        if partition[:len(cache.chunk_partition)] != cache.chunk_partition:
            raise ValueError(f"the cache holds chunks {list(cache.chunk_partition)}, which do not begin "
                             f"chunk_partition {list(partition)}")
        if cache.batch_size != latents.shape[0] or cache.latent_size != tuple(latents.shape[-2:]):
            raise ValueError(f"the cache was made for batch {cache.batch_size} and latents {cache.latent_size}, "
                             f"these are batch {latents.shape[0]} and {tuple(latents.shape[-2:])}")
        self._check_cache_storage(cache)
        return min(cache.num_compressed_chunks, num_compressed)

    def _check_cache_storage(self, cache: FarKVCache) -> None:
        """A cache's keys and values must be in this model's dtype, on its device (the stream's are written into them)."""
        keys = cache.storage[0][0]  # (the callers have read cache.batch_size: a spent cache has raised its error)
        if keys.dtype != self.dtype or keys.device != self.device:
            raise ValueError(f"the cache holds {keys.dtype} on {keys.device} but the model is {self.dtype} on "
                             f"{self.device}; encode the frames again after moving or casting the model")


def chunk_causal(chunk_tokens: Sequence[int], past: int = 0) -> Visibility:
    """Chunks in stream order, each attending to the ``past`` keys, itself and every earlier chunk."""
    groups, start = [], 0
    for tokens in chunk_tokens:
        groups.append(((start, start + tokens), ((0, past + start + tokens),)))
        start += tokens
    return tuple(groups)


def chunk_causal_with_clean(context_chunk_tokens: Sequence[int], noisy_chunk_tokens: Sequence[int]) -> Visibility:
    """The training rollout with clean copies: stream ``[context chunks | noisy chunks | clean copies]``.

    Context (compressed) chunks are block-causal among themselves. A noisy chunk sees all context,
    itself, and the clean copies of the earlier chunks (never their noisy versions). A clean copy sees
    all context and the clean copies up to its own chunk.
    """
    context = sum(context_chunk_tokens)
    noisy = sum(noisy_chunk_tokens)
    groups = list(chunk_causal(context_chunk_tokens))
    clean_start = context + noisy
    start = 0
    for tokens in noisy_chunk_tokens:
        spans = ((0, context), (context + start, context + start + tokens), (clean_start, clean_start + start))
        groups.append(((context + start, context + start + tokens), tuple(s for s in spans if s[1] > s[0])))
        start += tokens
    start = 0
    for tokens in noisy_chunk_tokens:
        spans = ((0, context), (clean_start, clean_start + start + tokens))
        groups.append(((clean_start + start, clean_start + start + tokens), tuple(s for s in spans if s[1] > s[0])))
        start += tokens
    return tuple(groups)
