"""Writing a checkpoint safely: streamed tensor by tensor, read back and checked, then moved into place.

The output is built in a hidden ``.NAME.partial-HOST-PID`` folder beside OUT (:mod:`.partials`). Only when every file
has been written, re-read and matched tensor by tensor (CRC-32 of each tensor's bytes) is it
renamed to OUT. An existing OUT is replaced only with ``force=True``, and only after success.
A killed run leaves no OUT and its partial folder is removed by the next run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, TextIO, TypeVar

from .partials import discard, partial_path
from .safetensors_io import CheckpointError, TensorRecord, header_bytes, itemsize, read_header, tensor_bytes, torch_dtype

if TYPE_CHECKING:
    import torch

CHUNK = 1024 * 1024  # verification reads: small enough to stay in the CPU cache (1 MiB: 7 GB/s here, 64 MiB: 1 GB/s)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class OutputTensor:
    """One tensor to write: its name in the output, where it comes from, its output dtype.

    ``same_bytes_as`` names a file range holding exactly the bytes to write (a tensor renamed,
    not cast): it is then copied inside the kernel, as ``cp`` does, and checked against that range.
    """

    name: str
    read: Callable[[], "torch.Tensor"]
    dtype: str  # safetensors code
    shape: tuple
    same_bytes_as: Optional[TensorRecord] = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


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


def prefetched(items: Iterable[T], produce: Callable[[T], R]) -> Iterator[R]:
    """``produce(item)`` for each item in order, the next one computed in a background thread.

    At most two results exist at once (the one being consumed and the next), so memory stays
    bounded by twice the largest item while reading overlaps writing.
    """
    with ThreadPoolExecutor(1) as pool:
        upcoming = None
        for item in items:
            current, upcoming = upcoming, pool.submit(produce, item)
            if current is not None:
                yield current.result()
                del current
        if upcoming is not None:
            yield upcoming.result()


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


class OutputExistsError(CheckpointError):
    """OUT exists and replacing it was not asked for (``force=True``, ``--force`` on the command line)."""

    def __init__(self, out: str):
        super().__init__(f"{out}: already exists; pass force=True to replace it (it is replaced only after success)")
        self.out = out


def _within(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def check_destination(out: str, force: bool, sources: Sequence[str] = ()) -> None:
    """Refuse an existing OUT without ``force``, any source equal to or inside OUT, OUT inside a source folder,
    and OUT in a folder that does not exist (it is never created: a mistyped path fails, as ``anyflow sample
    --out`` does)."""
    real_out = os.path.realpath(out)
    for source in sources:
        real_src = os.path.realpath(source)
        if real_src == real_out or _within(real_src, real_out):
            raise CheckpointError(f"{source}: the source is {'OUT itself' if real_src == real_out else 'inside OUT'} ({out}); refused")
        if os.path.isdir(real_src) and _within(real_out, real_src):
            raise CheckpointError(f"{out}: OUT is inside the source folder {source}, which is never modified; refused")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CheckpointError(f"{out}: OUT's folder {parent} {'is not a folder' if os.path.exists(parent) else 'does not exist'}; "
                              "create it first")
    if os.path.lexists(out) and not force:
        raise OutputExistsError(out)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise CheckpointError(f"{out}: exists and is not a folder; refused")


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
    partial = partial_path(out)  # removes the partials dead processes left beside OUT first
    os.makedirs(partial)
    try:
        files = _write_all(partial, tensors, config, stem, max_shard_bytes, progress)
        _move_into_place(partial, out)
    finally:
        discard(partial)  # gone once moved into place; removed on any error
    return files


def _write_all(folder, tensors, config, stem, max_shard_bytes, progress) -> List[str]:
    shards = shard(tensors, max_shard_bytes)
    names = (
        [f"{stem}.safetensors"] if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = sum(t.nbytes for t in tensors)
    writing = Progress(total, "write", progress if total > 256 * 2**20 else None)
    checksums: Dict[str, object] = {}  # name -> CRC-32 of the bytes written, or the source range to compare
    with SourceFiles() as sources:
        for file_name, members in zip(names, shards):
            with open(os.path.join(folder, file_name), "wb", buffering=0) as f:
                f.write(header_bytes([(t.name, t.dtype, t.shape) for t in members], {"format": "pt"}))
                for t, data, crc in prefetched(members, _converted_bytes):
                    if data is None:
                        sources.copy(t.same_bytes_as, f)
                        checksums[t.name] = t.same_bytes_as
                    else:
                        checksums[t.name] = crc
                        _write_fully(f, data)
                    del data
                    writing.advance(t.nbytes)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t.name: file_name for file_name, members in zip(names, shards) for t in members}}
        _write_json(os.path.join(folder, f"{stem}.safetensors.index.json"), index)
    _write_json(os.path.join(folder, "config.json"), config)
    _verify(folder, names, shards, checksums, Progress(total, "verify", writing.stream))
    return names + ([f"{stem}.safetensors.index.json"] if len(shards) > 1 else []) + ["config.json"]


class SourceFiles:
    """Open source files, for in-kernel copies of byte ranges into the output."""

    def __init__(self):
        self.fds: Dict[str, int] = {}
        self.kernel_copy = hasattr(os, "copy_file_range")

    def __enter__(self) -> "SourceFiles":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def copy(self, record: TensorRecord, out) -> None:
        """Append ``record``'s bytes to the unbuffered file ``out``: in the kernel where it can, else read and written."""
        if self.kernel_copy:
            if record.path not in self.fds:
                self.fds[record.path] = os.open(record.path, os.O_RDONLY)
            offset, left = record.offset, record.nbytes
            try:
                while left:
                    copied = os.copy_file_range(self.fds[record.path], out.fileno(), left, offset)
                    if copied == 0:
                        raise CheckpointError(f"{record.path}: truncated while reading {record.name!r}")
                    offset += copied
                    left -= copied
                return
            except OSError:
                if left != record.nbytes:  # part written: cannot fall back within this file
                    raise
                self.kernel_copy = False
        for chunk in _chunks(record.path, record):
            _write_fully(out, chunk)


def _write_fully(out, data) -> None:
    """Write all of ``data`` to the unbuffered file ``out`` (a raw write may take only part)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[out.write(view):]


def _converted_bytes(t: OutputTensor):
    """Read one tensor, cast it to its output dtype: (tensor, its bytes, their CRC-32).

    A tensor to be copied as raw bytes is not read here: (tensor, None, None).
    """
    if t.same_bytes_as is not None:
        return t, None, None
    value = t.read()
    if tuple(value.shape) != tuple(t.shape):
        raise CheckpointError(f"{t.name}: read shape {list(value.shape)}, expected {list(t.shape)}")
    data = tensor_bytes(value.to(torch_dtype(t.dtype)))
    return t, data, zlib.crc32(data)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _verify(folder, names, shards, checksums, progress: Progress) -> None:
    """Re-read every written file: header as planned, each tensor's bytes equal to what was converted."""
    jobs = []
    for file_name, members in zip(names, shards):
        path = os.path.join(folder, file_name)
        records, _ = read_header(path)
        if list(records) != [t.name for t in members]:
            raise CheckpointError(f"{path}: verification failed: written tensors differ from the plan")
        for t in members:
            record = records[t.name]
            if record.dtype != t.dtype or record.shape != tuple(t.shape):
                raise CheckpointError(f"{path}: verification failed for {t.name!r}: dtype or shape differs")
            jobs.append((path, record, checksums[t.name]))

    def matches(job) -> bool:
        path, record, expected = job
        if isinstance(expected, TensorRecord):
            return _ranges_equal(path, record, expected)
        return _file_crc(path, record) == expected

    with ThreadPoolExecutor(2) as pool:  # two readers: one compares while the other waits on the disk
        for (path, record, _), ok in zip(jobs, pool.map(matches, jobs)):
            if not ok:
                raise CheckpointError(f"{path}: verification failed: {record.name!r} differs from the source after writing")
            progress.advance(record.nbytes)


def _chunks(path: str, record: TensorRecord) -> Iterator[bytes]:
    """A tensor's stored bytes in chunks of exactly ``min(CHUNK, left)`` bytes, read with pread
    (so two ranges of equal length chunk alike and can be compared chunk by chunk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offset, left = record.offset, record.nbytes
        while left:
            want = min(CHUNK, left)
            parts = []
            while want:
                part = os.pread(fd, want, offset)
                if not part:
                    raise CheckpointError(f"{path}: {record.name!r} is truncated (the file ends before its header says)")
                parts.append(part)
                offset += len(part)
                want -= len(part)
                left -= len(part)
            yield parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)


def _file_crc(path: str, record: TensorRecord) -> int:
    """CRC-32 of one tensor's bytes as stored in ``path``."""
    crc = 0
    for chunk in _chunks(path, record):
        crc = zlib.crc32(chunk, crc)
    return crc


def _ranges_equal(path: str, record: TensorRecord, source: TensorRecord) -> bool:
    """Whether a written tensor's bytes equal its source range, byte for byte."""
    return all(a == b for a, b in zip(_chunks(path, record), _chunks(source.path, source)))


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
