"""Scaled float8 linear weights: layers that hold float8 e4m3 values with one float32 scale per output row.

The format (Q = W / s rounded to e4m3, s = row absmax / 448) is :mod:`anyflow.float8_format`'s,
shared with the converter, which writes it.

:class:`Float8Linear` holds Q and s and computes ``F.linear`` with Q * s made in the input's dtype,
one layer at a time: the arithmetic is that of the model's dtype, only the weights held are smaller.
It does not use ``torch._scaled_mm`` (the fp8 tensor cores of GPUs from sm 8.9): that path could not
be tested here, so none is written. :func:`quantise_block_linears` turns the linear layers inside the
blocks (:data:`anyflow.parameters.FLOAT8_LINEARS`, nearly all the weights) of a model into such
layers; everything else stays as it was.
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
from torch import nn

from .float8_format import FLOAT8, dequantise, quantise
from .linear import linear
from .parameters import FLOAT8_LINEARS, SCALE_SUFFIX

class Float8Linear(nn.Module):
    """A linear layer holding its weight as scaled float8 (see the module docstring).

    State: ``weight`` (out, in) float8_e4m3fn, a parameter without gradient; ``weight_scale`` (out,)
    float32, a buffer; ``bias`` (out,) in the model's dtype, or None. Inputs (..., in) -> (..., out)
    in the input's dtype, computed like :class:`anyflow.linear.Linear` with the dequantised weight
    (in float32 for half precision on a CPU without native half units).

    Casting the model (``to_dtype``, ``model.to(torch.bfloat16)``) casts the bias only: the weight
    stays float8 and its scales float32. Moving it to another device moves all three.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FLOAT8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> "Float8Linear":
        """The float8 layer of ``layer``: its weight quantised, its bias (the same parameter) kept. On the meta
        device (a model built to load a state dict into) there are no values: shapes and dtypes only."""
        made = cls(layer.in_features, layer.out_features, bias=False, device="meta")
        if not layer.weight.is_meta:
            quantised, made.weight_scale = quantise(layer.weight.detach())
            made.weight = nn.Parameter(quantised, requires_grad=False)
        made.bias = layer.bias
        return made

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, dequantise(self.weight, self.weight_scale, x.dtype), self.bias)

    @torch.no_grad()
    def add_to_weight_(self, change: torch.Tensor) -> None:
        """W <- W + change (out, in): dequantised, summed in float32, quantised again with new scales."""
        quantised, scale = quantise(dequantise(self.weight, self.weight_scale).add_(change.to(self.weight.device)))
        self.weight.copy_(quantised)
        self.weight_scale.copy_(scale)

    def _apply(self, fn, recurse=True):
        # nn.Module.to / .half / .float cast every floating point tensor: keep the float8 values and
        # their float32 scales as they are (fp8 -> any wider float -> fp8 is exact; a scale is not)
        weight, scale = self.weight.data, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != FLOAT8:
            self.weight.data = weight.to(self.weight.device)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "float8_e4m3fn")


def quantise_block_linears(model: nn.Module) -> nn.Module:
    """Hold every linear layer of ``model.blocks`` named in :data:`~anyflow.parameters.FLOAT8_LINEARS` as a
    :class:`Float8Linear`, in place, one layer at a time (each full-precision weight is freed as its layer
    is replaced, unless held elsewhere); everything else unchanged. Layers already float8 stay. Returns model.
    """
    for block in model.blocks:
        for path in FLOAT8_LINEARS:
            owner_path, _, attribute = path.rpartition(".")
            owner = block.get_submodule(owner_path)
            layer = getattr(owner, attribute)
            if isinstance(layer, Float8Linear):
                continue
            if hasattr(layer.weight, "to_local"):
                raise RuntimeError("quantise_block_linears on a parallel (FSDP) model: quantise before parallelize")
            setattr(owner, attribute, Float8Linear.from_linear(layer))
    return model


def float8_layers(model: nn.Module) -> Dict[str, Float8Linear]:
    """The float8 layers of ``model`` by the name of their weight (``blocks.0.self_attn.q.weight``)."""
    return {f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, Float8Linear)}


def holds_float8(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict has scaled float8 weights (their ``<weight>_scale`` entries)."""
    return any(name.endswith(f".weight{SCALE_SUFFIX}") for name in state_dict)
