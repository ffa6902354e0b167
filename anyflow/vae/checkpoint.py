"""The Wan2.1 VAE's checkpoints as users hold them, read into (config, our-named tensors), checked.

Layouts: a diffusers ``vae/`` folder (``config.json`` and ``diffusion_pytorch_model.safetensors``,
or shards with their index), a pipeline snapshot holding one, a single ``.safetensors`` file, and
Wan's original ``Wan2.1_VAE.pth`` (a bare state dict, read with ``weights_only=True``). Names are
recognised from the keys and mapped by :mod:`.names`; every name and shape is checked against
the config before a tensor is read, and each error is one line naming the file and the key.

``config.json`` keys are of three kinds, as for the transformer (:mod:`weights_convert.configs`): this model's
(the fields of :class:`WanVAEConfig`), set aside (they change nothing at inference), or refused
(the writer's class would compute something else: the Wan2.2 VAEs, attention that diffusers and
Wan place differently).
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Union

from weights_convert.pt_files import PT_SUFFIXES, InMemoryTensor, load_pt
from weights_convert.safetensors_io import (
    FLOAT_DTYPES, CheckpointError, TensorRecord, read_header, read_json_object, read_sharded, torch_dtype,
)
from weights_convert.configs import sort_keys
from weights_convert.sources import checked_path, weight_file_kind

from .config import WanVAEConfig
from .names import vae_names

if TYPE_CHECKING:
    import torch

CLASS_NAME = "AutoencoderKLWan"
# key -> (the values under which diffusers' class computes what this model computes, what another value means)
CONSTRAINED_KEYS: Dict[str, Tuple[tuple, str]] = {
    "is_residual": ((False,), "a Wan2.2 VAE (residual down/up blocks); this model is the Wan2.1 VAE"),
    "patch_size": ((None, 1), "a Wan2.2 VAE (pixels patchified before the encoder); this model is the Wan2.1 VAE"),
    "attn_scales": (([],), "attention inside the levels, which diffusers puts in the encoder only and Wan in both; "
                           "no released Wan2.1 VAE has it"),
    "clip_output": ((True,), "a decoder whose output is not clamped to [-1, 1]; this one clamps, as Wan2.1's"),
}
# Harmless at inference: dropout is the identity there.
SET_ASIDE_KEYS = ("dropout",)
# Derived from the layers; a config that states another value describes another network.
DERIVED_KEYS = {"scale_factor_spatial": "spatial_stride", "scale_factor_temporal": "time_stride"}


@dataclass(frozen=True)
class VAEConfigReading:
    """A ``vae/config.json`` read: the config and the keys set aside."""

    config: WanVAEConfig
    set_aside: Dict[str, Any] = field(default_factory=dict)


def read_vae_config(raw: Mapping[str, Any], source: str) -> VAEConfigReading:
    """A diffusers ``AutoencoderKLWan`` config dict -> :class:`WanVAEConfig`; ``source`` names the file in errors."""
    class_name = raw.get("_class_name")
    if class_name is not None and class_name != CLASS_NAME:
        raise CheckpointError(f"{source}: _class_name={json.dumps(class_name)}; a Wan VAE config says {CLASS_NAME!r}")
    kwargs, set_aside, unknown = sort_keys(raw, source, WanVAEConfig.__dataclass_fields__, CONSTRAINED_KEYS,
                                           SET_ASIDE_KEYS + tuple(DERIVED_KEYS))
    if unknown:
        raise CheckpointError(f"{source}: unknown config keys {sorted(unknown)}: not written by diffusers' {CLASS_NAME}")
    try:
        config = WanVAEConfig.from_dict(kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    for key in [k for k in DERIVED_KEYS if k in set_aside]:
        value, implied = set_aside[key], getattr(config, DERIVED_KEYS[key])
        if value is not None and value != implied:
            raise CheckpointError(f"{source}: {key}={json.dumps(value)} disagrees with the layers, which give {implied} "
                                  f"(dim_mult {list(config.dim_mult)}, temperal_downsample "
                                  f"{list(config.temperal_downsample)})")
    return VAEConfigReading(config, set_aside)


@dataclass
class VAECheckpoint:
    """A recognised VAE checkpoint: its layout, files, config, and lazy tensors under our names."""

    path: str
    layout: str  # "diffusers" or "wan"
    files: List[str]
    config: WanVAEConfig
    tensors: Dict[str, Any]  # our name -> safetensors record or in-memory tensor
    config_file: Optional[str] = None
    set_aside: Dict[str, Any] = field(default_factory=dict)


def locate(path: str) -> Tuple[str, List[str], Optional[str]]:
    """(container, weight files, config.json or None) of a VAE folder, snapshot or file."""
    path = checked_path(path, "the VAE checkpoint")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "vae")) and os.path.isfile(os.path.join(path, "model_index.json")):
            path = os.path.join(path, "vae")  # a pipeline snapshot
        config = os.path.join(path, "config.json")
        config = config if os.path.isfile(config) else None
        names = sorted(os.listdir(path))
        indexes = [n for n in names if n.endswith(".safetensors.index.json")]
        weights = [n for n in names if n.endswith(".safetensors") or n.endswith(PT_SUFFIXES)]
        if len(indexes) == 1:
            return "sharded safetensors", [os.path.join(path, indexes[0])], config
        if len(indexes) > 1 or len(weights) != 1:
            raise CheckpointError(f"{path}: expected one VAE weight file (.safetensors, .pth) or one "
                                  f"*.safetensors.index.json, found {indexes + weights}")
        path = os.path.join(path, weights[0])
    else:
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        config = beside if os.path.isfile(beside) and path.endswith(".safetensors") else None
    kind = weight_file_kind(path)
    if kind is None:
        raise CheckpointError(f"{path}: not a VAE folder, .safetensors, .safetensors.index.json or .pth file")
    return kind, [path], None if kind == "torch .pt" else config


def open_vae_checkpoint(path: str, config: Optional[WanVAEConfig] = None) -> VAECheckpoint:
    """Locate, recognise and check the checkpoint at ``path`` without reading a tensor (a ``.pth`` is
    loaded, mapped where torch can). ``config`` is for weights without a ``config.json`` (else the
    released Wan2.1 VAE's is assumed) and overrides one that is there."""
    container, files, config_file = locate(path)
    set_aside: Dict[str, Any] = {}
    if config is None and config_file is not None:
        reading = read_vae_config(read_json_object(config_file, "VAE config"), config_file)
        config, set_aside = reading.config, reading.set_aside
    elif config is None:
        config = WanVAEConfig()
    if container == "sharded safetensors":
        records: Dict[str, Any] = dict(read_sharded(files[0]))
    elif container == "safetensors":
        records = dict(read_header(files[0])[0])
    else:
        records = dict(load_pt(files[0]))
    where = files[0]
    layout = _detect_layout(records, where)
    table = vae_names(config)
    unexpected = sorted(set(records) - {row.name(layout) for row in table})
    if unexpected:
        name = unexpected[0]
        raise CheckpointError(f"{getattr(records[name], 'path', where)}: unexpected key {name!r} "
                              f"{list(records[name].shape)}: not a parameter of the Wan VAE with {_describe(config)} "
                              f"({layout} names)")
    missing = [row.name(layout) for row in table if row.name(layout) not in records]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing key {missing[0]!r}{more} of the Wan VAE with {_describe(config)} "
                              f"({layout} names)")
    for row in table:
        record = records[row.name(layout)]
        file = getattr(record, "path", where)  # the shard, for sharded checkpoints
        if record.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{file}: {row.name(layout)!r} is {record.dtype}, not a floating point tensor")
        if tuple(record.shape) != row.shape:
            raise CheckpointError(f"{file}: {row.name(layout)!r} has shape {list(record.shape)}, the config implies "
                                  f"{list(row.shape)} ({_describe(config)})")
    tensors = {row.ours: records[row.name(layout)] for row in table}
    return VAECheckpoint(path, layout, files, config, tensors, config_file, set_aside)


def load_vae_checkpoint(path: str, dtype: Union[str, "torch.dtype", None] = None,
                        device: Union[str, "torch.device"] = "cpu", config: Optional[WanVAEConfig] = None
                        ) -> Tuple[WanVAEConfig, Dict[str, "torch.Tensor"]]:
    """(config, state dict under our names) of any VAE checkpoint :func:`open_vae_checkpoint` reads.

    Safetensors are mapped copy-on-write, each tensor on its own (:func:`map_tensor`): a tensor that
    needs no cast or move is read from disk when first used. ``dtype=None`` keeps the file's.
    """
    import torch

    from ..runtime.devices import resolve_dtype

    checkpoint = open_vae_checkpoint(path, config)
    target = resolve_dtype(dtype)
    device = torch.device(device)
    state = {}
    for name, lazy in checkpoint.tensors.items():
        tensor = lazy.read() if isinstance(lazy, InMemoryTensor) else map_tensor(lazy)
        state[name] = tensor.to(device=device, dtype=tensor.dtype if target is None else target)
    return checkpoint.config, state


def map_tensor(record: TensorRecord) -> "torch.Tensor":
    """A safetensors tensor on its own private (copy-on-write) mapping of its bytes: nothing is read
    until used, and the mapping goes with the tensor. (One mapping of the whole file would keep every
    page ever touched resident while any tensor of the file lives, so a weight the model re-lays
    out in memory would count twice.)"""
    import torch

    if not record.nbytes:
        return record.read()
    start = record.offset - record.offset % mmap.ALLOCATIONGRANULARITY
    with open(record.path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), record.offset + record.nbytes - start, offset=start, access=mmap.ACCESS_COPY)
    dtype = torch_dtype(record.dtype)
    count = record.nbytes // dtype.itemsize
    return torch.frombuffer(mapping, dtype=dtype, count=count, offset=record.offset - start).view(record.shape)


def _detect_layout(records: Mapping[str, Any], where: str) -> str:
    """"diffusers" or "wan", from names only those layouts have."""
    if any(k.startswith(("decoder.up_blocks.", "encoder.down_blocks.")) or k.startswith("quant_conv.") for k in records):
        return "diffusers"
    if any(k.startswith(("decoder.upsamples.", "encoder.downsamples.")) or k.startswith("conv1.") for k in records):
        return "wan"
    raise CheckpointError(f"{where}: not a Wan VAE checkpoint: no diffusers (decoder.up_blocks.*) or Wan "
                          f"(decoder.upsamples.*) keys among {sorted(records)[:6]}")


def _describe(config: WanVAEConfig) -> str:
    return (f"base_dim={config.base_dim}, z_dim={config.z_dim}, dim_mult={list(config.dim_mult)}, "
            f"num_res_blocks={config.num_res_blocks}")
