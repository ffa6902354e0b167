"""AnyFlow: the video flow-map transformer in plain PyTorch.

    from anyflow import AnyFlowConfig, AnyFlowTransformer3DModel

Names are imported on first use, so ``import anyflow`` (and the ``anyflow`` command's help)
does not pay for importing torch.
"""

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "AnyFlowConfig": "config",
    "AnyFlowFARConfig": "config",
    "PRESETS": "config",
    "AnyFlowTransformer3DModel": "model",
    "AnyFlowFARTransformer3DModel": "far",
    "FarKVCache": "far",
    "FP32_ISLANDS": "parameters",
    "parameter_shapes": "parameters",
    "PreparedContext": "model",
    "Transformer3DOutput": "model",
    "parallelize": "parallel",
    "load_parallel": "parallel",
    "sample": "sampling",
    "sample_far": "sampling",
    "flow_map_sigmas": "sampling",
    "VideoPipeline": "pipeline",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
