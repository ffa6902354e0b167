"""Checks the samplers share: the model kind, inputs that would make every latent NaN, and latents that became
NaN or infinite (a float16 overflow, a damaged checkpoint, inputs far outside the trained range): an error,
never a result."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

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
    """Once per call: the tensor inputs are floating point (integers would be taken as values without a word)
    and finite (a NaN or infinity would make every latent NaN)."""
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got {value.dtype}")
        if isinstance(value, torch.Tensor) and not torch.isfinite(value).all():
            bad = (~torch.isfinite(value)).sum().item()
            raise ValueError(f"{name} has {bad} NaN or infinite values (of {value.numel()})")


LARGE_INPUT = 1e4  # UMT5 embeddings and latents are of order 1; far beyond, the model's activations can overflow


class NonFiniteLatents(ValueError):
    """A sampler's latents became NaN or infinite; the message names where and the likely cause."""


class FiniteWatch:
    """Whether a sampler's latents stay finite, watched without waiting for the device at every step.

    :meth:`step` keeps a flag on the latents' device (no host sync); :meth:`check` reads the flags at once
    (one sync: a bidirectional run checks at its end, a FAR run after each chunk, before it is handed on)
    and raises :class:`NonFiniteLatents` naming the first step that went wrong and the likely cause.
    """

    def __init__(self, model, inputs: Dict[str, Optional[torch.Tensor]]):
        self.model, self.inputs = model, inputs
        self.flags: List[Tuple[str, torch.Tensor]] = []

    def step(self, latents: torch.Tensor, where: str) -> None:
        self.flags.append((where, torch.isfinite(latents).all()))

    def check(self) -> None:
        if not self.flags:
            return
        ok = torch.stack([flag for _, flag in self.flags]).tolist()
        wheres = [where for where, _ in self.flags]
        self.flags = []
        if not all(ok):
            raise NonFiniteLatents(f"the latents became NaN or infinite at {wheres[ok.index(False)]}: {self.cause()}")

    def cause(self) -> str:
        """The likely cause, looked for only once something went wrong."""
        bad = [name for name, p in self.model.named_parameters()
               if not torch.isfinite((p.to_local() if hasattr(p, "to_local") else p).float()).all()]
        if bad:
            listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            return f"the model's weights hold NaN or infinite values ({listed}): the checkpoint is damaged"
        large = {name: value.abs().max().item() for name, value in self.inputs.items()
                 if isinstance(value, torch.Tensor) and value.numel()}
        large = {name: value for name, value in large.items() if value > LARGE_INPUT}
        if large:
            listed = ", ".join(f"{name} up to |{value:.1e}|" for name, value in large.items())
            return f"inputs far outside the range the model was trained on ({listed}; UMT5 embeddings are of order 1)"
        if self.model.dtype == torch.float16:
            return "likely a float16 overflow: run in bfloat16 (--dtype bfloat16, dtype=\"bfloat16\"), whose range is float32's"
        return "the activations overflowed; check the inputs, or run in float32 to see whether precision is the cause"
