"""A checkpoint's ``config.json`` as its writer published it, read into :class:`anyflow.AnyFlowConfig`.

Four classes write the configs users hold: diffusers' ``AnyFlowTransformer3DModel``,
``AnyFlowFARTransformer3DModel`` and ``WanTransformer3DModel``, and the authors' training class
``FAR_Wan_Transformer3DModel``, which wrote the released Hub snapshots (with ``qk_norm``,
``added_kv_proj_dim``, ``init_flowmap_model``, the FAR settings, ...). Each key they write is one
of three kinds:

- ours (the fields of :class:`AnyFlowConfig`): used;
- set aside: a key whose value leaves this model's math unchanged; kept in
  :attr:`ConfigReading.set_aside`, so that ``inspect`` and the converter can list it;
- refused: a value under which the writer's class computes something else than this model
  (``qk_norm`` other than one RMSNorm across heads, an ``added_kv_proj_dim``, ...); the error
  names key and value.

A key none of those classes writes is a typo and refused. Keys starting with ``_`` are the
writer's bookkeeping (``_class_name``, ``_diffusers_version``, ``_name_or_path``) and ignored,
except ``_class_name``, which must name one of the classes above.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Mapping

from anyflow.config import AnyFlowConfig

from .safetensors_io import CheckpointError

AUTHORS_CLASS = "FAR_Wan_Transformer3DModel"
BIDIRECTIONAL_CLASSES = ("AnyFlowTransformer3DModel", AUTHORS_CLASS, "WanTransformer3DModel")
FAR_CLASSES = ("AnyFlowFARTransformer3DModel",)

# key -> (the values under which the writer's class computes what this model computes, what another value means)
CONSTRAINED_KEYS: Dict[str, tuple] = {
    "qk_norm": (("rms_norm_across_heads",), "this model normalises q and k with one RMSNorm across all heads"),
    "added_kv_proj_dim": ((None,), "separate image key/value projections are Wan2.1 image-to-video; "
                                   "this model is text-to-video"),
    "pos_embed_seq_len": ((None,), "a learned image position embedding (Wan2.1 first-last-frame) is not "
                                   "part of this model"),
    "init_flowmap_model": ((True,), "the writer's model then has no flow-map (dual-timestep) embedding: it is "
                                    "a plain Wan2.1 model, not AnyFlow"),
    "init_far_model": ((False,), "the writer's model is then the FAR (causal) one"),
}
# Settings of the frame-autoregressive model, which the bidirectional one never reads.
FAR_ONLY_KEYS = ("compressed_patch_size", "full_chunk_limit", "chunk_partition")
# Defaults of a writer's class that differ from ours, for keys its config may lack.
CLASS_DEFAULTS: Dict[str, Dict[str, Any]] = {AUTHORS_CLASS: {"gate_value": 0.0}}

OUR_KEYS = tuple(f.name for f in dataclasses.fields(AnyFlowConfig))


def far_refusal(where: str, evidence: str) -> CheckpointError:
    """The error for an AnyFlow FAR checkpoint given to the bidirectional model."""
    return CheckpointError(
        f"{where}: this is an AnyFlow FAR (causal, frame-autoregressive) checkpoint ({evidence}); "
        "this model is the bidirectional AnyFlow transformer and does not take it"
    )


@dataclass(frozen=True)
class ConfigReading:
    """A config read from a file: the model's config and the keys set aside (they change nothing)."""

    config: AnyFlowConfig
    set_aside: Dict[str, Any]


def describe_keys(keys: Mapping[str, Any]) -> str:
    """``key=value, ...`` with values as JSON (``null``, ``[1, 4, 4]``), as config.json spells them."""
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(keys.items()))


def read_config(raw: Mapping[str, Any], source: str) -> ConfigReading:
    """Read a diffusers-style config dict written by any of the supported classes (see the module
    docstring). ``source`` names the file in errors."""
    class_name = raw.get("_class_name")
    if class_name in FAR_CLASSES or raw.get("init_far_model") is True:
        evidence = f"_class_name={json.dumps(class_name)}" if class_name in FAR_CLASSES else "init_far_model=true"
        raise far_refusal(source, evidence)
    if class_name is not None and class_name not in BIDIRECTIONAL_CLASSES:
        raise CheckpointError(
            f"{source}: _class_name={json.dumps(class_name)} is not a config this model reads; expected one of "
            f"{list(BIDIRECTIONAL_CLASSES)}"
        )
    ours: Dict[str, Any] = dict(CLASS_DEFAULTS.get(class_name, {}))
    set_aside: Dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        if key in OUR_KEYS:
            ours[key] = value
        elif key in CONSTRAINED_KEYS:
            allowed, meaning = CONSTRAINED_KEYS[key]
            if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
                raise CheckpointError(f"{source}: {key}={json.dumps(value)} is refused: {meaning}")
            set_aside[key] = value
        elif key in FAR_ONLY_KEYS:
            set_aside[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{source}: unknown config keys {sorted(unknown)}: not written by diffusers' AnyFlow, AnyFlow FAR or "
            f"Wan2.1 transformers nor by the authors' {AUTHORS_CLASS} (a typo?)"
        )
    try:
        config = AnyFlowConfig.from_dict(ours)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    return ConfigReading(config, set_aside)
