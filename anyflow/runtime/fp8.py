"""Scaled float8 weights: the format, and the linear layers that hold it.

**The format.** A weight W (out, in) is held as Q = W / s rounded to the nearest float8 e4m3 value,
with s_i = max_j |W_ij| / 448 for each output row i (448 is e4m3's largest finite value, so every
row uses the format's whole range; an all-zero row gets s = 1), and W is taken as Q * s. That is one
byte per weight instead of bfloat16's two, and a relative error of at most 2^-4 per weight (three
mantissa bits; rows are scaled, so only weights far below their row's largest fall into e4m3's
subnormals). :func:`quantise` and :func:`dequantise` are shared with the converter
(:mod:`weights_convert.scaled_fp8`), which writes it.

**The layers.** :class:`Float8Linear` holds Q and s and computes ``F.linear`` with Q * s made in the
input's dtype, one layer at a time: the arithmetic is that of the model's dtype, only the weights held
are smaller. It does not use ``torch._scaled_mm`` (the fp8 tensor cores of GPUs from sm 8.9): that path
could not be tested here, so none is written. :func:`quantise_block_linears` turns the linear layers
inside the blocks (:data:`anyflow.model.parameters.FLOAT8_LINEARS`, nearly all the weights) of a model
into such layers; everything else stays as it was.
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
from torch import nn

from ..model.layers import linear
from ..model.parameters import FLOAT8_LINEARS, SCALE_SUFFIX

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SMALLEST_SCALE = torch.finfo(torch.float32).tiny  # a scale stays a normal float32, so W / s is finite


def quantise(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """W (out, in), any float dtype -> (Q (out, in) float8_e4m3fn, scales (out,) float32), Q * scales ~ W.

    Per row: scale = max |W| / 448 (1 for an all-zero row), Q = W / scale in float32, clamped to
    +-448 and rounded to the nearest e4m3 value. Computed where ``weight`` is.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantise takes a floating point weight (out, in), got {weight.dtype} {tuple(weight.shape)}")
    rows = weight.float()  # (out, in); a copy unless weight is float32
    absmax = rows.abs().amax(dim=1)  # (out,)
    if not torch.isfinite(absmax).all():
        raise ValueError(f"cannot quantise a weight {tuple(weight.shape)} with NaN or infinite values")
    scale = torch.where(absmax > 0, absmax / FLOAT8_MAX, 1.0).clamp_min_(SMALLEST_SCALE)
    return (rows / scale[:, None]).clamp_(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8), scale


def dequantise(quantised: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q (out, in) float8 and scales (out,) -> Q * scales (out, in) in ``dtype`` (made in float32, rounded once)."""
    weight = quantised.to(torch.float32)
    return weight.mul_(scale[:, None]).to(dtype)


class Float8Linear(nn.Module):
    """A linear layer holding its weight as scaled float8 (see the module docstring).

    State: ``weight`` (out, in) float8_e4m3fn, a parameter without gradient; ``weight_scale`` (out,)
    float32, a buffer; ``bias`` (out,) in the model's dtype, or None. Inputs (..., in) -> (..., out)
    in the input's dtype, computed like :class:`anyflow.model.layers.Linear` with the dequantised weight
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
    """Hold every linear layer of ``model.blocks`` named in :data:`~anyflow.model.parameters.FLOAT8_LINEARS` as a
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
