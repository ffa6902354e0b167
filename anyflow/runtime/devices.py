"""The device a model runs on, named by the user and checked to exist here with one clear error; dtype names
turned into dtypes (one function for every API and command); and what a device needs of the model's dtype and
of PyTorch's global precision settings."""

from __future__ import annotations

from typing import Collection, Optional, Tuple, Union

import torch

from ..model.parameters import DTYPE_NAMES

SUPPORTED = "'cpu', 'cuda' or 'cuda:N'"


def resolve_device(device: Optional[Union[str, torch.device]], argument: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that exists here; None is CUDA when available, else the CPU.

    Raises ValueError naming ``argument`` and the device for an unknown name (``"gpu"``), a type this
    project does not run on, or a CUDA (or MPS) device this machine lacks.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    named = f"{argument} {device!r}"
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{named}: not a device type torch knows; use {SUPPORTED}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{named}: no CUDA GPU is available here (torch {torch.__version__}); use 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"{named}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{named}: MPS is not available here; use 'cpu'")
    elif resolved.type == "meta":
        raise ValueError(f"{named}: the meta device holds shapes, not values, so nothing can run on it; use {SUPPORTED}")
    elif resolved.type != "cpu":
        raise ValueError(f"{named}: {resolved.type} is not supported; use {SUPPORTED}")
    return resolved


def cuda_capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """The (major, minor) compute capability of a CUDA ``device``; None for any other device."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def auto_dtype(device: torch.device, capability: Optional[Tuple[int, int]] = None) -> torch.dtype:
    """The model dtype ``--dtype auto`` picks for ``device``.

    - CPU (and any device but CUDA): float32.
    - CUDA from compute capability 8.0 (Ampere, Ada, Hopper, Blackwell): bfloat16, as the models were trained.
    - CUDA 7.x (Volta V100, Turing T4 and RTX 20xx): float16. These GPUs have no bfloat16 units, and
      PyTorch's fused attention kernels do not take bfloat16 there: attention would fall back to the
      math kernel, which materialises the (B, heads, L, L) scores (about 26 GB at 1.3B 480p).
    - older CUDA GPUs: float32.

    ``capability`` overrides the device's own (for tests and estimates).
    """
    if device.type != "cuda":
        return torch.float32
    major, _ = capability if capability is not None else cuda_capability(device)
    if major >= 8:
        return torch.bfloat16
    return torch.float16 if major == 7 else torch.float32


def attention_materialises_scores(device: torch.device, dtype: torch.dtype,
                                  capability: Optional[Tuple[int, int]] = None) -> bool:
    """Whether ``F.scaled_dot_product_attention`` falls back to the math kernel on ``device`` in ``dtype``,
    holding the whole (B, heads, L_q, L_k) score matrix: bfloat16 on CUDA GPUs before compute
    capability 8.0 (neither the flash nor the memory-efficient kernel takes bfloat16 there)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return False
    major, _ = capability if capability is not None else cuda_capability(device)
    return major < 8


def configure_precision(device: torch.device, dtype: torch.dtype) -> None:
    """Set what a model held in ``dtype`` on ``device`` needs of PyTorch's global matmul settings.

    float16 on CUDA: cuBLAS may by default sum the partial products of a float16 matmul in float16
    (``allow_fp16_reduced_precision_reduction``). The FFN's output projection sums K = ffn_dim
    (8,960 at 1.3B, 13,824 at 14B) products, whose partial sums can overflow float16's 65,504 or
    lose the low bits; this turns that off, so every partial sum is float32 as on the CPU. bfloat16
    (whose range is float32's) and float32 change nothing. ``from_pretrained``, ``to_dtype`` and
    ``load_parallel`` call it; call it yourself if you cast a model to float16 on a GPU another way.
    """
    if device.type == "cuda" and dtype == torch.float16:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


def resolve_dtype(dtype: Union[str, torch.dtype, None], choices: Collection[str] = DTYPE_NAMES, *,
                  argument: str = "dtype", device: Optional[torch.device] = None,
                  capability: Optional[Tuple[int, int]] = None) -> Optional[torch.dtype]:
    """``dtype`` as a torch dtype: None stays None; a torch dtype or a name must be one of ``choices``
    (the model dtypes "float32", "bfloat16", "float16" by default; add "auto" for :func:`auto_dtype` on
    ``device``, "float8_e4m3fn" for float8 weights). A ValueError names ``argument`` and the choices."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise TypeError(f"{argument} must be a floating point dtype, got {dtype}")
    name = str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else dtype
    if not isinstance(name, str) or name not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{argument} must be a torch dtype or one of [{listed}], got {dtype!r}")
    if name == "auto":
        return auto_dtype(device if device is not None else torch.device("cpu"), capability)
    return getattr(torch, name)


def dtype_warning(device: torch.device, dtype: torch.dtype, capability: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """A line to show before a run in ``dtype`` on ``device`` that will be slow or large, else None."""
    if attention_materialises_scores(device, dtype, capability):
        major, minor = capability if capability is not None else cuda_capability(device)
        return (f"note: {torch.cuda.get_device_name(device) if capability is None else 'this GPU'} (compute capability "
                f"{major}.{minor}) has no bfloat16 units: attention falls back to the math kernel, which holds every "
                "(heads, tokens, tokens) score matrix; --dtype float16 (or auto) is faster and far smaller")
    return None
