"""Streaming safetensors: headers parsed and checked by hand, tensors read and written one at a time.

No memory mapping when converting: a mapped file counts toward resident memory while mapped, so
every tensor is read with ``readinto`` into its own buffer and released after use. Peak memory is
about the largest tensor, whatever the checkpoint's size.

Dtypes are the safetensors codes ("BF16", "F32", ...). Parsing headers and planning byte ranges
needs no torch; torch is imported only to read a tensor's values.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (bytes per element, torch dtype name)
DTYPES: Dict[str, Tuple[int, str]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U8": (1, "uint8"),
    "BOOL": (1, "bool"), "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
HALF_DTYPES = ("BF16", "F16")
_CODES = {name: code for code, (_, name) in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt, truncated or inconsistent; the message names the file."""


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lies in a safetensors file."""

    path: str
    name: str
    dtype: str  # safetensors code
    shape: Tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    def read(self) -> "torch.Tensor":
        """Read the tensor into fresh memory (one copy, no mapping)."""
        return self.read_rows(0, self.shape[0] if self.shape else 1)

    def read_rows(self, start: int, stop: int) -> "torch.Tensor":
        """Read rows ``start .. stop - 1`` of the tensor (along dim 0) into fresh memory, and nothing else."""
        import torch

        if not self.shape:  # a scalar: its one value
            shape, offset, nbytes = (), self.offset, self.nbytes
        else:
            row = self.nbytes // self.shape[0] if self.shape[0] else 0
            shape, offset, nbytes = (stop - start, *self.shape[1:]), self.offset + start * row, (stop - start) * row
        tensor = torch.empty(shape, dtype=torch_dtype(self.dtype))
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        with open(self.path, "rb") as f:
            f.seek(offset)
            got = f.readinto(buffer) if nbytes else 0
        if got != nbytes:
            raise CheckpointError(f"{self.path}: truncated while reading {self.name!r} ({got} of {nbytes} bytes)")
        return tensor


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    return DTYPES[dtype][0]


def torch_dtype(dtype: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype code."""
    import torch

    return getattr(torch, DTYPES[dtype][1])


def dtype_code(dtype: object) -> str:
    """The safetensors code of a torch dtype (or of its name, "bfloat16" or "torch.bfloat16")."""
    name = str(dtype).replace("torch.", "")
    if name not in _CODES:
        raise ValueError(f"dtype {dtype} has no safetensors code; supported: {sorted(_CODES)}")
    return _CODES[name]


def map_records(records: Iterable[TensorRecord]) -> Dict[str, "torch.Tensor"]:
    """Tensors backed by a private (copy-on-write) mapping of their files: nothing is read until used.

    For loading a model, whose weights must be resident anyway; changes to the tensors never
    reach the file. A tensor whose offset is not aligned to its dtype is read instead.
    """
    import torch

    storages: Dict[str, torch.UntypedStorage] = {}
    tensors = {}
    for record in records:
        element = itemsize(record.dtype)
        if record.offset % element or not record.nbytes:
            tensors[record.name] = record.read()
            continue
        if record.path not in storages:
            storages[record.path] = torch.UntypedStorage.from_file(record.path, False, os.path.getsize(record.path))
        tensor = torch.empty(0, dtype=torch_dtype(record.dtype))
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
            dtype = info["dtype"]
            element = DTYPES[dtype][0]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, begin, end)):
                raise TypeError
        except KeyError as exc:
            raise CheckpointError(f"{path}: tensor {name!r} has an unknown dtype or missing field {exc}") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        nbytes = math.prod(shape) * element
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


def tensor_bytes(tensor: "torch.Tensor") -> memoryview:
    """The raw little-endian bytes of a tensor (made contiguous), without copying when possible."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def header_bytes(entries: Iterable[Tuple[str, str, Tuple[int, ...]]], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The 8-byte length and JSON header for (name, dtype code, shape) written in that order, padded to 8 bytes."""
    header: Dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
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


def write_file(path: str, tensors: List[Tuple[str, "torch.Tensor"]], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors (already in memory) to a safetensors file; used for small files and tests.

    The file is made as ``open`` makes files, with the permissions the umask leaves (``0o666 & ~umask``),
    like every file the project writes; safetensors' own ``save_file`` writes a private (0600)
    temporary file and renames it, so the project writes safetensors files with this function.
    """
    with open(path, "wb") as f:
        f.write(header_bytes([(n, dtype_code(t.dtype), tuple(t.shape)) for n, t in tensors], metadata))
        for _, tensor in tensors:
            f.write(tensor_bytes(tensor))
