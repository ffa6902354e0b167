"""Streaming safetensors: headers parsed and checked by hand, tensors read and written one at a time.

No memory mapping: a mapped file counts toward resident memory while mapped, so every tensor is
read with ``readinto`` into its own buffer and released after use. Peak memory is about the
largest tensor, whatever the checkpoint's size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt, truncated or inconsistent; the message names the file."""


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lies in a safetensors file."""

    path: str
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    def read(self) -> torch.Tensor:
        """Read the tensor into fresh memory (one copy, no mapping)."""
        tensor = torch.empty(self.shape, dtype=self.dtype)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if self.nbytes else memoryview(b"")
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            got = f.readinto(buffer) if self.nbytes else 0
        if got != self.nbytes:
            raise CheckpointError(f"{self.path}: truncated while reading {self.name!r} ({got} of {self.nbytes} bytes)")
        return tensor


def map_records(records: Iterable[TensorRecord]) -> Dict[str, torch.Tensor]:
    """Tensors backed by a private (copy-on-write) mapping of their files: nothing is read until used.

    For loading a model, whose weights must be resident anyway; changes to the tensors never
    reach the file. A tensor whose offset is not aligned to its dtype is read instead.
    """
    storages: Dict[str, torch.UntypedStorage] = {}
    tensors = {}
    for record in records:
        element = torch.empty((), dtype=record.dtype).element_size()
        if record.offset % element or not record.nbytes:
            tensors[record.name] = record.read()
            continue
        if record.path not in storages:
            storages[record.path] = torch.UntypedStorage.from_file(record.path, False, os.path.getsize(record.path))
        tensor = torch.empty(0, dtype=record.dtype)
        tensors[record.name] = tensor.set_(storages[record.path], record.offset // element, record.shape)
    return tensors


def read_header(path: str) -> Tuple[Dict[str, TensorRecord], Dict[str, str]]:
    """Parse and check a safetensors header: (records by name, ``__metadata__``).

    Checks that the header is well formed JSON, dtypes are known, every tensor's byte range fits
    its shape and dtype, ranges tile the data section without gaps or overlap, and the file is
    exactly as long as the header says (so truncation is caught before any tensor is read).
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {len(prefix)} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: corrupt safetensors header length {header_len} (file has {size} bytes)")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + header_len
    records = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, begin, end)):
                raise TypeError
        except KeyError as exc:
            raise CheckpointError(f"{path}: tensor {name!r} has an unknown dtype or missing field {exc}") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {list(shape)} {info['dtype']} needs {nbytes} bytes, "
                f"its offsets {begin}..{end} give {end - begin}"
            )
        records[name] = TensorRecord(path, name, dtype, shape, data_start + begin, nbytes)
    position = data_start
    for record in sorted(records.values(), key=lambda r: r.offset):
        if record.offset != position:
            raise CheckpointError(f"{path}: tensor {record.name!r} data overlaps or leaves a gap at byte {record.offset}")
        position += record.nbytes
    if position != size:
        what = "truncated" if position > size else "has trailing bytes"
        raise CheckpointError(f"{path}: {what}: the header describes {position} bytes, the file has {size}")
    return records, {str(k): str(v) for k, v in metadata.items()}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (made contiguous), without copying when possible."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def header_bytes(entries: Iterable[Tuple[str, torch.dtype, Tuple[int, ...]]], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The 8-byte length and JSON header for tensors written in the given order, padded to 8 bytes."""
    header: Dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read_json_object(path: str, what: str) -> Dict[str, object]:
    """A JSON file holding an object; unreadable or corrupt files raise :class:`CheckpointError` naming ``what``."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt {what} ({exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: corrupt {what} (not a JSON object)")
    return obj


def read_index(path: str) -> Dict[str, str]:
    """A ``*.safetensors.index.json``: its ``weight_map`` (key -> shard file), shards checked to stay in the folder."""
    weight_map = read_json_object(path, "index file").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: corrupt index file (no 'weight_map' of key -> shard file)")
    folder = os.path.dirname(os.path.abspath(path))
    for shard in set(weight_map.values()):
        if os.path.isabs(shard) or os.path.dirname(os.path.normpath(shard)) or shard in ("", ".", ".."):
            raise CheckpointError(f"{path}: shard {shard!r} is not a file in the index's own folder; refused")
        if not os.path.isfile(os.path.join(folder, shard)):
            raise CheckpointError(f"{path}: names shard {shard!r}, which does not exist in {folder}")
    return weight_map


def read_sharded(index_path: str) -> Dict[str, TensorRecord]:
    """Records of every tensor of a sharded checkpoint, checked against its index."""
    weight_map = read_index(index_path)
    folder = os.path.dirname(os.path.abspath(index_path))
    records: Dict[str, TensorRecord] = {}
    for shard in sorted(set(weight_map.values())):
        shard_records, _ = read_header(os.path.join(folder, shard))
        for name, record in shard_records.items():
            if weight_map.get(name) != shard:
                raise CheckpointError(f"{index_path}: tensor {name!r} is in shard {shard!r} but the index says {weight_map.get(name)!r}")
            records[name] = record
    missing = sorted(set(weight_map) - set(records))
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed in the index but absent from their shards: {missing[:10]}")
    return records


def write_file(path: str, tensors: List[Tuple[str, torch.Tensor]], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors (already in memory) to a safetensors file; used for small files and tests."""
    with open(path, "wb") as f:
        f.write(header_bytes([(n, t.dtype, tuple(t.shape)) for n, t in tensors], metadata))
        for _, tensor in tensors:
            f.write(tensor_bytes(tensor))
