"""Input checks the samplers share: the model kind, and inputs that would make every latent NaN."""

from __future__ import annotations

import torch

from ..model.config import AnyFlowFARConfig


def check_model(model, far: bool) -> None:
    """The model kind each sampler runs: the FAR model has its own, chunk by chunk."""
    config = getattr(model, "config", None)
    if not hasattr(model, "prepare_context") or config is None:
        raise ValueError(f"model must be an AnyFlow transformer, got a {type(model).__name__}")
    if far and not isinstance(config, AnyFlowFARConfig):
        raise ValueError(f"sample_far runs an AnyFlow FAR model (AnyFlowFARTransformer3DModel); this is a "
                         f"bidirectional {type(model).__name__}: use sample")
    if not far and isinstance(config, AnyFlowFARConfig):
        raise ValueError(f"sample runs the bidirectional model; this is an AnyFlow FAR model "
                         f"({type(model).__name__}): use sample_far")


def check_finite(**inputs) -> None:
    """Once per call: a NaN or infinity in an input would make every latent NaN without a word."""
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = (~torch.isfinite(value)).sum().item()
            raise ValueError(f"{name} has {bad} NaN or infinite values (of {value.numel()})")
