"""The FAR model's key/value cache: every block's self-attention keys and values of the clean frames made so far.

The cache is preallocated: every block keeps its keys and values in storage with room after the
cached tokens for the chunk being generated. A step writes the chunk's keys and values into that
room and attends over the filled prefix, and a refresh writes the re-encoded tokens in place after
the compressed ones, so no step copies the cache (the reference concatenates every block's whole
cache at every step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from .attention import KeyValue, KeyValueSlot


@dataclass
class FarKVCache:
    """Every block's self-attention keys (rotated) and values for the clean frames made so far.

    Made by :meth:`anyflow.model.far.AnyFlowFARTransformer.encode_cache`. The keys of every block are
    ``[compressed chunks | full-resolution chunks]``: the first ``compressed_tokens`` belong to the
    ``num_compressed_chunks`` oldest chunks and never change; the rest is replaced at each refresh.

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
    spent: bool = field(default=False, repr=False)

    @property
    def layers(self) -> List[KeyValue]:
        """Per block: the cached keys and values, (B, num_tokens, heads, head_dim) views of the storage."""
        return [(k[:, :self.num_tokens], v[:, :self.num_tokens]) for k, v in self._live_storage()]

    @property
    def num_frames(self) -> int:
        return sum(self.chunk_partition)

    @property
    def batch_size(self) -> int:
        return self._live_storage()[0][0].shape[0]

    @property
    def capacity(self) -> int:
        """Tokens each block's storage holds: the cached ones and the room after them."""
        return self._live_storage()[0][0].shape[1]

    def compressed(self) -> List[KeyValue]:
        """Each block's keys and values of the compressed chunks alone."""
        n = self.compressed_tokens
        return [(k[:, :n], v[:, :n]) for k, v in self._live_storage()]

    def slots(self, start: int) -> List[KeyValueSlot]:
        """Each block's storage for a step whose stream follows the first ``start`` cached tokens (scratch)."""
        return [KeyValueSlot(k, v, start, scratch=True) for k, v in self._live_storage()]

    def make_room(self, tokens: int) -> None:
        """Ensure room for ``tokens`` after the cached ones; without it, grow to exactly that (one copy)."""
        needed = self.num_tokens + tokens
        if self.capacity < needed:
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
