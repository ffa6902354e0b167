"""The FAR model's key/value cache: every block's self-attention keys and values of the clean frames it keeps.

The cache is preallocated: every block keeps its keys and values in storage with room after the
cached tokens for the chunk being generated. A step writes the chunk's keys and values into that
room and attends over the filled prefix, and a refresh writes the re-encoded tokens in place after
the compressed ones, so no step copies the cache (the reference concatenates every block's whole
cache at every step).

Unbounded (the authors' model), the cache keeps every compressed chunk and grows with the video.
Bounded by a :class:`ContextWindow`, it keeps of the compressed frames only the first
``sink`` ones and the last ``frames`` ones, in storage allocated once at that bound: the sink in
fixed slots, the rest in a ring of ``frames`` frame slots. A chunk that ages into the compressed
part takes the slots of the frames it pushes out of the window, so nothing moves and the kept
keys are always one contiguous prefix of the storage: a step still attends over one span. A
window the video never fills keeps every frame where the unbounded cache keeps it (the same bits).

Positions. Keys are kept rotated (RoPE applied), each at its own frame, so every token in
attention keeps its true distance to every other (the windowed model is the unbounded one with
the evicted keys masked out). Frame positions are counted from ``position_base``: when the next
chunk would end past the RoPE table (``rope_max_seq_len``), the base jumps (:func:`rebased`) and
the kept compressed keys are turned back by the jump once, in place (:meth:`FarKVCache.rebase`);
the full-resolution ones are encoded anew by that refresh anyway. A jump every thousand frames or
so costs one pass over the cache, where keys stored before rotation would cost a rotation of the
whole cache at every step of every chunk. The sink, the only keys that live through many jumps, is
turned from its first rotation each time (a copy of it is kept), so its rounding never accumulates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple

import torch

from .attention import KeyValue, KeyValueSlot
from .layers import rotate_pairs
from .rope import rope_rotations

Run = Tuple[int, int]  # frames [start, stop)
Piece = Tuple[int, int, int]  # (stream start, stream stop, storage start) in tokens


@dataclass(frozen=True)
class ContextWindow:
    """What a bounded :class:`FarKVCache` keeps of the compressed chunks, and the bound of its storage.

    ``frames``: latent frames of compressed context kept behind the full-resolution chunks, the most
    recent ones. ``sink``: the first latent frames, always kept besides (the attention sink of
    StreamingLLM, Self-Forcing and LongLive). ``chunk_frames``: the largest chunk the cache will hold at
    full resolution or make room for; with ``frames`` and ``sink`` it sizes the storage, allocated once.
    A chunk ages into the compressed part whole (it attends to itself), so ``frames >= chunk_frames``.
    """

    frames: int
    sink: int
    chunk_frames: int

    def __post_init__(self) -> None:
        for name in ("frames", "sink", "chunk_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "sink" else 1):
                raise ValueError(f"ContextWindow.{name} must be an int >= {0 if name == 'sink' else 1}, got {value!r}")
        if self.frames < self.chunk_frames:
            raise ValueError(f"the context window of {self.frames} latent frames is smaller than a chunk of "
                             f"{self.chunk_frames}: a chunk ages into the compressed part whole")

    def held(self, compressed_frames: int) -> Tuple[Run, ...]:
        """The runs of frames kept of the first ``compressed_frames`` (compressed) ones: the sink and the window."""
        start = max(self.sink, compressed_frames - self.frames)  # the oldest frame of the window
        if start <= self.sink:
            return ((0, compressed_frames),) if compressed_frames else ()  # nothing evicted yet
        return ((0, self.sink), (start, compressed_frames)) if self.sink else ((start, compressed_frames),)

    def slot(self, frame: int, ring_origin: int) -> int:
        """The frame slot of compressed ``frame``: its own among the sink's, else its place in the ring."""
        return frame if frame < self.sink else self.sink + (frame - ring_origin) % self.frames

    def capacity(self, frame_tokens: Tuple[int, int], full_chunk_limit: int) -> int:
        """Tokens of each block's storage: the sink and window slots, the ``full_chunk_limit - 1``
        full-resolution chunks and the room for the next one, each at most ``chunk_frames``."""
        compressed, full = frame_tokens
        return (self.sink + self.frames) * compressed + full_chunk_limit * self.chunk_frames * full


def rebased(base: int, window: Optional[ContextWindow], end: int, compressed_frames: int, table: int) -> int:
    """The frame a cache counts positions from so that frames up to ``end`` fit the RoPE ``table``.

    ``base`` while they fit. Else it jumps so that the window's oldest frame (a bounded cache) or the
    first full-resolution frame (an unbounded one, whose older keys then take negative positions, their
    distances kept) is at 0, leaving the most room before the next jump.
    """
    if end - base <= table:
        return base
    base = compressed_frames if window is None else max(window.sink, compressed_frames - window.frames)
    if end - base > table:
        raise ValueError(f"frames {base}..{end - 1} seen together exceed rope_max_seq_len={table}; use smaller chunks "
                         "or a smaller context_window")
    return base


@dataclass
class FarKVCache:
    """Every block's self-attention keys (rotated) and values for the clean frames the cache keeps.

    Made by :meth:`anyflow.model.far.AnyFlowFARTransformer.encode_cache`. The keys of every block are
    ``[compressed chunks | full-resolution chunks]``: the first ``compressed_tokens`` belong to the
    ``num_compressed_chunks`` oldest chunks (of those a ``window`` keeps) and never change; the rest
    is replaced at each refresh.

    They are the first ``num_tokens`` of each block's ``storage`` (B, capacity, heads, head_dim);
    the room after them takes a step's chunk (scratch, overwritten by the next step). A refresh
    given this cache takes its storage over: the cache is spent, and using it again is an error.
    """

    chunk_partition: Tuple[int, ...]  # frames of each cached chunk, in order
    num_compressed_chunks: int
    compressed_tokens: int
    latent_size: Tuple[int, int]  # (H, W) of the latents it was made from
    storage: List[KeyValue]  # per block: keys, values (B, capacity, heads, head_dim), the first num_tokens cached
    num_tokens: int
    window: Optional[ContextWindow] = None  # None: every compressed chunk kept (the authors' model)
    frame_tokens: Tuple[int, int] = (0, 0)  # tokens of a compressed frame and of a full-resolution one
    ring_origin: int = 0  # a windowed cache's frame whose slot starts the ring (ContextWindow.slot)
    position_base: int = 0  # frame positions are counted from this frame (rebased)
    sink_keys: Optional[List[torch.Tensor]] = field(default=None, repr=False)  # the sink's keys as first rotated
    sink_keys_base: int = 0  # the position base of sink_keys
    spent: bool = field(default=False, repr=False)

    @property
    def layers(self) -> List[KeyValue]:
        """Per block: the cached keys and values, (B, num_tokens, heads, head_dim) views of the storage."""
        return [(k[:, :self.num_tokens], v[:, :self.num_tokens]) for k, v in self._live_storage()]

    @property
    def num_frames(self) -> int:
        return sum(self.chunk_partition)

    @property
    def compressed_frames(self) -> int:
        """Frames of the compressed chunks, kept or not."""
        return sum(self.chunk_partition[:self.num_compressed_chunks])

    @property
    def batch_size(self) -> int:
        return self._live_storage()[0][0].shape[0]

    @property
    def capacity(self) -> int:
        """Tokens each block's storage holds: the cached ones and the room after them."""
        return self._live_storage()[0][0].shape[1]

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the storage and the sink's copy: what the cache holds in memory."""
        tensors = [t for kv in self._live_storage() for t in kv] + list(self.sink_keys or [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def held_frames(self) -> Tuple[Run, ...]:
        """The runs of frames whose keys and values the cache holds, in order: the compressed ones it keeps
        (with a window: the sink and the window) and the full-resolution ones."""
        compressed = self.compressed_frames
        runs = list(self.window.held(compressed) if self.window else ((0, compressed),) if compressed else ())
        if self.num_frames > compressed:
            if runs and runs[-1][1] == compressed:
                runs[-1] = (runs[-1][0], self.num_frames)
            else:
                runs.append((compressed, self.num_frames))
        return tuple(runs)

    def compressed(self) -> List[KeyValue]:
        """Each block's keys and values of the compressed chunks alone."""
        n = self.compressed_tokens
        return [(k[:, :n], v[:, :n]) for k, v in self._live_storage()]

    def slots(self, start: int) -> List[KeyValueSlot]:
        """Each block's storage for a step whose stream follows the first ``start`` cached tokens (scratch)."""
        return [KeyValueSlot(k, v, start, scratch=True) for k, v in self._live_storage()]

    def placement(self, first: int, last: int, stream_tokens: int) -> Tuple[int, Optional[Tuple[Piece, ...]], int]:
        """Where a refresh writes its stream ``[frames first..last-1 compressed | full-resolution frames]``
        (``stream_tokens`` in all): ``(start, pieces, held)`` for a :class:`KeyValueSlot`, and the compressed
        tokens kept after it. Unbounded, or while the window fills, the stream goes on after the kept
        compressed tokens; past it, the new compressed frames take the ring slots of those they evict,
        and the full-resolution tokens follow the ring."""
        compressed = self.frame_tokens[0]
        if self.window is None:
            return self.compressed_tokens, None, self.compressed_tokens + (last - first) * compressed
        pieces: List[Piece] = []
        for j, frame in enumerate(range(first, last)):
            at = self.window.slot(frame, self.ring_origin) * compressed
            if pieces and pieces[-1][2] + pieces[-1][1] - pieces[-1][0] == at:  # follows the last piece
                pieces[-1] = (pieces[-1][0], (j + 1) * compressed, pieces[-1][2])
            else:
                pieces.append((j * compressed, (j + 1) * compressed, at))
        held = sum(stop - start for start, stop in self.window.held(last)) * compressed
        aging = (last - first) * compressed
        if len(pieces) <= 1 and (not pieces or pieces[0][2] == held - aging):
            return held - aging, None, held  # one contiguous run: [new compressed | full resolution] at held - aging
        return held - aging, tuple(pieces) + ((aging, stream_tokens, held),), held

    def rebase(self, base: int) -> None:
        """Count positions from frame ``base``: the kept compressed keys turned back by the jump, in place
        (the full-resolution ones are left to the refresh that encodes them anew)."""
        shift = base - self.position_base
        if not shift:
            return
        storage = self._live_storage()
        head_dim, device = storage[0][0].shape[-1], storage[0][0].device
        sink = min(self.window.sink, self.compressed_frames) * self.frame_tokens[0] if self.window else 0
        if sink and self.sink_keys is None:
            self.sink_keys, self.sink_keys_base = [k[:, :sink].clone() for k, _ in storage], self.position_base
        turn = rope_rotations((1, 1, 1), head_dim, device, -shift)  # (1, 1, d/2, 2): the frame pairs alone turn
        sink_turn = rope_rotations((1, 1, 1), head_dim, device, self.sink_keys_base - base)
        for i, (keys, _) in enumerate(storage):
            keys[:, sink:self.compressed_tokens] = rotate_pairs(keys[:, sink:self.compressed_tokens], turn)
            if sink:
                keys[:, :sink] = rotate_pairs(self.sink_keys[i], sink_turn)  # from their first rotation
        self.position_base = base

    def refreshed(self, chunk_partition: Tuple[int, ...], num_compressed_chunks: int, compressed_tokens: int,
                  storage: List[KeyValue], num_tokens: int, **changes) -> "FarKVCache":
        """The cache a refresh of this one makes (this one spent, its storage taken over)."""
        return replace(self, chunk_partition=chunk_partition, num_compressed_chunks=num_compressed_chunks,
                       compressed_tokens=compressed_tokens, storage=storage, num_tokens=num_tokens, spent=False,
                       **changes)

    def make_room(self, tokens: int) -> None:
        """Ensure room for ``tokens`` after the cached ones; without it, grow to exactly that (one copy)."""
        needed = self.num_tokens + tokens
        if self.capacity < needed:
            if self.window is not None:
                raise ValueError(f"a chunk of {tokens} tokens does not fit this windowed cache's storage, allocated "
                                 f"for chunks of at most {self.window.chunk_frames} frames")
            for i, kv in enumerate(self._live_storage()):  # block by block: one block's copy alive at a time
                self.storage[i] = tuple(_grown(t, needed, self.num_tokens) for t in kv)

    def take_storage(self) -> List[KeyValue]:
        """Hand the storage over to a refresh, which writes into it: this cache is spent from now on."""
        storage = self._live_storage()
        self.storage, self.spent = [], True
        return storage

    def _live_storage(self) -> List[KeyValue]:
        if self.spent:
            raise ValueError("this FarKVCache was refreshed by encode_cache, which took its storage over; use the "
                             "cache that encode_cache returned")
        return self.storage


def _grown(tensor: torch.Tensor, capacity: int, keep: int) -> torch.Tensor:
    """``tensor`` (B, L, heads, head_dim) in new storage of ``capacity`` tokens, its first ``keep`` copied over."""
    grown = tensor.new_empty((tensor.shape[0], capacity, *tensor.shape[2:]))
    grown[:, :keep] = tensor[:, :keep]
    return grown


def cache_storage(blocks: int, shape: Tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
                  old: Optional[List[KeyValue]], keep: int) -> List[KeyValue]:
    """Each of ``blocks`` blocks' keys and values storage of ``shape`` (B, capacity, heads, head_dim): ``old``
    where it holds ``capacity`` (written in place), else new storage with ``old``'s first ``keep`` tokens
    copied over."""
    capacity = shape[1]
    if old is not None and old[0][0].shape[1] >= capacity:
        return old
    storage = []
    for i in range(blocks):
        if old is None:
            storage.append((torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)))
        else:
            storage.append((_grown(old[i][0], capacity, keep), _grown(old[i][1], capacity, keep)))
            old[i] = None  # freed before the next block's storage grows: one block's old and new at a time
    return storage
