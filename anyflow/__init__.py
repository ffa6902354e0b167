"""AnyFlow: the video flow-map transformer in plain PyTorch.

    from anyflow import AnyFlowConfig, AnyFlowTransformer3DModel

Names are imported on first use, so ``import anyflow`` (and the ``anyflow`` command's help)
does not pay for importing torch.
"""

import importlib

_EXPORTS = {
    "AnyFlowConfig": "config",
    "PRESETS": "config",
    "AnyFlowTransformer3DModel": "model",
    "FP32_ISLANDS": "model",
    "PreparedContext": "model",
    "Transformer3DOutput": "model",
    "sample": "sampling",
    "flow_map_sigmas": "sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'anyflow' has no attribute {name!r}")


def __dir__():
    return __all__
