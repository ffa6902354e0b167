"""Stage 2's distribution matching (DMD): the generator's loss and the fake score's loss.

The student's samples x (from :func:`~anyflow.training.objectives.student_rollout.rollout`) are noised to a random t,
``x_t = sigma_t n + (1 - sigma_t) x``, and both scores denoise them in one jump to 0,

    x0_fake = x_t - sigma_t u_fake(x_t, t, t),      x0_real = x_t - sigma_t u_real(x_t, t, t)
    (with real guidance s:  x0_real <- x0_real + s (x0_real - x0_real_uncond))

The fake score tracks the student's own distribution, the real score (the frozen teacher) the
data's; their difference is the gradient of the KL divergence between the two, normalised per
sample by the real score's distance to the sample:

    grad = nan_to_num( (x0_fake - x0_real) / mean_{F,C,H,W} |x - x0_real| )
    L_DMD = mean (x - stopgrad(x - grad))^2          (so dL/dx = 2 grad / numel)

The fake score itself keeps up by flow matching on the student's (detached) samples,
``L_fake = mean || u_fake(x_t, t, t) - (n - x) ||^2`` with logit-normal t.

The code follows the authors' ``_compute_kl_grad``, ``generator_loss`` and ``discriminator_loss``
(NVlabs/AnyFlow, ``far/trainers/trainer_wan_anyflow_onpolicy.py``, after Self-Forcing's DMD).
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from ...sampling.schedule import TRAIN_TIMESTEPS
from .flow_map import flow_matching_loss
from .timesteps import (
    add_noise, check_latents, check_noise, check_shift, check_timesteps, draw_noise, sample_uniform_timesteps,
)
from .velocity import match_batch, frame_timesteps, velocity


def denoise(score, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states) -> torch.Tensor:
    """One jump from t to 0 with a score model, ``x_t - sigma_t u(x_t, t, t)``, in u's dtype (their scheduler step)."""
    u = velocity(score, x_t, t, t, encoder_hidden_states)
    sigma = frame_timesteps(t, x_t.shape[1]) / TRAIN_TIMESTEPS  # (B, F)
    return (x_t - sigma[..., None, None, None] * u).to(u.dtype)


@torch.no_grad()
def distribution_matching_gradient(
    pred_video: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    real_score,
    fake_score,
    encoder_hidden_states: torch.Tensor,
    negative_encoder_hidden_states: Optional[torch.Tensor] = None,
    real_guidance_scale: Optional[float] = None,
) -> torch.Tensor:
    """``nan_to_num((x0_fake - x0_real) / mean|pred_video - x0_real|)`` (B, F, C, H, W), without gradient
    (the authors' ``_compute_kl_grad``)."""
    x0_fake = denoise(fake_score, x_t, t, encoder_hidden_states)
    x0_real = denoise(real_score, x_t, t, encoder_hidden_states)
    if real_guidance_scale:
        x0_uncond = denoise(real_score, x_t, t, negative_encoder_hidden_states)
        x0_real = x0_real + (x0_real - x0_uncond) * real_guidance_scale
    grad = x0_fake - x0_real
    normalizer = (pred_video - x0_real).abs().mean(dim=[1, 2, 3, 4], keepdim=True)  # (B, 1, 1, 1, 1)
    return torch.nan_to_num(grad / normalizer)


def dmd_loss(
    pred_video: torch.Tensor,
    real_score,
    fake_score,
    encoder_hidden_states: torch.Tensor,
    *,
    t: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    negative_encoder_hidden_states: Optional[torch.Tensor] = None,
    real_guidance_scale: Optional[float] = None,
    shift: float = 5.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The generator's distribution-matching loss ``mean (x - stopgrad(x - grad))^2``, float64 as the authors'.

    Args:
        pred_video: the student's samples x (B, F, C, H, W), with their graph (from :func:`rollout`).
        real_score: the frozen teacher (a bidirectional AnyFlow transformer), called at r = t.
        fake_score: the fake score (same kind), called at r = t.
        encoder_hidden_states: text embeddings (B, S, text_dim).
        t: (B,) timesteps on the 1000 scale, shifted. None: uniform, shifted (drawn first).
        noise: n (B, F, C, H, W). None: drawn after t.
        negative_encoder_hidden_states: (B or 1, S, text_dim), needed with ``real_guidance_scale``.
        real_guidance_scale: s in ``x0_real + s (x0_real - x0_uncond)``; None or 0: none.
        shift: the shift of the drawn t (the authors' ``dmd_scheduler_cfg.shift``).
        generator: the draws' generator.

    The authors' ``dmd_weight`` multiplies this loss in the trainer; the scores are never updated by it.
    Their clamp of t to [``min_timestep``, ``max_timestep``] defaults to [0, 1000] (no config sets it),
    which leaves every t as it is: it is not repeated here.
    """
    check_latents(pred_video)
    shift = check_shift(shift)
    batch = pred_video.shape[0]
    if real_guidance_scale is not None and (isinstance(real_guidance_scale, bool)
                                            or not isinstance(real_guidance_scale, numbers.Real)):
        raise ValueError(f"real_guidance_scale must be a number or None, got {real_guidance_scale!r}")
    negative = None
    if real_guidance_scale:
        if negative_encoder_hidden_states is None:
            raise ValueError(f"real_guidance_scale={real_guidance_scale} needs negative_encoder_hidden_states")
        negative = match_batch(negative_encoder_hidden_states, batch, "negative_encoder_hidden_states")
    with torch.no_grad():
        if t is None:
            t = sample_uniform_timesteps(batch, shift=shift, generator=generator, device=pred_video.device)
        else:
            t = check_timesteps(t, "t", batch, pred_video.device)
        noise = draw_noise(pred_video, generator) if noise is None else check_noise(noise, pred_video.shape)
        x_t = add_noise(pred_video.detach(), noise, t)
        grad = distribution_matching_gradient(pred_video.detach(), x_t, t, real_score, fake_score,
                                              encoder_hidden_states, negative, real_guidance_scale)
    x = pred_video.double()
    return F.mse_loss(x, (x - grad.double()).detach(), reduction="mean")


def fake_score_loss(
    fake_score,
    video: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    t: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    shift: float = 5.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The fake score's flow-matching loss on the student's samples ``video`` (detached; the authors'
    ``discriminator_loss``): :func:`~anyflow.training.objectives.flow_map.flow_matching_loss` with logit-normal t
    when ``t`` is None, noise drawn before t."""
    return flow_matching_loss(fake_score, video.detach(), encoder_hidden_states, t=t, noise=noise, shift=shift,
                              generator=generator)
