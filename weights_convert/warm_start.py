"""The FAR warm start: a FAR model's compressed patch embedding made from a full one.

The authors start the FAR model from a bidirectional one (or a Wan2.1 base) by resampling the
patch embedding's (D, C, 1, ph, pw) kernel to the compressed patch (1, ch, cw) with trilinear
interpolation (``align_corners=False``) and copying its bias (NVlabs/AnyFlow,
``setup_far_model``; diffusers' ``AnyFlowFARTransformer3DModel.__init__`` does the same). The
resampled tensor is made when it is read, in float32, and rounded once to the source's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Tuple

from .safetensors_io import itemsize, torch_dtype

if TYPE_CHECKING:
    import torch

FULL, COMPRESSED = "patch_embed.proj", "far_patch_embed.proj"


@dataclass(frozen=True)
class ResampledPatchKernel:
    """A lazy tensor: a patch-embedding kernel (read from ``source``) resampled to ``patch``."""

    name: str
    source: object  # a lazy tensor of the full kernel: .read(), .dtype (safetensors code), .shape
    patch: Tuple[int, int, int]

    @property
    def dtype(self) -> str:
        return self.source.dtype

    @property
    def shape(self) -> Tuple[int, ...]:
        return (*self.source.shape[:2], *self.patch)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    def read(self) -> "torch.Tensor":
        import torch.nn.functional as F

        kernel = self.source.read().float()  # (D, C, pt, ph, pw)
        d, c = kernel.shape[:2]
        resampled = F.interpolate(kernel.reshape(d * c, 1, *kernel.shape[2:]), size=self.patch, mode="trilinear",
                                  align_corners=False)
        return resampled.reshape(d, c, *self.patch).to(torch_dtype(self.dtype))

    def read_rows(self, start: int, stop: int) -> "torch.Tensor":
        return self.read()[start:stop]


def add_far_patch_embedding(tensors: Dict[str, object], compressed_patch_size: Tuple[int, int, int]) -> Dict[str, object]:
    """Our-named lazy tensors of a bidirectional model, plus the FAR model's compressed patch embedding."""
    return {
        **tensors,
        f"{COMPRESSED}.weight": ResampledPatchKernel(f"{COMPRESSED}.weight", tensors[f"{FULL}.weight"],
                                                     tuple(compressed_patch_size)),
        f"{COMPRESSED}.bias": tensors[f"{FULL}.bias"],
    }
