"""Scaled float8 checkpoints: the blocks' linear weights as float8 e4m3 with one float32 scale per row.

Layout (anyflow layout, our names): each weight of :data:`anyflow.model.parameters.FLOAT8_LINEARS`,
``blocks.N.<linear>.weight`` (out, in), is stored as ``F8_E4M3`` and its scales beside it as
``blocks.N.<linear>.weight_scale`` (out,) ``F32``, the weight being their product row by row
(:mod:`anyflow.runtime.fp8`); every other tensor as in any checkpoint (the converter writes them in
bfloat16, the fp32 islands in float32).

Opened, each pair is one lazy tensor under the weight's name (:class:`ScaledFloat8Tensor`) that
dequantises to float32 when read, so renaming, LoRA merges, casts to the other dtypes and the
parallel loader take it like any tensor; :func:`float8_pair` and :func:`float8_outputs` give the
pair itself, as stored or quantised once from any other tensor, to whoever keeps float8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple

from anyflow.model.parameters import FLOAT8_NAME, SCALE_SUFFIX, is_float8_weight

from .lora import MergedTensor
from .safetensors_io import CheckpointError, TensorRecord
from .writer import OutputTensor

if TYPE_CHECKING:
    import torch

FLOAT8_CODE = "F8_E4M3"  # the safetensors code of float8_e4m3fn
SCALE_CODE = "F32"


@dataclass(frozen=True)
class ScaledFloat8Tensor:
    """A lazy tensor: a float8 weight (out, in) and its float32 scales (out,), read as their product in float32."""

    name: str
    values: object  # lazy (out, in) F8_E4M3: a TensorRecord, or an in-memory tensor of a .pt file
    scale: object  # lazy (out,) F32

    @property
    def dtype(self) -> str:
        return FLOAT8_CODE

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scale.nbytes

    def read(self) -> "torch.Tensor":
        return self.read_rows(0, self.shape[0])

    def read_rows(self, start: int, stop: int) -> "torch.Tensor":
        from anyflow.runtime.fp8 import dequantise

        return dequantise(self.values.read_rows(start, stop), self.scale.read_rows(start, stop))


def is_float8(dtype: object) -> bool:
    """Whether a dtype argument names scaled float8: "float8_e4m3fn" or ``torch.float8_e4m3fn``."""
    return dtype is not None and str(dtype).replace("torch.", "") == FLOAT8_NAME


def resolve_weight_dtype(weight_dtype: object) -> Optional[bool]:
    """``weight_dtype`` of ``from_pretrained``: True for float8 ("float8_e4m3fn" or that torch dtype), None
    (keep what is stored) for None; anything else raises ValueError
    (:func:`anyflow.runtime.devices.resolve_dtype`)."""
    if weight_dtype is None:
        return None
    from anyflow.runtime.devices import resolve_dtype

    resolve_dtype(weight_dtype, (FLOAT8_NAME,), argument="weight_dtype")
    return True


def stored_as_float8(lazy: object) -> bool:
    """Whether a lazy tensor is a scaled float8 pair as stored (a LoRA merged into it or not)."""
    while isinstance(lazy, MergedTensor):
        lazy = lazy.base
    return isinstance(lazy, ScaledFloat8Tensor)


def held_as_float8(name: str, lazy: object, float8: Optional[bool]) -> bool:
    """Whether our tensor ``name`` is written or loaded as a scaled float8 pair: a block linear weight when
    float8 is asked for (True); when it is stored so, with ``float8`` None (keep); never with False."""
    if float8 is None:
        return stored_as_float8(lazy)
    return float8 and is_float8_weight(name)


def fold_scales(tensors: Mapping[str, object], where: str) -> Dict[str, object]:
    """Lazy tensors by name with each ``<weight>_scale`` of a block linear weight folded into that weight
    as a :class:`ScaledFloat8Tensor`; the same tensors when there is no such scale.

    Raises :class:`CheckpointError` naming ``where`` for a scale whose weight is not float8 e4m3, a scale
    that is not float32 (out,), and, in a checkpoint with scales, a block linear weight in float8 without one.
    """
    scales = {name[: -len(SCALE_SUFFIX)]: lazy for name, lazy in tensors.items()
              if name.endswith(SCALE_SUFFIX) and is_float8_weight(name[: -len(SCALE_SUFFIX)])
              and name[: -len(SCALE_SUFFIX)] in tensors}
    if not scales:
        return dict(tensors)
    problems = []
    for name, scale in scales.items():
        values = tensors[name]
        if values.dtype != FLOAT8_CODE or len(values.shape) != 2:
            problems.append(f"{name}{SCALE_SUFFIX} scales {name}, which is {values.dtype} {list(values.shape)}, "
                            f"not {FLOAT8_CODE} (out, in)")
        elif scale.dtype != SCALE_CODE or tuple(scale.shape) != tuple(values.shape[:1]):
            problems.append(f"{name}{SCALE_SUFFIX} is {scale.dtype} {list(scale.shape)}, expected {SCALE_CODE} "
                            f"{list(values.shape[:1])} (one scale per row of {name})")
    problems += [f"{name} is {FLOAT8_CODE} without its {name}{SCALE_SUFFIX}" for name, lazy in tensors.items()
                 if is_float8_weight(name) and lazy.dtype == FLOAT8_CODE and name not in scales]
    if problems:
        raise CheckpointError(f"{where}: not a valid scaled float8 checkpoint: " + "; ".join(problems[:5])
                              + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
    folded_scales = {f"{name}{SCALE_SUFFIX}" for name in scales}
    return {name: ScaledFloat8Tensor(name, lazy, scales[name]) if name in scales else lazy
            for name, lazy in tensors.items() if name not in folded_scales}


def _quantised(name: str, tensor: "torch.Tensor"):
    from anyflow.runtime.fp8 import quantise

    try:
        return quantise(tensor)
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc}") from None


def float8_pair(name: str, lazy: object, mapped: Mapping[str, "torch.Tensor"],
                device) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """The float8 values (out, in) and float32 scales (out,) of our tensor ``name`` on ``device``: as stored
    for a :class:`ScaledFloat8Tensor`, else quantised once (where ``device`` is) from the tensor read.
    ``mapped``: tensors of memory-mapped records by record name, used instead of reading them."""
    def tensor(record) -> "torch.Tensor":
        return mapped[record.name] if isinstance(record, TensorRecord) and record.name in mapped else record.read()

    if isinstance(lazy, ScaledFloat8Tensor):
        return tensor(lazy.values).to(device), tensor(lazy.scale).to(device)
    return _quantised(name, tensor(lazy).to(device))


def records_to_map(name: str, lazy: object, float8: Optional[bool]) -> List[TensorRecord]:
    """The safetensors records loading maps for our tensor ``name``: those it keeps as stored. A weight to be
    quantised is read into fresh memory and freed instead, so that its full-precision bytes do not stay
    mapped (resident) beside the float8 ones for as long as the other tensors of its file are in use."""
    if isinstance(lazy, ScaledFloat8Tensor):
        return [part for part in (lazy.values, lazy.scale) if isinstance(part, TensorRecord)]
    return [lazy] if isinstance(lazy, TensorRecord) and not held_as_float8(name, lazy, float8) else []


def float8_outputs(name: str, lazy: object) -> List[OutputTensor]:
    """The two tensors a converter writes for a block linear weight held as scaled float8: ``name`` (out, in)
    F8_E4M3 and ``name_scale`` (out,) F32. A pair as stored is copied byte for byte; any other tensor is
    read and quantised once (the values are read first, then the scales)."""
    rows = lazy.shape[0]
    if isinstance(lazy, ScaledFloat8Tensor):
        same = [part if isinstance(part, TensorRecord) else None for part in (lazy.values, lazy.scale)]
        return [OutputTensor(name, lazy.values.read, FLOAT8_CODE, tuple(lazy.shape), same[0]),
                OutputTensor(f"{name}{SCALE_SUFFIX}", lazy.scale.read, SCALE_CODE, (rows,), same[1])]
    once = _QuantisedOnce(name, lazy)
    return [OutputTensor(name, once.values, FLOAT8_CODE, tuple(lazy.shape)),
            OutputTensor(f"{name}{SCALE_SUFFIX}", once.scale, SCALE_CODE, (rows,))]


class _QuantisedOnce:
    """One tensor quantised once for two reads: the values (which keeps the scales), then the scales."""

    def __init__(self, name: str, source: object):
        self.name, self.source, self.kept_scale = name, source, None

    def values(self) -> "torch.Tensor":
        values, self.kept_scale = _quantised(self.name, self.source.read())
        return values

    def scale(self) -> "torch.Tensor":
        scale, self.kept_scale = self.kept_scale, None
        return scale if scale is not None else _quantised(self.name, self.source.read())[1]


def float8_nbytes(shape: Tuple[int, ...]) -> int:
    """Bytes of a weight (out, in) held as scaled float8: one per value, four per row's scale."""
    return math.prod(shape) + 4 * shape[0]
