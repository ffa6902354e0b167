"""AnyFlow: the video flow-map transformer in plain PyTorch.

    from anyflow import AnyFlowConfig, AnyFlowTransformer3DModel
"""

from .config import PRESETS, AnyFlowConfig
from .model import FP32_ISLANDS, AnyFlowTransformer3DModel, PreparedContext, Transformer3DOutput

__all__ = [
    "AnyFlowConfig",
    "AnyFlowTransformer3DModel",
    "FP32_ISLANDS",
    "PRESETS",
    "PreparedContext",
    "Transformer3DOutput",
]
