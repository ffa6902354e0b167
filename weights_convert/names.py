"""The one table between diffusers parameter names and ours.

Each row pairs a diffusers module (or parameter) name with ours; block rows apply under
``blocks.{i}.``. Rows are grouped: a group is all present or all absent in a checkpoint, and the
required groups must be present. Anything not covered by a row is an error.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Tuple

WB = ("weight", "bias")

# (diffusers name, our name, parameter suffixes); a row without suffixes names a parameter itself.
TOP_LEVEL_ROWS: Dict[str, List[Tuple[str, str, Tuple[str, ...]]]] = {
    "required": [
        ("patch_embedding", "patch_embed.proj", WB),
        ("condition_embedder.time_embedder.linear_1", "time_embed.source_time_mlp.fc_in", WB),
        ("condition_embedder.time_embedder.linear_2", "time_embed.source_time_mlp.fc_out", WB),
        ("condition_embedder.delta_embedder.linear_1", "time_embed.target_time_mlp.fc_in", WB),
        ("condition_embedder.delta_embedder.linear_2", "time_embed.target_time_mlp.fc_out", WB),
        ("condition_embedder.time_proj", "time_embed.modulation_proj", WB),
        ("condition_embedder.text_embedder.linear_1", "text_proj.fc_in", WB),
        ("condition_embedder.text_embedder.linear_2", "text_proj.fc_out", WB),
        ("scale_shift_table", "head.modulation", ()),
        ("proj_out", "head.proj", WB),
    ],
    "image": [
        ("condition_embedder.image_embedder.norm1", "image_proj.norm_in", WB),
        ("condition_embedder.image_embedder.ff.net.0.proj", "image_proj.fc_in", WB),
        ("condition_embedder.image_embedder.ff.net.2", "image_proj.fc_out", WB),
        ("condition_embedder.image_embedder.norm2", "image_proj.norm_out", WB),
    ],
}

BLOCK_ROWS: Dict[str, List[Tuple[str, str, Tuple[str, ...]]]] = {
    "required": [
        ("scale_shift_table", "modulation", ()),
        *[
            (f"{theirs}.{proj}", f"{ours}.{mine}", WB)
            for theirs, ours in (("attn1", "self_attn"), ("attn2", "cross_attn"))
            for proj, mine in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))
        ],
        *[
            (f"{theirs}.{norm}", f"{ours}.{norm}", ("weight",))
            for theirs, ours in (("attn1", "self_attn"), ("attn2", "cross_attn"))
            for norm in ("norm_q", "norm_k")
        ],
        ("ffn.net.0.proj", "ffn.fc_in", WB),
        ("ffn.net.2", "ffn.fc_out", WB),
    ],
    "cross_attn_norm": [("norm2", "cross_attn_norm", WB)],
}


def _expand(rows: Iterable[Tuple[str, str, Tuple[str, ...]]]) -> Dict[str, str]:
    """Rows -> {diffusers parameter name: our parameter name}."""
    out = {}
    for theirs, ours, suffixes in rows:
        if suffixes:
            out.update({f"{theirs}.{s}": f"{ours}.{s}" for s in suffixes})
        else:
            out[theirs] = ours
    return out


TOP_LEVEL = {group: _expand(rows) for group, rows in TOP_LEVEL_ROWS.items()}
PER_BLOCK = {group: _expand(rows) for group, rows in BLOCK_ROWS.items()}


def invert(table: Mapping[str, Mapping[str, str]]) -> Dict[str, Dict[str, str]]:
    """Swap the direction of a grouped table."""
    return {group: {v: k for k, v in names.items()} for group, names in table.items()}
