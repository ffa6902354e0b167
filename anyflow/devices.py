"""The device a model runs on, named by the user and checked to exist here, with one clear error."""

from __future__ import annotations

from typing import Optional, Union

import torch

SUPPORTED = "'cpu', 'cuda' or 'cuda:N'"


def resolve_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    """``device`` as a ``torch.device`` that exists here; None is CUDA when available, else the CPU.

    Raises ValueError naming the device for an unknown name (``"gpu"``), a type this project does
    not run on, or a CUDA (or MPS) device this machine lacks.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r}: not a device type torch knows; use {SUPPORTED}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available here (torch {torch.__version__}); use 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: MPS is not available here; use 'cpu'")
    elif resolved.type not in ("cpu", "meta"):
        raise ValueError(f"device {device!r}: {resolved.type} is not supported; use {SUPPORTED}")
    return resolved
