"""A checkpoint's ``config.json`` as its writer published it, read into :class:`anyflow.AnyFlowConfig`.

Four classes write the configs users hold: diffusers' ``AnyFlowTransformer3DModel``,
``AnyFlowFARTransformer3DModel`` and ``WanTransformer3DModel``, and the authors' training class
``FAR_Wan_Transformer3DModel``, which wrote the released Hub snapshots (with ``qk_norm``,
``added_kv_proj_dim``, ``init_flowmap_model``, the FAR settings, ...). A config of diffusers' FAR
class, or of the authors' class with ``init_far_model: true``, describes the FAR model and is read
into :class:`AnyFlowFARConfig`; any other into :class:`AnyFlowConfig`. Each key is one of three kinds:

- ours (the fields of the config class): used;
- set aside: a key whose value leaves this model's math unchanged (the FAR settings in a
  bidirectional model's config, ``qk_norm`` across heads, ...); kept in
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
from typing import Any, Collection, Dict, List, Mapping, Optional, Tuple

from anyflow.model.config import AnyFlowConfig, AnyFlowFARConfig

from .safetensors_io import CheckpointError

AUTHORS_CLASS = "FAR_Wan_Transformer3DModel"  # writes both models; init_far_model says which
FAR_CLASS = "AnyFlowFARTransformer3DModel"
CLASSES = ("AnyFlowTransformer3DModel", FAR_CLASS, AUTHORS_CLASS, "WanTransformer3DModel")

# key -> (the values under which the writer's class computes what this model computes, what another value means)
CONSTRAINED_KEYS: Dict[str, tuple] = {
    "qk_norm": (("rms_norm_across_heads",), "this model normalises q and k with one RMSNorm across all heads"),
    "added_kv_proj_dim": ((None,), "separate image key/value projections are Wan2.1 image-to-video; "
                                   "this model is text-to-video"),
    "pos_embed_seq_len": ((None,), "a learned image position embedding (Wan2.1 first-last-frame) is not "
                                   "part of this model"),
    "init_flowmap_model": ((True,), "the writer's model then has no flow-map (dual-timestep) embedding: it is "
                                    "a plain Wan2.1 model, not AnyFlow"),
}
# Which of the two models the authors' class built (the FAR one has the compressed patch embedding).
FAR_SWITCH = "init_far_model"
# Settings of the frame-autoregressive model, which the bidirectional one never reads.
FAR_ONLY_KEYS = tuple(f.name for f in dataclasses.fields(AnyFlowFARConfig) if f.name not in
                      {g.name for g in dataclasses.fields(AnyFlowConfig)})
# Defaults of a writer's class that differ from ours, for keys its config may lack.
CLASS_DEFAULTS: Dict[str, Dict[str, Any]] = {AUTHORS_CLASS: {"gate_value": 0.0}}


def describes_far(raw: Mapping[str, Any]) -> Optional[bool]:
    """Whether a config dict describes the FAR model: by its class, or by ``init_far_model`` (the authors'
    class); None when it says neither (a config written by hand)."""
    class_name = raw.get("_class_name")
    if class_name == FAR_CLASS:
        return True
    if FAR_SWITCH in raw:
        return raw[FAR_SWITCH] is True
    return None if class_name is None else False


@dataclass(frozen=True)
class ConfigReading:
    """A config read from a file: the model's config and the keys set aside (they change nothing)."""

    config: AnyFlowConfig
    set_aside: Dict[str, Any]


def describe_keys(keys: Mapping[str, Any]) -> str:
    """``key=value, ...`` with values as JSON (``null``, ``[1, 4, 4]``), as config.json spells them."""
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(keys.items()))


def sort_keys(raw: Mapping[str, Any], source: str, ours: Collection[str], constrained: Mapping[str, tuple] = {},
              set_aside: Collection[str] = ()) -> Tuple[Dict[str, Any], Dict[str, Any], List[str]]:
    """A ``config.json`` dict sorted: (the values of ``ours``, the keys set aside, the unknown keys).

    Keys starting with ``_`` are the writer's bookkeeping and skipped. A key of ``constrained``
    (key -> (the values under which the writer's class computes what this model computes, what another
    value means)) is set aside when its value is one of them, and refused otherwise with a
    :class:`CheckpointError` naming ``source``, the key and the value (as JSON, as config.json spells it).
    The transformer's, the VAE's and the text encoder's configs are all read through it.
    """
    values: Dict[str, Any] = {}
    aside: Dict[str, Any] = {}
    unknown: List[str] = []
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        if key in ours:
            values[key] = value
        elif key in constrained:
            allowed, meaning = constrained[key]
            if not any(type(value) is type(a) and value == a for a in allowed):
                raise CheckpointError(f"{source}: {key}={json.dumps(value)} is refused: {meaning}")
            aside[key] = value
        elif key in set_aside:
            aside[key] = value
        else:
            unknown.append(key)
    return values, aside, unknown


def read_config(raw: Mapping[str, Any], source: str, far_weights: bool = False) -> ConfigReading:
    """Read a diffusers-style config dict written by any of the supported classes (see the module
    docstring) into an :class:`AnyFlowConfig`, or an :class:`AnyFlowFARConfig` where it describes
    the FAR model (``far_weights`` decides for a config that says neither). ``source`` names the
    file in errors."""
    class_name = raw.get("_class_name")
    if class_name is not None and class_name not in CLASSES:
        raise CheckpointError(
            f"{source}: _class_name={json.dumps(class_name)} is not a config this model reads; expected one of "
            f"{list(CLASSES)}"
        )
    far = describes_far(raw)
    far = far_weights if far is None else far
    config_class = AnyFlowFARConfig if far else AnyFlowConfig
    # a FAR setting left null in a FAR model's config means the default; in a bidirectional one it changes nothing
    ours = {f.name for f in dataclasses.fields(config_class)
            if not (far and f.name in FAR_ONLY_KEYS and raw.get(f.name, 0) is None)}
    values, set_aside, unknown = sort_keys(raw, source, ours, CONSTRAINED_KEYS, (FAR_SWITCH, *FAR_ONLY_KEYS))
    ours = {**CLASS_DEFAULTS.get(class_name, {}), **values}
    if unknown:
        raise CheckpointError(
            f"{source}: unknown config keys {sorted(unknown)}: not written by diffusers' AnyFlow, AnyFlow FAR or "
            f"Wan2.1 transformers nor by the authors' {AUTHORS_CLASS} (a typo?)"
        )
    try:
        config = config_class.from_dict(ours)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    return ConfigReading(config, set_aside)
