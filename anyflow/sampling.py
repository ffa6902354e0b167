"""Any-step flow-map sampling: a few calls of the model carry noise to a clean latent.

With the shifted schedule ``sigma_0 = 1 > sigma_1 > ... > sigma_N = 0`` each step jumps from
``t = 1000 sigma_i`` straight to ``r = 1000 sigma_{i+1}`` along the model's mean velocity:

    z <- z - (sigma_i - sigma_{i+1}) * u(z, t, r)

The sampler only calls the model's ``forward``; the text context (and every block's
cross-attention keys and values) is prepared once per call, not once per step.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import torch

TRAIN_TIMESTEPS = 1000


def flow_map_sigmas(num_steps: int = 4, shift: float = 5.0, sigmas: Optional[Sequence[float]] = None) -> torch.Tensor:
    """The N + 1 noise levels of an N-step run, float64, from 1 (or ``sigmas[0]``) down to a terminal 0.

    Without ``sigmas`` the base levels are ``linspace(1, 0, N + 1)[:N]``; either way they are
    shifted, ``shift * s / (1 + (shift - 1) * s)``, and a 0 is appended. ``sigmas`` must be
    strictly decreasing and inside [0, 1]; it sets N.
    """
    if not (isinstance(shift, numbers.Real) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")
    if sigmas is None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        base = torch.linspace(1.0, 0.0, int(num_steps) + 1, dtype=torch.float64)[:-1]
    else:
        base = torch.as_tensor(list(sigmas), dtype=torch.float64)
        if base.dim() != 1 or base.numel() == 0:
            raise ValueError(f"sigmas must be a non-empty list of numbers, got {sigmas!r}")
        if not torch.isfinite(base).all() or (base < 0).any() or (base > 1).any():
            raise ValueError(f"sigmas must lie in [0, 1], got {base.tolist()}")
        if (base[1:] >= base[:-1]).any():
            raise ValueError(f"sigmas must be strictly decreasing, got {base.tolist()}")
    shifted = base if shift == 1.0 else shift * base / (1 + (shift - 1) * base)
    return torch.cat([shifted, shifted.new_zeros(1)])


def sample(
    model,
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    num_steps: int = 4,
    sigmas: Optional[Sequence[float]] = None,
    shift: float = 5.0,
    use_mean_velocity: bool = True,
    guidance_scale: float = 1.0,
    negative_encoder_hidden_states: Optional[torch.Tensor] = None,
    context_latents: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[int, float, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Sample latents with an AnyFlow model in any number of steps.

    Args:
        model: an :class:`anyflow.AnyFlowTransformer3DModel` (only its ``forward`` and
            ``prepare_context`` are used).
        noise: initial latents (B, F, C, H, W), standard normal; frames before channels.
        encoder_hidden_states: UMT5 embeddings (B, S, text_dim).
        num_steps: number of steps N (ignored when ``sigmas`` is given).
        sigmas: custom base noise levels (length N, strictly decreasing, in [0, 1]); shifted too.
        shift: schedule shift (5 for the released checkpoints).
        use_mean_velocity: step from t to r with the flow map (True), or plain Euler with r = t.
        guidance_scale: classifier-free guidance ``u_uncond + g (u_cond - u_uncond)`` when > 1;
            the released weights need none (1.0). Needs ``negative_encoder_hidden_states``.
        negative_encoder_hidden_states: embeddings of the negative prompt, same shape as
            ``encoder_hidden_states``; used only when ``guidance_scale > 1``.
        context_latents: K given latent frames (B, K, C, H, W): they replace the first K frames
            before every step, with source timestep t = 0, and are written back at the end.
        callback: called after every step as ``callback(step_index, t, latents)``.

    Returns:
        The latents (B, F, C, H, W) in the model's dtype.
    """
    schedule = flow_map_sigmas(num_steps, shift, sigmas)
    guided = _check_guidance(guidance_scale, encoder_hidden_states, negative_encoder_hidden_states)
    _check_sampling_inputs(model, noise, encoder_hidden_states, context_latents)

    device, dtype = model.device, model.dtype
    latents = noise.to(device=device, dtype=dtype, copy=True)  # never write into the caller's noise
    batch, frames = latents.shape[:2]
    text = encoder_hidden_states
    if guided:
        text = torch.cat([negative_encoder_hidden_states, encoder_hidden_states])  # uncond first
    with torch.no_grad():
        context = model.prepare_context(text.to(device))
    given = 0 if context_latents is None else context_latents.shape[1]
    if given:
        context_latents = context_latents.to(device=device, dtype=dtype)
    copies = 2 if guided else 1

    for i in range(len(schedule) - 1):
        t = schedule[i] * TRAIN_TIMESTEPS
        r = schedule[i + 1] * TRAIN_TIMESTEPS
        if t == r:
            continue
        if given:
            latents[:, :given] = context_latents
        model_input = torch.cat([latents] * copies) if guided else latents
        t_grid = torch.full((batch * copies, frames), t.item(), dtype=torch.float64, device=device)
        t_grid[:, :given] = 0  # given frames are clean
        r_grid = torch.full_like(t_grid, r.item()) if use_mean_velocity else t_grid
        with torch.no_grad():
            velocity = model(model_input, t_grid, r_grid, context).sample
        if guided:
            uncond, cond = velocity.chunk(2)
            velocity = uncond + guidance_scale * (cond - uncond)
        latents = (latents - (schedule[i] - schedule[i + 1]).item() * velocity).to(velocity.dtype)
        if callback is not None:
            callback(i, t.item(), latents)
    if given:
        latents[:, :given] = context_latents
    return latents


def _check_guidance(scale, positive, negative) -> bool:
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale)):
        raise ValueError(f"guidance_scale must be a finite number, got {scale!r}")
    if scale <= 1.0:
        return False
    if negative is None:
        raise ValueError(
            f"guidance_scale={scale} needs negative_encoder_hidden_states (the negative prompt's embeddings)"
        )
    if not isinstance(negative, torch.Tensor) or tuple(negative.shape) != tuple(positive.shape):
        shape = tuple(negative.shape) if isinstance(negative, torch.Tensor) else type(negative).__name__
        raise ValueError(
            f"negative_encoder_hidden_states must have the shape of encoder_hidden_states "
            f"{tuple(positive.shape)}, got {shape}"
        )
    return True


def _check_sampling_inputs(model, noise, text, context_latents) -> None:
    cfg = model.config
    _, ph, pw = cfg.patch_size
    if not isinstance(noise, torch.Tensor) or noise.dim() != 5:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a 5-D tensor (B, F, C, H, W), got {shape}")
    b, f, c, h, w = noise.shape
    if c != cfg.in_channels or h % ph or w % pw:
        raise ValueError(
            f"noise of shape {tuple(noise.shape)} does not fit the model: it needs C = in_channels = "
            f"{cfg.in_channels} at dim 2 and H, W divisible by the patch {ph}x{pw}"
        )
    if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[-1] != cfg.text_dim or text.shape[0] != b:
        shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
        raise ValueError(f"encoder_hidden_states must be (B={b}, S, text_dim={cfg.text_dim}), got {shape}")
    if context_latents is not None:
        if (
            not isinstance(context_latents, torch.Tensor)
            or context_latents.dim() != 5
            or context_latents.shape[0] != b
            or tuple(context_latents.shape[2:]) != (c, h, w)
            or not 1 <= context_latents.shape[1] <= f
        ):
            shape = tuple(context_latents.shape) if isinstance(context_latents, torch.Tensor) else type(context_latents).__name__
            raise ValueError(
                f"context_latents must be (B={b}, K, C={c}, H={h}, W={w}) with 1 <= K <= F={f}, got {shape}"
            )
