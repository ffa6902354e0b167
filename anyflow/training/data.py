"""Training data: a folder of precomputed VAE latents and UMT5 prompt embeddings, and the batches drawn from it.

The folder (``scripts/prepare_training_data.py`` makes one from videos and captions,
:class:`DatasetWriter` from tensors; any other tool may write the same):

    DATA/
      dataset.json                          the index, below
      shard_00000.safetensors               "latents" (n, C, F, h, w), "prompt_embeds" (n, S, D)
      shard_00001.safetensors               ...
      negative_prompt_embeds.safetensors    "negative_prompt_embeds" (1, S, D); optional

    dataset.json: {"format": "anyflow-training-data", "version": 1,
                   "latent_shape": [C, F, h, w], "text_shape": [S, D],
                   "shards": [{"file": "shard_00000.safetensors", "samples": n}, ...]}

Latents are stored as every file of this project stores them, in the diffusers layout (C before
F), as the VAE's normalised posterior mean; they are read as (F, C, h, w). Prompt embeddings
are zero past each prompt's tokens and padded to S (512, as the pipelines make them). The
negative embedding (the authors' ``negative_embedding_path``) replaces dropped prompts and is the
unconditional side of guidance; a config that needs it refuses a folder without it.

Every shard's header is checked against the index when the folder opens (headers only), so a
wrong shape is named before training starts. The order of samples is a permutation drawn per
epoch from the seed: batch k of a run is a function of (seed, k) alone, so a resumed run draws
exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

INDEX = "dataset.json"
FORMAT = "anyflow-training-data"
NEGATIVE_FILE = "negative_prompt_embeds.safetensors"
LATENTS_KEY, PROMPT_KEY, NEGATIVE_KEY = "latents", "prompt_embeds", "negative_prompt_embeds"


@dataclass
class Shard:
    path: str
    samples: int
    latents: object  # the tensors' records (weights_convert.safetensors_io.TensorRecord): rows are read on demand
    prompt_embeds: object


class LatentDataset:
    """The samples of a training-data folder: ``dataset[i]`` is (latents (F, C, h, w), prompt_embeds (S, D))."""

    def __init__(self, root: str):
        from weights_convert.safetensors_io import read_header, read_json_object

        if not os.path.isdir(root):
            raise ValueError(f"training data {root}: no such folder (make one with scripts/prepare_training_data.py)")
        index_path = os.path.join(root, INDEX)
        if not os.path.isfile(index_path):
            raise ValueError(f"training data {root}: no {INDEX} in it (make the folder with "
                             "scripts/prepare_training_data.py; the layout is in anyflow/training/data.py)")
        index = read_json_object(index_path, INDEX)  # a CheckpointError (a ValueError) names the file
        if index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: format must be {FORMAT!r}, got {index.get('format')!r}")
        self.root = root
        self.latent_shape = _shape(index, "latent_shape", 4, index_path)  # (C, F, h, w), as stored
        self.text_shape = _shape(index, "text_shape", 2, index_path)  # (S, D)
        shards = index.get("shards")
        if not isinstance(shards, list) or not shards:
            raise ValueError(f"{index_path}: 'shards' must be a non-empty list")
        self.shards: List[Shard] = []
        for entry in shards:
            if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("samples"), int)
                    and entry["samples"] > 0):
                raise ValueError(f"{index_path}: each shard must be {{\"file\": NAME, \"samples\": N > 0}}, got {entry!r}")
            path = os.path.join(root, entry["file"])
            if not os.path.isfile(path):
                raise ValueError(f"{index_path} lists {entry['file']}, which is not in the folder")
            tensors, _ = read_header(path)
            expected = {LATENTS_KEY: (entry["samples"], *self.latent_shape), PROMPT_KEY: (entry["samples"], *self.text_shape)}
            for key, shape in expected.items():
                if key not in tensors:
                    raise ValueError(f"{path}: no '{key}' tensor (it holds {sorted(tensors)})")
                if tuple(tensors[key].shape) != shape:
                    raise ValueError(f"{path}: '{key}' is {tuple(tensors[key].shape)}, {INDEX} says {shape}")
            self.shards.append(Shard(path, entry["samples"], tensors[LATENTS_KEY], tensors[PROMPT_KEY]))
        self._starts = [0]
        for shard in self.shards:
            self._starts.append(self._starts[-1] + shard.samples)
        self.negative_path = os.path.join(root, NEGATIVE_FILE)
        if os.path.isfile(self.negative_path):
            tensors, _ = read_header(self.negative_path)
            if NEGATIVE_KEY not in tensors or tuple(tensors[NEGATIVE_KEY].shape) != (1, *self.text_shape):
                found = tuple(tensors[NEGATIVE_KEY].shape) if NEGATIVE_KEY in tensors else sorted(tensors)
                raise ValueError(f"{self.negative_path}: '{NEGATIVE_KEY}' must be {(1, *self.text_shape)}, got {found}")
        else:
            self.negative_path = None

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def frame_shape(self) -> Tuple[int, int, int, int]:
        """One sample's latents as read, (F, C, h, w)."""
        c, f, h, w = self.latent_shape
        return f, c, h, w

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        k = next(k for k in range(len(self.shards)) if i < self._starts[k + 1])
        shard, row = self.shards[k], i - self._starts[k]
        latents = shard.latents.read_rows(row, row + 1)[0]  # (C, F, h, w)
        text = shard.prompt_embeds.read_rows(row, row + 1)[0]  # (S, D)
        return latents.transpose(0, 1), text

    def negative_embedding(self) -> Optional[torch.Tensor]:
        """The negative prompt's embedding (1, S, D), or None when the folder has none."""
        if self.negative_path is None:
            return None
        from safetensors.torch import load_file

        return load_file(self.negative_path)[NEGATIVE_KEY]

    def check_model(self, config, data_root: str) -> None:
        """The latents' channels and the embeddings' width (and a FAR model's frames) against the model's ``config``."""
        channels, width = self.latent_shape[0], self.text_shape[1]
        if channels != config.in_channels:
            raise ValueError(f"training data {data_root}: latents have {channels} channels, the model takes "
                             f"in_channels={config.in_channels}")
        if width != config.text_dim:
            raise ValueError(f"training data {data_root}: prompt embeddings are {width} wide, the model takes "
                             f"text_dim={config.text_dim}")
        chunks = getattr(config, "chunk_partition", None)
        if chunks is not None and self.latent_shape[1] < sum(chunks):
            raise ValueError(f"training data {data_root}: {self.latent_shape[1]} latent frames, the FAR model's "
                             f"chunk_partition {list(chunks)} needs {sum(chunks)}")


class BatchSchedule:
    """Which samples make batch k of a run, for each process.

    Epoch e visits the samples in the order ``randperm(N)`` drawn from seed + e; it is cut into
    global batches of ``batch_size x processes`` (the remainder dropped, as the authors' loader
    does) and process p takes the p-th slice of each.
    """

    def __init__(self, dataset: LatentDataset, batch_size: int, seed: int, rank: int = 0, processes: int = 1):
        self.dataset, self.batch_size, self.seed, self.rank = dataset, batch_size, seed, rank
        global_batch = batch_size * processes
        self.batches_per_epoch = len(dataset) // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"training data {dataset.root}: {len(dataset)} samples, fewer than one global batch of "
                             f"{global_batch} (batch_size_per_gpu {batch_size} x {processes} processes)")
        self.global_batch = global_batch

    def indices(self, k: int) -> List[int]:
        """This process's sample indices of batch ``k`` (k counts from 0 over the whole run)."""
        epoch, position = divmod(k, self.batches_per_epoch)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
        start = position * self.global_batch + self.rank * self.batch_size
        return order[start : start + self.batch_size].tolist()

    def batch(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Batch ``k``: latents (B, F, C, h, w) and prompt embeddings (B, S, D), as stored (dtype, CPU)."""
        samples = [self.dataset[i] for i in self.indices(k)]
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


class DatasetWriter:
    """Writes a training-data folder sample by sample, ``shard_size`` samples a shard.

        with DatasetWriter("data/latents", negative=negative_embeds) as writer:
            writer.add(latents, prompt_embeds, caption)       # (F, C, h, w), (S, D)

    or, without ``with``, ``writer.close()`` after the last :meth:`add`. The folder is built under a
    hidden partial name and renamed to ``root`` by :meth:`close` (which the block calls when it ends
    without an error); ``root`` must not exist, or be an empty folder. A writer that ends otherwise (an
    error in the block, or dropped unclosed: garbage-collected, or the interpreter exits) removes its
    partial folder and writes nothing. Every value must be finite; the captions are kept in each shard's
    metadata.
    """

    def __init__(self, root: str, negative: Optional[torch.Tensor] = None, shard_size: int = 64):
        from weights_convert.partials import discard, partial_path

        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"DatasetWriter shard_size: must be a positive int (samples a shard), got {shard_size!r}")
        if os.path.exists(root) and not os.path.isdir(root):
            raise ValueError(f"DatasetWriter root {root}: a file, not a folder; choose a new folder")
        if os.path.isdir(root) and os.listdir(root):
            raise ValueError(f"{root} exists and is not empty; choose a new folder")
        if not os.path.isdir(os.path.dirname(os.path.abspath(root))):
            raise ValueError(f"{root}: its parent folder does not exist")
        if negative is not None:
            _check_values("DatasetWriter negative", negative)
        self.root, self.negative, self.shard_size = root, negative, shard_size
        self.partial = partial_path(root.rstrip(os.sep))
        os.makedirs(self.partial)
        self._discard = weakref.finalize(self, discard, self.partial)  # run by close, an error, or at last
        self.closed = False
        self.pending: List[Tuple[torch.Tensor, torch.Tensor, str]] = []
        self.entries: List[dict] = []
        self.latent_shape = self.text_shape = None

    def add(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, caption: str = "") -> None:
        """One sample: latents (F, C, h, w) and prompt embeddings (S, D), each the shape of the first sample's,
        every value finite."""
        sample = f"DatasetWriter sample {len(self.entries) * self.shard_size + len(self.pending)}"
        if self.closed:
            raise ValueError(f"{sample}: the writer of {self.root} is closed; add every sample before close()")
        _check_values(f"{sample}: latents", latents)
        _check_values(f"{sample}: prompt_embeds", prompt_embeds)
        if self.latent_shape is None:
            self.latent_shape, self.text_shape = tuple(latents.shape), tuple(prompt_embeds.shape)
        if tuple(latents.shape) != self.latent_shape or tuple(prompt_embeds.shape) != self.text_shape:
            raise ValueError(f"{sample}: latents {tuple(latents.shape)} and prompt_embeds {tuple(prompt_embeds.shape)}, "
                             f"the first sample had {self.latent_shape} and {self.text_shape}")
        self.pending.append((latents.detach().cpu(), prompt_embeds.detach().cpu(), caption))
        if len(self.pending) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        from weights_convert.safetensors_io import write_file

        if not self.pending:
            return
        name = f"shard_{len(self.entries):05d}.safetensors"
        latents = torch.stack([p[0] for p in self.pending]).transpose(1, 2)  # (n, C, F, h, w)
        text = torch.stack([p[1] for p in self.pending])  # (n, S, D)
        captions = json.dumps([p[2] for p in self.pending], ensure_ascii=False)
        write_file(os.path.join(self.partial, name), [(LATENTS_KEY, latents), (PROMPT_KEY, text)], {"captions": captions})
        self.entries.append({"file": name, "samples": len(self.pending)})
        self.pending = []

    def close(self) -> None:
        """Write the last shard, the negative embedding and the index, and rename the folder to ``root``
        (ValueError when no sample was added). Afterwards, done or not, no partial folder is left."""
        from weights_convert.safetensors_io import write_file

        if self.closed:
            return
        self.closed = True
        try:
            self._flush()
            if not self.entries:
                raise ValueError(f"DatasetWriter {self.root}: no samples to write")
            if self.negative is not None:
                if self.negative.numel() != math.prod(self.text_shape):
                    raise ValueError(f"DatasetWriter negative: {tuple(self.negative.shape)}, the prompt embeddings "
                                     f"are {self.text_shape}")
                negative = self.negative.detach().cpu().reshape(1, *self.text_shape)  # (1, S, D)
                write_file(os.path.join(self.partial, NEGATIVE_FILE), [(NEGATIVE_KEY, negative)])
            f, c, h, w = self.latent_shape
            index = {"format": FORMAT, "version": 1, "latent_shape": [c, f, h, w], "text_shape": list(self.text_shape),
                     "shards": self.entries}
            with open(os.path.join(self.partial, INDEX), "w") as out:
                json.dump(index, out, indent=2)
            if os.path.isdir(self.root):
                os.rmdir(self.root)  # empty, checked when the writer was made
            os.rename(self.partial, self.root)
        finally:
            self._discard()

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.closed = True
            self._discard()


def _check_values(what: str, tensor: torch.Tensor) -> None:
    """A floating-point tensor with every value finite, or one line naming ``what``."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{what}: must be a floating-point tensor, got {got}")
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ValueError(f"{what}: {bad} of {tensor.numel()} values are NaN or infinite")


def _shape(index: dict, key: str, dims: int, where: str) -> Tuple[int, ...]:
    value = index.get(key)
    if not (isinstance(value, list) and len(value) == dims and all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"{where}: '{key}' must be a list of {dims} positive ints, got {value!r}")
    return tuple(value)
