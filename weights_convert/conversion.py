"""Checkpoint conversion and model loading on top of :mod:`.sources` and :mod:`.writer`.

A conversion that only renames (safetensors source, ``dtype="keep"``) never imports torch: it
copies byte ranges. Casting, ``.pt`` sources and loading a model do.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, TextIO, Tuple, Union

from anyflow.model.config import AnyFlowConfig, AnyFlowFARConfig
from anyflow.model.parameters import DTYPE_NAMES as MODEL_DTYPE_NAMES, SCALE_SUFFIX, is_fp32_island

from .lora import LoraArguments, MergedTensor, apply_adapters, normalize_lora
from .pt_files import InMemoryTensor
from .safetensors_io import HALF_DTYPES, TensorRecord, dtype_code, itemsize, map_records, torch_dtype
from .scaled_fp8 import (
    float8_nbytes, float8_outputs, float8_pair, held_as_float8, is_float8, records_to_map, resolve_weight_dtype,
)
from .sources import Checkpoint, open_checkpoint
from .state_dict import rename_keys
from .writer import OutputTensor, parse_size, write_checkpoint

if TYPE_CHECKING:
    import torch

FLOAT8_OTHERS = "BF16"  # the dtype of the tensors other than the block linear weights in a float8 conversion
TARGETS = ("anyflow", "diffusers")
STEMS = {"anyflow": "model", "diffusers": "diffusion_pytorch_model"}
DIFFUSERS_VERSION = "0.42.1"


def output_dtype(name: str, stored: str, dtype: Optional[str]) -> str:
    """The dtype code a tensor is written or loaded in: ``dtype`` (None keeps ``stored``), with the
    fp32 islands (our names) kept in float32 when ``dtype`` is a half type."""
    if dtype is None:
        return stored
    if dtype in HALF_DTYPES and is_fp32_island(name):
        return "F32"
    return dtype


def resolve_dtype(dtype: Union[str, "torch.dtype", None]) -> Optional[str]:
    """The safetensors code of a model dtype ("float32", "bfloat16", "float16" or that torch dtype, as
    :func:`anyflow.runtime.devices.resolve_dtype` takes it); None for "keep" or None."""
    if dtype is None or dtype == "keep":  # a renaming conversion: no torch needed
        return None
    if dtype in MODEL_DTYPE_NAMES:  # a name: its code without importing torch (a conversion that only renames)
        return dtype_code(dtype)
    from anyflow.runtime.devices import resolve_dtype as torch_dtype_of  # checks the rest, names the choices

    return dtype_code(torch_dtype_of(dtype))


def loaded_nbytes(checkpoint: Checkpoint, dtype: Union[str, "torch.dtype", None], weight_dtype: object = None) -> int:
    """Bytes the checkpoint's tensors take once loaded in ``dtype`` (fp32 islands included) and ``weight_dtype``
    (as in :func:`load_checkpoint`: float8 weights count with their scales)."""
    code, float8 = resolve_dtype(dtype), resolve_weight_dtype(weight_dtype)
    return sum(float8_nbytes(t.shape) if held_as_float8(name, t, float8) else
               math.prod(t.shape) * itemsize(output_dtype(name, t.dtype, code)) for name, t in checkpoint.tensors.items())


def config_json(config: AnyFlowConfig, to: str) -> Dict[str, object]:
    """The ``config.json`` written for ``to``: the config's keys under diffusers' class name."""
    class_name = "AnyFlowFARTransformer3DModel" if isinstance(config, AnyFlowFARConfig) else "AnyFlowTransformer3DModel"
    if to == "diffusers":
        return {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config.to_dict()}
    return {"_class_name": class_name, "_format": "anyflow", **config.to_dict()}


@dataclass
class ConversionReport:
    """What a conversion read and wrote."""

    source: Checkpoint
    out: str
    files: List[str]
    nbytes_written: int


def convert(
    src: str,
    out: str,
    *,
    from_format: Optional[str] = None,
    to: str = "anyflow",
    dtype: Union[str, "torch.dtype", None] = "keep",
    max_shard_size: Union[str, int] = "5GB",
    config_path: Optional[str] = None,
    force: bool = False,
    progress: Optional[TextIO] = sys.stderr,
    far: bool = False,
    lora: Optional[LoraArguments] = None,
    lora_skip_unknown: bool = False,
) -> ConversionReport:
    """Convert the checkpoint at ``src`` into folder ``out`` (our layout, or back to diffusers).

    Streams one tensor at a time, re-reads and checks every written tensor, then moves the
    folder into place. ``src`` is never modified; the folder ``out`` goes in must exist. ``far``
    warm-starts a FAR model from a bidirectional AnyFlow or Wan2.1 ``src``. ``lora`` (an adapter
    file, a (file, scale) pair, or a list of them) bakes
    LoRA adapters into the output (:mod:`.lora`; every adapter is checked before anything is
    written; ``lora_skip_unknown`` leaves out adapter modules the model does not have).

    ``dtype="float8_e4m3fn"`` writes a scaled float8 checkpoint (:mod:`.scaled_fp8`: the block linear
    weights in float8 with float32 scales per row, the rest bfloat16 and the fp32 islands float32), in
    our layout only; ``"keep"`` keeps such pairs as they are, any other dtype dequantises them.
    """
    if to not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {to!r}")
    float8 = True if is_float8(dtype) else None if dtype in (None, "keep") else False
    target_dtype = FLOAT8_OTHERS if float8 else resolve_dtype(dtype)
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    checkpoint = open_checkpoint(src, from_format, config_path, far)
    checkpoint.tensors = apply_adapters(checkpoint.tensors, lora, lora_skip_unknown)
    names = rename_keys(checkpoint.tensors, "to_diffusers") if to == "diffusers" else {k: k for k in checkpoint.tensors}
    tensors = []
    for k, lazy in checkpoint.tensors.items():
        if held_as_float8(k, lazy, float8):
            if to != "anyflow":
                raise ValueError(f"{to} layout: scaled float8 weights ({k}, ...) are written in the anyflow layout only; "
                                 "pass --dtype bfloat16 (or float32, float16) to dequantise them")
            tensors += float8_outputs(k, lazy)
            continue
        dtype = output_dtype(k, lazy.dtype, target_dtype)
        same_bytes = lazy if isinstance(lazy, TensorRecord) and dtype == lazy.dtype else None
        tensors.append(OutputTensor(names[k], lazy.read, dtype, tuple(lazy.shape), same_bytes))
    files = write_checkpoint(out, tensors, config_json(checkpoint.config, to), STEMS[to], max_bytes, force,
                             sources=[src] + checkpoint.files + [path for path, _ in normalize_lora(lora)],
                             progress=progress)
    return ConversionReport(checkpoint, out, files, sum(t.nbytes for t in tensors))


def load_checkpoint(
    path: str,
    dtype: Union[str, "torch.dtype", None] = None,
    device: Union[str, "torch.device"] = "cpu",
    from_format: Optional[str] = None,
    config_path: Optional[str] = None,
    far: bool = False,
    lora: Optional[LoraArguments] = None,
    lora_skip_unknown: bool = False,
    weight_dtype: object = None,
) -> Tuple[AnyFlowConfig, Dict[str, "torch.Tensor"]]:
    """Any supported checkpoint as (config, state dict under our names), ready for ``load_state_dict``.

    Safetensors files are mapped copy-on-write, so a tensor that needs no cast or move is read
    from disk only when first used, and the file never changes. ``dtype=None`` keeps the
    checkpoint's compute dtype; in half precision the fp32 islands are float32 either way.
    ``far`` warm-starts a FAR model from a bidirectional AnyFlow or Wan2.1 checkpoint. ``lora``
    merges LoRA adapters (a file, a (file, scale) pair, or a list of them) as each tensor is read, as
    in :func:`convert`. ``config_path`` gives the config of weights that have none beside them.
    ``weight_dtype="float8_e4m3fn"`` (or ``torch.float8_e4m3fn``) gives each block linear weight as
    float8 values and float32 scales (``<weight>_scale``), quantised tensor by tensor as read, or as
    stored in a scaled float8 checkpoint; None keeps the checkpoint's (float8 pairs stay float8).
    """
    import torch

    checkpoint = open_checkpoint(path, from_format, config_path, far)
    checkpoint.tensors = apply_adapters(checkpoint.tensors, lora, lora_skip_unknown)
    dtype, float8 = resolve_dtype(dtype), resolve_weight_dtype(weight_dtype)
    if dtype is None:
        dtype = checkpoint.tensors["patch_embed.proj.weight"].dtype
    device = torch.device(device)
    mapped = map_records([record for name, lazy in checkpoint.tensors.items()
                          for record in records_to_map(name, lazy, float8)])
    state = {}
    for name, lazy in checkpoint.tensors.items():
        if held_as_float8(name, lazy, float8):
            state[name], state[f"{name}{SCALE_SUFFIX}"] = float8_pair(name, lazy, mapped, device)
            continue
        target = torch_dtype(output_dtype(name, lazy.dtype, dtype))
        if isinstance(lazy, TensorRecord):
            # moved as stored, then cast where it will live: a GPU casts, the host only copies
            state[name] = mapped[lazy.name].to(device).to(target)
        else:
            # the destination first, the temporaries of the read above it: freed, they leave no holes
            # between the kept tensors (a merged LoRA otherwise strands ~15% of the model in the heap);
            # LoRA products are made on the device
            value = lazy.read(device) if isinstance(lazy, MergedTensor) else lazy.read()
            state[name] = torch.empty(lazy.shape, dtype=target, device=device).copy_(value)
    return checkpoint.config, state


def save_state_dict(
    config: AnyFlowConfig,
    state: Mapping[str, "torch.Tensor"],
    out: str,
    max_shard_size: Union[str, int] = "5GB",
    force: bool = False,
) -> List[str]:
    """Write a state dict under our names in our layout (``config.json`` + ``model.safetensors`` or
    shards) to folder ``out``, verified and atomically; returns the file names. Missing folders above
    ``out`` are created, as diffusers' ``save_pretrained`` does (:func:`convert` refuses them)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    tensors = [
        OutputTensor(k, InMemoryTensor(k, v.detach().cpu()).read, dtype_code(v.dtype), tuple(v.shape))
        for k, v in state.items()
    ]
    return write_checkpoint(out, tensors, config_json(config, "anyflow"), STEMS["anyflow"], max_bytes, force,
                            progress=None)
