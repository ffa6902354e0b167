"""The one table between diffusers parameter names and ours.

Each row pairs a diffusers module (or parameter) name with ours; block rows apply under
``blocks.{i}.``. Rows are grouped: a group is all present or all absent in a checkpoint, and the
required groups must be present. Anything not covered by a row is an error.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Tuple

# The namings a checkpoint can use (``--from``); this module imports no torch, so CLIs can list them cheaply.
FORMATS = ("anyflow", "diffusers", "wan-diffusers", "wan-original")

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
    "far": [("far_patch_embedding", "far_patch_embed.proj", WB)],  # the FAR (causal) model's compressed patches
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


# Wan2.1 original layout (Wan-AI/Wan2.1-T2V-*) -> diffusers names. Wan has no target-time MLP:
# the AnyFlow warm start copies the source-time MLP into it (see ``sources.py``).
WAN_ORIGINAL_TOP_ROWS: Dict[str, List[Tuple[str, str, Tuple[str, ...]]]] = {
    "required": [
        ("patch_embedding", "patch_embedding", WB),
        ("time_embedding.0", "condition_embedder.time_embedder.linear_1", WB),
        ("time_embedding.2", "condition_embedder.time_embedder.linear_2", WB),
        ("time_projection.1", "condition_embedder.time_proj", WB),
        ("text_embedding.0", "condition_embedder.text_embedder.linear_1", WB),
        ("text_embedding.2", "condition_embedder.text_embedder.linear_2", WB),
        ("head.modulation", "scale_shift_table", ()),
        ("head.head", "proj_out", WB),
    ],
}
WAN_ORIGINAL_BLOCK_ROWS: Dict[str, List[Tuple[str, str, Tuple[str, ...]]]] = {
    "required": [
        ("modulation", "scale_shift_table", ()),
        *[
            (f"{wan}.{proj}", f"{theirs}.{diffusers_proj}", WB)
            for wan, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
            for proj, diffusers_proj in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))
        ],
        *[
            (f"{wan}.{norm}", f"{theirs}.{norm}", ("weight",))
            for wan, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
            for norm in ("norm_q", "norm_k")
        ],
        ("ffn.0", "ffn.net.0.proj", WB),
        ("ffn.2", "ffn.net.2", WB),
    ],
    "cross_attn_norm": [("norm3", "norm2", WB)],
}
WAN_ORIGINAL_TOP = {group: _expand(rows) for group, rows in WAN_ORIGINAL_TOP_ROWS.items()}
WAN_ORIGINAL_PER_BLOCK = {group: _expand(rows) for group, rows in WAN_ORIGINAL_BLOCK_ROWS.items()}

# The Wan2.1 diffusers layout lacks exactly these (the target-time MLP): diffusers name -> the one copied.
WAN_WARM_START_COPIES = {
    f"condition_embedder.delta_embedder.{layer}.{p}": f"condition_embedder.time_embedder.{layer}.{p}"
    for layer in ("linear_1", "linear_2")
    for p in WB
}
