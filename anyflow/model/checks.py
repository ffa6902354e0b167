"""The transformers' input checks, kept out of the forward passes: each raises one ValueError naming the argument."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from .config import AnyFlowConfig

TimestepLike = Union[torch.Tensor, numbers.Real]


def _shape(value) -> object:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def check_latents(config: AnyFlowConfig, latents: torch.Tensor, frames_in_table: bool = True) -> Tuple[int, int, int]:
    """Validate (B, F, C, H, W) latents; return the patch grid (F, H/ph, W/pw). ``frames_in_table=False``: the
    frames need not fit the RoPE table (a FAR cache's, whose positions are its own)."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
        raise ValueError(f"hidden_states must be a 5-D tensor (B, F, C, H, W), got {_shape(latents)}")
    b, f, c, h, w = latents.shape
    if c != config.in_channels:
        raise ValueError(
            f"hidden_states has {c} channels at dim 2 of shape {tuple(latents.shape)}, the model expects "
            f"in_channels={config.in_channels} (layout is (B, F, C, H, W))"
        )
    _, ph, pw = config.patch_size
    if h % ph or w % pw:
        raise ValueError(f"hidden_states height x width {h}x{w} is not divisible by the patch {ph}x{pw}")
    if min(b, f, h, w) == 0:
        raise ValueError(f"hidden_states has an empty dimension: shape {tuple(latents.shape)}")
    grid = (f, h // ph, w // pw)
    if max(grid[1:] if not frames_in_table else grid) > config.rope_max_seq_len:
        raise ValueError(f"patch grid (frames, rows, columns) = {grid} exceeds rope_max_seq_len={config.rope_max_seq_len}")
    compressed = getattr(config, "compressed_patch_size", None)  # a FAR model sees older frames through it
    if compressed is not None and (h % compressed[1] or w % compressed[2]):
        raise ValueError(
            f"hidden_states height x width {h}x{w} is not divisible by the compressed patch {compressed[1]}x"
            f"{compressed[2]} (compressed_patch_size) that older frames are seen through"
        )
    return grid


def check_context(config: AnyFlowConfig, text: torch.Tensor, image: Optional[torch.Tensor]) -> None:
    """Text embeddings (B, S, text_dim) and, when the config has ``image_dim``, image tokens (B, S_img, image_dim)."""
    if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[-1] != config.text_dim:
        raise ValueError(f"encoder_hidden_states must be (B, S, text_dim={config.text_dim}), got {_shape(text)}")
    if text.shape[1] == 0:
        raise ValueError(f"encoder_hidden_states holds no token (S = 0): {_shape(text)}; a prompt's embeddings have "
                         "512 tokens (zeros past its own)")
    if config.image_dim is None:
        if image is not None:
            raise ValueError("encoder_hidden_states_image was given but this model has no image projection "
                             "(image_dim=None)")
        return
    if image is None:
        raise ValueError(f"this model has image_dim={config.image_dim}: encoder_hidden_states_image is required")
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[-1] != config.image_dim:
        raise ValueError(f"encoder_hidden_states_image must be (B, S_img, image_dim={config.image_dim}), "
                         f"got {_shape(image)}")
    if image.shape[0] != text.shape[0]:
        raise ValueError(f"batch sizes disagree: encoder_hidden_states has {text.shape[0]}, "
                         f"encoder_hidden_states_image has {image.shape[0]}")


def timestep_grid(value: TimestepLike, name: str, batch: int, frames: int, device: torch.device) -> torch.Tensor:
    """A number, 0-d, (B,) or (B, F) timestep -> finite float (B, F) on ``device``.

    Nothing here waits for the device: a number is checked on the host and filled in on the device
    (no host-to-device copy); a tensor is checked only where it lives on the host (a device tensor's
    check would wait for the device: the samplers make their timesteps from a schedule checked on
    the host). Under ``torch.compile`` the values are not looked at: a check would make the graph
    depend on them, one graph per timestep. A tensor keeps one compiled graph for every value.
    """
    if isinstance(value, bool) or not isinstance(value, (torch.Tensor, numbers.Real)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    checking = not torch.compiler.is_compiling()
    if not isinstance(value, torch.Tensor):
        if checking and not math.isfinite(value):
            raise ValueError(f"{name} has non-finite values: {value}")
        return torch.full((batch, frames), float(value) if checking else value, dtype=torch.float32, device=device)
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {value.dtype}")
    if checking and value.device.type == "cpu" and not torch.isfinite(value).all():
        raise ValueError(f"{name} has non-finite values: {value.tolist()}")
    # float64 stays float64 until the sinusoid, so that t - r is formed as precisely as given
    tensor = value.to(device, torch.float64 if value.dtype == torch.float64 else torch.float32)
    if tensor.dim() == 1:
        tensor = tensor[:, None]  # (B,) -> (B, 1): one timestep per sample
    try:
        return torch.broadcast_to(tensor, (batch, frames))
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} does not broadcast to (B, F) = ({batch}, {frames}); "
            "give a number, a (B,) or a (B, F) tensor"
        ) from None
