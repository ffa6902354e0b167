"""Matrix products that stay fast in half precision on CPUs without native half-precision units.

A model held in bfloat16 or float16 keeps its weights and activations in that dtype. On a CPU
without bf16/fp16 matrix instructions (no AVX512-BF16 or AMX), PyTorch's half-precision GEMM
and attention kernels run several times slower than float32 ones. There the product of the very
same half-precision values is computed in float32 and rounded back to the half dtype once:
what a native half kernel with float32 accumulation computes, up to summation order. GPUs and
CPUs with native units use the half kernels directly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


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
