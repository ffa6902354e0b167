"""What a run needs, estimated from a checkpoint's headers before anything loads: the sampling's memory with the
weights as they will be loaded, the device's kernels, the FAR cache and block offload."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..model.config import AnyFlowFARConfig
from ..model.parameters import FLOAT8_NAME
from ..runtime.memory import (
    ForwardKernels, MemoryEstimate, estimate_far_sampling_memory, estimate_sampling_memory, weight_bytes,
    with_block_offload,
)


def estimate_sampling_run(checkpoint, noise_shape: Tuple[int, ...], text_tokens: int, partition: Optional[tuple],
                          guided: bool, device, dtype, weight_dtype: Optional[str] = None,
                          offload: Optional[str] = None, context_window: Optional[int] = None,
                          sink_frames: int = 0) -> MemoryEstimate:
    """The memory sampling needs with the transformer ``checkpoint`` (a :class:`weights_convert.sources.Checkpoint`,
    opened for its headers): the weights as they will be loaded (in ``dtype``, or float8 with ``weight_dtype``),
    the device's kernels, the FAR cache (bounded by ``context_window`` and ``sink_frames`` when given), and
    block ``offload``. What ``anyflow sample``, ``anyflow generate``
    and the app print and check before anything loads."""
    from weights_convert.conversion import loaded_nbytes
    from weights_convert.scaled_fp8 import stored_as_float8

    config = checkpoint.config
    element_size = torch.empty(0, dtype=dtype).element_size()
    weights = loaded_nbytes(checkpoint, dtype, weight_dtype)
    kernels = ForwardKernels.on(device, dtype)
    if isinstance(config, AnyFlowFARConfig):
        estimate = estimate_far_sampling_memory(config, weights, noise_shape, text_tokens, element_size, partition,
                                                kernels, context_window, sink_frames)
    else:
        estimate = estimate_sampling_memory(config, weights, noise_shape, text_tokens, element_size, guided, kernels)
    if not offload:
        return estimate
    # the blocks as loaded: float8 when asked for, or when the checkpoint holds (folded) float8 pairs
    stored = any(stored_as_float8(t) for t in checkpoint.tensors.values())
    float8 = weight_dtype or (FLOAT8_NAME if stored else None)
    return with_block_offload(estimate, weight_bytes(config, element_size, float8), host_is_device=device.type == "cpu")
