"""The UMT5 text encoder's files: transformers' ``UMT5EncoderModel`` parameter names against ours, checked.

A released snapshot's ``text_encoder/`` folder holds ``config.json`` and the weights, either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``, in any floating dtype.
Each row below pairs a transformers name with ours; block rows apply under ``encoder.block.{i}.``
(theirs) and ``blocks.{i}.`` (ours). The token embedding is tied: transformers writes it as
``shared.weight``, ``encoder.embed_tokens.weight`` or both (one tensor twice).

Only names and files here, no model: :mod:`anyflow.text.encoder` passes the shapes its modules
expect and gets back where each tensor lies (a :class:`TensorRecord`), to map or to read.
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping, Tuple

from weights_convert.safetensors_io import CheckpointError, TensorRecord, read_header, read_sharded

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16")  # what the encoder computes in (float8 weights are refused)
EMBEDDING = "token_embed.weight"
EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")  # tied: either or both

# (transformers name, our name)
TOP_LEVEL_ROWS: List[Tuple[str, str]] = [("encoder.final_layer_norm.weight", "final_norm.weight")]
BLOCK_ROWS: List[Tuple[str, str]] = [
    ("layer.0.layer_norm.weight", "attn_norm.weight"),
    *[(f"layer.0.SelfAttention.{p}.weight", f"attn.{p}.weight") for p in ("q", "k", "v", "o")],
    ("layer.0.SelfAttention.relative_attention_bias.weight", "attn.position_bias.weight"),
    ("layer.1.layer_norm.weight", "ffn_norm.weight"),
    ("layer.1.DenseReluDense.wi_0.weight", "ffn.gate.weight"),
    ("layer.1.DenseReluDense.wi_1.weight", "ffn.up.weight"),
    ("layer.1.DenseReluDense.wo.weight", "ffn.down.weight"),
]


def transformers_names(num_layers: int) -> Dict[str, str]:
    """Our name -> transformers' name, for every parameter but the tied embedding."""
    names = {ours: theirs for theirs, ours in TOP_LEVEL_ROWS}
    for i in range(num_layers):
        names.update({f"blocks.{i}.{ours}": f"encoder.block.{i}.{theirs}" for theirs, ours in BLOCK_ROWS})
    return names


def weight_records(folder: str) -> Tuple[Dict[str, TensorRecord], str]:
    """Every tensor of the checkpoint in ``folder`` under transformers' names, and the file that lists them."""
    index = os.path.join(folder, INDEX_FILE)
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(index):
        return read_sharded(index), index
    if os.path.isfile(single):
        return read_header(single)[0], single
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} nor {INDEX_FILE} (a transformers UMT5EncoderModel folder "
                          f"saved as safetensors)")


def _embedding_record(records: Mapping[str, TensorRecord], listing: str) -> TensorRecord:
    present = [records[name] for name in EMBEDDING_NAMES if name in records]
    if not present:
        raise CheckpointError(f"{listing}: missing the token embedding ({' or '.join(EMBEDDING_NAMES)})")
    if len(present) == 2 and (present[0].shape, present[0].dtype) != (present[1].shape, present[1].dtype):
        a, b = present
        raise CheckpointError(f"{listing}: the tied embeddings differ: {a.name!r} {list(a.shape)} {a.dtype}, "
                              f"{b.name!r} {list(b.shape)} {b.dtype}")
    return present[0]


def text_encoder_records(folder: str, num_layers: int,
                         shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, TensorRecord]:
    """Where each of our parameters lies in the UMT5 checkpoint in ``folder``, checked.

    ``shapes`` maps each of our names to the shape the config implies. Refuses, with one line naming
    the key, its shape and its file: a missing tensor, one that is not part of a UMT5 encoder of
    ``num_layers`` blocks (a decoder's, say), a wrong shape, a dtype other than float64/32/16 or bfloat16.
    """
    records, listing = weight_records(folder)
    theirs = transformers_names(num_layers)
    found = {EMBEDDING: _embedding_record(records, listing)}
    for ours, name in theirs.items():
        if name not in records:
            raise CheckpointError(f"{listing}: missing {name!r} (a UMT5 encoder with {num_layers} blocks has it)")
        found[ours] = records[name]
    expected = set(theirs.values()) | set(EMBEDDING_NAMES)
    unexpected = sorted(set(records) - expected)
    if unexpected:
        first = records[unexpected[0]]
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{first.path}: unexpected tensor {first.name!r} {list(first.shape)}{more}: not part "
                              f"of a UMT5 encoder with {num_layers} blocks")
    if set(found) != set(shapes):
        raise ValueError(f"the name table and the model disagree: {sorted(set(found) ^ set(shapes))}")
    for ours, record in found.items():
        if record.shape != tuple(shapes[ours]):
            raise CheckpointError(f"{record.path}: {record.name!r} has shape {list(record.shape)}, the config "
                                  f"implies {list(shapes[ours])}")
        if record.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{record.path}: {record.name!r} is {record.dtype}; the encoder reads "
                                  f"{list(WEIGHT_DTYPES)}")
    return found
