"""The model's reading path: the AnyFlow transformer's architecture, top to bottom, in plain PyTorch.

    config.py       AnyFlowConfig, AnyFlowFARConfig: the hyper-parameters (diffusers' config.json names)
    embeddings.py   latents -> tokens (patchify), the dual-timestep (t, r) embedding, the context projections
    rope.py         3D rotary position tables over (frame, row, column)
    attention.py    self- and cross-attention, and the token plan they follow
    block.py        the adaLN DiT block and the output head
    transformer.py  AnyFlowTransformer: __init__ and forward, the bidirectional model
    far.py          AnyFlowFARTransformer: the frame-autoregressive model, chunk by chunk
    far_cache.py    its key/value cache, unbounded or within a context window
    layers.py       Linear, the norms, and every way a primitive is computed
    checks.py       the input checks
    parameters.py   every parameter name and shape a config implies; the fp32 islands (no torch)

This package imports nothing of the rest of the project. Loading checkpoints, dtypes, LoRA, float8
weights, offload and parallelism are added from outside (:mod:`anyflow.pretrained`, :mod:`anyflow.runtime`).
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "AnyFlowConfig": "config",
    "AnyFlowFARConfig": "config",
    "PRESETS": "config",
    "AnyFlowBackbone": "transformer",
    "AnyFlowTransformer": "transformer",
    "PreparedContext": "transformer",
    "Transformer3DOutput": "transformer",
    "AnyFlowFARTransformer": "far",
    "FarKVCache": "far_cache",
    "ContextWindow": "far_cache",
    "FP32_ISLANDS": "parameters",
    "parameter_shapes": "parameters",
}

# names this path (the module anyflow.model of earlier releases) had, and where they are now
_MOVED = {"AnyFlowTransformer3DModel": "anyflow (the architecture: anyflow.model.AnyFlowTransformer)",
          "OutputHead": "anyflow.model.block", "TimestepLike": "anyflow.model.checks"}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _MOVED)
