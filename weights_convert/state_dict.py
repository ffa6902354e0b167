"""Renaming whole state dicts between the diffusers layout and ours, checked against the table."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Tuple

from .names import PER_BLOCK, TOP_LEVEL, WAN_ORIGINAL_PER_BLOCK, WAN_ORIGINAL_TOP, invert

if TYPE_CHECKING:
    import torch

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_MAX_LISTED = 20


class KeyMismatchError(ValueError):
    """A checkpoint's keys do not match the name table (unmapped, missing or partial groups)."""


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def _tables(direction: str):
    if direction == "to_anyflow":
        return TOP_LEVEL, PER_BLOCK
    if direction == "to_diffusers":
        return invert(TOP_LEVEL), invert(PER_BLOCK)
    if direction == "wan_original_to_diffusers":
        return WAN_ORIGINAL_TOP, WAN_ORIGINAL_PER_BLOCK
    raise ValueError(f"direction must be 'to_anyflow', 'to_diffusers' or 'wan_original_to_diffusers', got {direction!r}")


def _lookup(key: str, top, per_block) -> Optional[Tuple[str, str, Optional[int], str]]:
    """(mapped name, row group, block index or None, name within the block or top level) of one key, or None."""
    match = _BLOCK_KEY.fullmatch(key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        group = next((g for g, names in per_block.items() if rest in names), None)
        if group is not None:
            return f"blocks.{index}.{per_block[group][rest]}", group, index, rest
    group = next((g for g, names in top.items() if key in names), None)
    return None if group is None else (top[group][key], group, None, key)


def rename_key(key: str, direction: str = "to_anyflow") -> Optional[str]:
    """One parameter name on the other side (see :func:`rename_keys`), or None where no row maps it."""
    found = _lookup(key, *_tables(direction))
    return None if found is None else found[0]


def rename_keys(keys: Iterable[str], direction: str = "to_anyflow") -> Dict[str, str]:
    """Map every key to its name on the other side.

    ``direction`` is "to_anyflow" (diffusers -> ours), "to_diffusers" (ours -> diffusers) or
    "wan_original_to_diffusers" (Wan2.1 original names -> diffusers).

    Raises :class:`KeyMismatchError` listing unmapped keys, missing required keys and groups
    that are only partly present (for example an image projection without its second norm).
    """
    top, per_block = _tables(direction)
    mapping: Dict[str, str] = {}
    unmapped: List[str] = []
    seen_top: Dict[str, set] = {group: set() for group in top}
    seen_blocks: Dict[int, Dict[str, set]] = {}
    for key in keys:
        found = _lookup(key, top, per_block)
        if found is None:
            unmapped.append(key)
            continue
        mapping[key], group, index, name = found
        if index is None:
            seen_top[group].add(name)
        else:
            seen_blocks.setdefault(index, {g: set() for g in per_block})[group].add(name)

    problems = []
    if unmapped:
        problems.append(f"unmapped keys: {_listing(unmapped)}")
    missing = []
    for group, names in top.items():
        if group == "required" or seen_top[group]:
            missing += [name for name in names if name not in seen_top[group]]
    indices = sorted(seen_blocks)
    if indices != list(range(len(indices))):
        problems.append(f"block indices are not 0..N-1: {indices}")
    for group, names in per_block.items():
        with_group = [i for i in indices if seen_blocks[i][group]]
        if group != "required" and 0 < len(with_group) < len(indices):
            problems.append(f"blocks {with_group} have {group} parameters but blocks "
                            f"{sorted(set(indices) - set(with_group))} do not")
        for i in indices if group == "required" else with_group:
            missing += [f"blocks.{i}.{name}" for name in names if name not in seen_blocks[i][group]]
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if not indices and not unmapped:
        problems.append("no transformer blocks found")
    if problems:
        raise KeyMismatchError("; ".join(problems))
    return mapping


def convert_state_dict(state_dict: Mapping[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
    """A diffusers-named AnyFlow state dict -> ours (same tensors, renamed).

    The result loads into :class:`anyflow.AnyFlowTransformer3DModel` with ``strict=True``.
    """
    mapping = rename_keys(state_dict.keys(), "to_anyflow")
    return {mapping[key]: tensor for key, tensor in state_dict.items()}


def export_state_dict(state_dict: Mapping[str, "torch.Tensor"], target: str = "diffusers") -> Dict[str, "torch.Tensor"]:
    """Our state dict -> ``target``'s names; the exact inverse of :func:`convert_state_dict`."""
    if target != "diffusers":
        raise ValueError(f"target must be 'diffusers', got {target!r}")
    mapping = rename_keys(state_dict.keys(), "to_diffusers")
    return {mapping[key]: tensor for key, tensor in state_dict.items()}
