"""The layers the model is built from, and every way a primitive of it is computed, in one place.

- **Linear products** (:class:`Linear`, :func:`linear`): a model held in bfloat16 or float16 keeps
  its weights and activations in that dtype. On a CPU without bf16/fp16 matrix units (no
  AVX512-BF16 or AMX) PyTorch's half-precision GEMM and attention kernels run several times slower
  than float32 ones; there the product of the very same half-precision values is computed in
  float32 and rounded back once: what a native half kernel with float32 accumulation computes, up
  to summation order. GPUs and CPUs with native units use the half kernels directly.
- **Norms** (:class:`LayerNormFP32`, :func:`layer_norm_fp32`, :class:`RMSNorm`): statistics in float32.
- **Attention** (:func:`attend`): scaled dot-product attention of (B, L, heads, d) tensors; on the
  CPUs above, half precision is attended in float32 a few heads at a time.
- **RoPE's rotation** (:func:`rotate_pairs`): one complex multiply in eager mode; under
  ``torch.compile`` the same product in real arithmetic, which inductor fuses (it generates no
  complex code).
- **Tables** (:func:`cached_unless_compiling`): tables that depend on their arguments only are made
  once and cached in eager mode, and built inside the graph under ``torch.compile``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

T = TypeVar("T")
HEADS_PER_FP32_GROUP = 4


def _cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU has the dtype's units and ATen dispatches to its AVX512 kernels: with the
    capability forced lower (``ATEN_CPU_CAPABILITY=avx2`` or ``default``) torch's half-precision
    attention still packs for AMX and fails ("pack_vnni2 is only supported when avx512 is supported")."""
    probes = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              torch.float16: ("_is_amx_fp16_supported",)}[dtype]
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


CPU_NATIVE_HALF = {dtype: _cpu_has_native(dtype) for dtype in (torch.bfloat16, torch.float16)}


def computes_in_fp32(tensor: torch.Tensor) -> bool:
    """Whether products of this half-precision CPU tensor are better computed in float32."""
    return tensor.device.type == "cpu" and tensor.dtype in CPU_NATIVE_HALF and not CPU_NATIVE_HALF[tensor.dtype]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, in float32 for half-precision weights on a CPU without native half units."""
    if computes_in_fp32(weight):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(weight.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def layer_norm_fp32(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm over the last axis in float32; returns float32 (callers cast when they need to)."""
    return F.layer_norm(x.float(), x.shape[-1:], None if weight is None else weight.float(),
                        None if bias is None else bias.float(), eps)


class LayerNormFP32(nn.Module):
    """Affine LayerNorm computed in float32, output in the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_fp32(x, self.eps, self.weight, self.bias).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale; the mean square is taken in float32.

    The normalised value is rounded to the weight's dtype before the scale is applied, as in
    the released checkpoints' reference code.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(self.weight.dtype) * self.weight


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, Lq, H, d), k and v (B, Lk, H, d) -> (B, Lq, H*d): softmax(q k^T / sqrt(d)) v, no mask.

    Half-precision inputs on a CPU without native half units are attended in float32, a few heads at
    a time so that the float32 copies stay small, each result rounded back once.
    """
    if not computes_in_fp32(q):
        return _sdpa(q, k, v)
    groups = zip(*(t.split(HEADS_PER_FP32_GROUP, dim=2) for t in (q, k, v)))
    return torch.cat([_sdpa(qg.float(), kg.float(), vg.float()).to(q.dtype) for qg, kg, vg in groups], dim=-1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)  # (B, Lq, heads*d)


def rotate_pairs(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2i], x[2i+1]) of ``x`` (B, L, heads, d) by ``rotations`` (L, 1, d/2, 2) of
    (cos, sin), in float32; returns x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, L, heads, d/2, 2)
    if torch.compiler.is_compiling():
        even, odd = pairs.unbind(-1)
        cos, sin = rotations.unbind(-1)
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rotations))
    return rotated.flatten(-2).to(x.dtype)


def cached_unless_compiling(maxsize: int) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a function of hashable arguments that builds a table: in eager mode the last ``maxsize``
    tables are cached (made outside inference mode and autograd, so any caller may use them); under
    ``torch.compile`` the table is built in the graph instead."""

    def decorate(build: Callable[..., T]) -> Callable[..., T]:
        @functools.lru_cache(maxsize=maxsize)
        def cached(*args):
            with torch.inference_mode(False), torch.no_grad():
                return build(*args)

        @functools.wraps(build)
        def table(*args):
            return build(*args) if torch.compiler.is_compiling() else cached(*args)

        table.cache_clear = cached.cache_clear
        return table

    return decorate
