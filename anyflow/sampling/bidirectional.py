"""Any-step sampling with the bidirectional model: every step a forward over the whole video."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import torch

from ..model.transformer import Context, PreparedContext
from .checks import FiniteWatch, check_finite, check_model
from .schedule import TRAIN_TIMESTEPS, flow_map_sigmas, flow_map_step, steps_to_run


def sample(
    model,
    noise: torch.Tensor,
    encoder_hidden_states: Context,
    *,
    num_steps: int = 4,
    sigmas: Optional[Sequence[float]] = None,
    shift: float = 5.0,
    use_mean_velocity: bool = True,
    guidance_scale: float = 1.0,
    negative_encoder_hidden_states: Optional[Context] = None,
    context_latents: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[int, float, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Sample latents with an AnyFlow model in any number of steps.

    Args:
        model: an :class:`anyflow.AnyFlowTransformer3DModel` (only its ``forward`` and
            ``prepare_context`` are used).
        noise: initial latents (B, F, C, H, W), standard normal; frames before channels.
        encoder_hidden_states: UMT5 embeddings (B, S, text_dim), or a :class:`PreparedContext`
            made by ``model.prepare_context``.
        num_steps: number of steps N (ignored when ``sigmas`` is given).
        sigmas: custom base noise levels (length N, strictly decreasing, in [0, 1]); shifted too.
        shift: schedule shift (5 for the released checkpoints).
        use_mean_velocity: step from t to r with the flow map (True), or plain Euler with r = t.
        guidance_scale: classifier-free guidance ``u_uncond + g (u_cond - u_uncond)`` when > 1;
            the released weights need none (1.0). Needs ``negative_encoder_hidden_states``.
        negative_encoder_hidden_states: embeddings of the negative prompt, same shape (or kind) as
            ``encoder_hidden_states``; used only when ``guidance_scale > 1``.
        context_latents: K given latent frames (B, K, C, H, W): they replace the first K frames
            before every step, with source timestep t = 0, and are written back at the end.
        callback: called after every step that runs as ``callback(step_index, t, latents)``,
            ``step_index`` counting the schedule's steps (see :func:`steps_to_run`).

    Returns:
        The latents (B, F, C, H, W) in the model's dtype, as diffusers' pipelines return them with
        ``output_type="latent"`` (``anyflow sample`` stores them so too). Latents that became NaN or
        infinite raise :class:`~anyflow.sampling.checks.NonFiniteLatents` naming the step and the likely cause.
    """
    check_model(model, far=False)
    schedule = flow_map_sigmas(num_steps, shift, sigmas)
    guided = _check_guidance(guidance_scale, encoder_hidden_states, negative_encoder_hidden_states)
    _check_sampling_inputs(model, noise, encoder_hidden_states, context_latents)
    check_finite(noise=noise, encoder_hidden_states=encoder_hidden_states, context_latents=context_latents,
                  negative_encoder_hidden_states=negative_encoder_hidden_states if guided else None)

    device, dtype = model.device, model.dtype
    latents = noise.to(device=device, dtype=dtype, copy=True)  # never write into the caller's noise
    batch, frames = latents.shape[:2]
    contexts = [negative_encoder_hidden_states, encoder_hidden_states] if guided else [encoder_hidden_states]
    with torch.no_grad():
        prepared = [c if isinstance(c, PreparedContext) else model.prepare_context(c.to(device)) for c in contexts]
    context = PreparedContext.cat(prepared) if guided else prepared[0]  # uncond first
    given = 0 if context_latents is None else context_latents.shape[1]
    if given:
        context_latents = context_latents.to(device=device, dtype=dtype)
    copies = 2 if guided else 1

    steps = steps_to_run(schedule)
    watch = FiniteWatch(model, dict(noise=noise, encoder_hidden_states=_tensor(encoder_hidden_states),
                                    context_latents=context_latents))
    for n, i in enumerate(steps):
        t = schedule[i] * TRAIN_TIMESTEPS
        r = schedule[i + 1] * TRAIN_TIMESTEPS
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
        latents = flow_map_step(latents, velocity, schedule, i)
        watch.step(latents, f"step {n + 1} of {len(steps)} (t = {t.item():.1f} -> r = {r.item():.1f})")
        if callback is not None:
            callback(i, t.item(), latents)
    watch.check()  # one wait for the device, at the end
    if given:
        latents[:, :given] = context_latents
    return latents


def _tensor(context) -> Optional[torch.Tensor]:
    """The embeddings of a context given as a tensor (None for a PreparedContext)."""
    return context if isinstance(context, torch.Tensor) else None


def _check_guidance(scale, positive, negative) -> bool:
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale)):
        raise ValueError(f"guidance_scale must be a finite number, got {scale!r}")
    if scale <= 1.0:
        return False
    if negative is None:
        raise ValueError(
            f"guidance_scale={scale} needs negative_encoder_hidden_states (the negative prompt's embeddings)"
        )
    if _describe(negative) != _describe(positive):
        raise ValueError(
            f"negative_encoder_hidden_states must be like encoder_hidden_states ({_describe(positive)}), "
            f"got {_describe(negative)}"
        )
    return True


def _describe(context) -> str:
    """A context's kind and shape, for comparing the positive and negative ones and for errors."""
    if isinstance(context, PreparedContext):
        return f"a PreparedContext of batch {context.batch_size}"
    if isinstance(context, torch.Tensor):
        return f"a tensor of shape {tuple(context.shape)}"
    return f"a {type(context).__name__}"


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
    if isinstance(text, PreparedContext):
        if text.batch_size != b:
            raise ValueError(f"encoder_hidden_states is a PreparedContext of batch {text.batch_size}, the noise has B={b}")
    elif not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[-1] != cfg.text_dim or text.shape[0] != b:
        shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
        raise ValueError(
            f"encoder_hidden_states must be (B={b}, S, text_dim={cfg.text_dim}) or a PreparedContext, got {shape}"
        )
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
