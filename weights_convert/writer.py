"""Writing a checkpoint safely: streamed tensor by tensor, read back and checked, then moved into place.

The output is built in a hidden ``.NAME.partial-PID`` folder beside OUT. Only when every file
has been written, re-read and matched tensor by tensor (CRC-32 of each tensor's bytes) is it
renamed to OUT. An existing OUT is replaced only with ``force=True``, and only after success.
A killed run leaves no OUT and its partial folder is removed by the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import torch

from .safetensors_io import CheckpointError, header_bytes, read_header, tensor_bytes

CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutputTensor:
    """One tensor to write: its name in the output, where it comes from, its output dtype."""

    name: str
    read: Callable[[], torch.Tensor]
    dtype: torch.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    cleaned = str(text).strip().upper()
    number = cleaned.rstrip("KMGTIB")
    try:
        value = int(float(number) * units[cleaned[len(number):]])
    except (KeyError, ValueError):
        raise ValueError(f"max shard size must look like 5GB, 500MB or 2GiB, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"max shard size must be positive, got {text!r}")
    return value


class Progress:
    """Throttled progress lines on a stream: percent, bytes, MB/s (at most one line a second)."""

    def __init__(self, total: int, label: str, stream: Optional[TextIO]):
        self.total, self.label, self.stream = total, label, stream
        self.done = 0
        self.start = self.last = time.perf_counter()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if self.stream is not None and (now - self.last >= 1.0 or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9) / 1e6
            pct = 100.0 * self.done / max(self.total, 1)
            print(f"  {self.label}: {pct:5.1f}%  {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB  {rate:.0f} MB/s",
                  file=self.stream, flush=True)


def shard(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> List[List[OutputTensor]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: List[List[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def check_destination(out: str, force: bool, sources: Sequence[str] = ()) -> None:
    """Refuse an existing OUT without ``force``, and any source equal to or inside OUT."""
    real_out = os.path.realpath(out)
    for source in sources:
        real_src = os.path.realpath(source)
        if real_src == real_out or real_src.startswith(real_out.rstrip(os.sep) + os.sep):
            raise CheckpointError(f"{source}: the source is {'OUT itself' if real_src == real_out else 'inside OUT'} ({out}); refused")
    if os.path.lexists(out) and not force:
        raise CheckpointError(f"{out}: already exists; pass --force to replace it (it is replaced only after success)")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise CheckpointError(f"{out}: exists and is not a folder; refused")


def _remove_stale_partials(parent: str, name: str) -> None:
    prefix = f".{name}.partial-"
    for entry in os.listdir(parent):
        if entry.startswith(prefix):
            pid = entry[len(prefix):]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_checkpoint(
    out: str,
    tensors: Sequence[OutputTensor],
    config: Dict[str, object],
    stem: str,
    max_shard_bytes: int,
    force: bool = False,
    sources: Sequence[str] = (),
    progress: Optional[TextIO] = sys.stderr,
) -> List[str]:
    """Write ``config.json`` and ``{stem}.safetensors`` (or shards and an index) to folder OUT.

    Returns the written file names. See the module docstring for the safety guarantees.
    """
    check_destination(out, force, sources)
    out = os.path.abspath(out)
    parent, name = os.path.dirname(out), os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_partials(parent, name)
    partial = os.path.join(parent, f".{name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        files = _write_all(partial, tensors, config, stem, max_shard_bytes, progress)
        _move_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return files


def _write_all(folder, tensors, config, stem, max_shard_bytes, progress) -> List[str]:
    shards = shard(tensors, max_shard_bytes)
    names = (
        [f"{stem}.safetensors"] if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = sum(t.nbytes for t in tensors)
    writing = Progress(total, "write", progress if total > 256 * 2**20 else None)
    checksums: Dict[str, int] = {}
    for file_name, members in zip(names, shards):
        with open(os.path.join(folder, file_name), "wb") as f:
            f.write(header_bytes([(t.name, t.dtype, t.shape) for t in members], {"format": "pt"}))
            for t in members:
                value = t.read()
                if tuple(value.shape) != tuple(t.shape):
                    raise CheckpointError(f"{t.name}: read shape {list(value.shape)}, expected {list(t.shape)}")
                data = tensor_bytes(value.to(t.dtype))
                checksums[t.name] = zlib.crc32(data)
                f.write(data)
                del value, data
                writing.advance(t.nbytes)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t.name: file_name for file_name, members in zip(names, shards) for t in members}}
        _write_json(os.path.join(folder, f"{stem}.safetensors.index.json"), index)
    _write_json(os.path.join(folder, "config.json"), config)
    _verify(folder, names, shards, checksums, Progress(total, "verify", writing.stream))
    return names + ([f"{stem}.safetensors.index.json"] if len(shards) > 1 else []) + ["config.json"]


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _verify(folder, names, shards, checksums, progress: Progress) -> None:
    """Re-read every written file: header as planned, each tensor's bytes equal to what was converted."""
    buffer = bytearray(CHUNK)
    for file_name, members in zip(names, shards):
        path = os.path.join(folder, file_name)
        records, _ = read_header(path)
        if list(records) != [t.name for t in members]:
            raise CheckpointError(f"{path}: verification failed: written tensors differ from the plan")
        with open(path, "rb") as f:
            for t in members:
                record = records[t.name]
                if record.dtype != t.dtype or record.shape != tuple(t.shape):
                    raise CheckpointError(f"{path}: verification failed for {t.name!r}: dtype or shape differs")
                f.seek(record.offset)
                crc, left = 0, record.nbytes
                view = memoryview(buffer)
                while left:
                    got = f.readinto(view[: min(CHUNK, left)])
                    if not got:
                        raise CheckpointError(f"{path}: verification failed: {t.name!r} is truncated")
                    crc = zlib.crc32(view[:got], crc)
                    left -= got
                if crc != checksums[t.name]:
                    raise CheckpointError(f"{path}: verification failed: {t.name!r} differs from the source after writing")
                progress.advance(t.nbytes)


def _move_into_place(partial: str, out: str) -> None:
    if not os.path.lexists(out):
        os.rename(partial, out)
        return
    parent, name = os.path.dirname(out), os.path.basename(out)
    replaced = os.path.join(parent, f".{name}.replaced-{os.getpid()}")
    os.rename(out, replaced)
    try:
        os.rename(partial, out)
    except BaseException:
        os.rename(replaced, out)
        raise
    shutil.rmtree(replaced, ignore_errors=True)
