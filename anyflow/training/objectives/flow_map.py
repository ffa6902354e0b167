"""Stages 0 and 1: the teacher's flow matching (:func:`flow_matching_loss`, ``L_0``), and the forward flow-map
objective that makes the student (:class:`FlowMapLoss`, ``L_1``: the mean velocity regressed onto
``v - (t - r) dF/dt``, a central difference of the model itself, with guidance fused, weighted by ``w(t)``
and rescaled to the diffusion samples' mean).

The math, with its notation, is written once, in docs/TRAINING.md ("Stage 0", "Stage 1"). The code
follows the authors' ``train_bidirection`` / ``train_causal`` and ``compute_central_difference``
(NVlabs/AnyFlow, ``far/trainers/trainer_*_anyflow_pretrain.py``).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import torch

from ...sampling.schedule import TRAIN_TIMESTEPS
from .timesteps import (
    WEIGHTINGS, LossWeighting, add_noise, check_latents, check_noise, check_shift, check_timesteps, draw_noise,
    sample_flow_map_timesteps, sample_logit_normal_timesteps,
)
from .velocity import far_split, frame_timesteps, is_far, match_batch, velocity

RESCALE_EPS = 1e-5  # the authors' guard in the rescale's denominator

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # u(x, t, r, text)


def fuse_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``(u_cond - (1 - g) u_uncond) / g``: trained to a target, it makes u_cond the guided velocity."""
    return (cond - (1 - guidance_scale) * uncond) / guidance_scale


@torch.no_grad()
def central_difference(u: Velocity, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                       text, epsilon: float, guidance_scale: float = 1.0) -> torch.Tensor:
    """dF/dt ~ [u(x_t + v eps/1000, t + eps, r) - u(x_t - v eps/1000, t - eps, r)] / (2 eps g), no gradient.

    x_t moves along its path (velocity v = n - x_0) as t moves by +-eps; r stays.
    """
    step = v * (epsilon / TRAIN_TIMESTEPS)
    plus = u(x_t + step, t + epsilon, r, text)
    minus = u(x_t - step, t - epsilon, r, text)
    return (plus - minus) / (2 * epsilon * guidance_scale)


def rescale_to_diffusion_mean(loss: torch.Tensor, is_diffusion: torch.Tensor) -> torch.Tensor:
    """Per-sample losses (B,) with every non-diffusion sample's scaled to the diffusion samples' mean:

        l_i <- l_i * m / (l_i + 1e-5)   for i not a diffusion sample,   m = mean of l_j over diffusion samples j,

    the factor without gradient (so l_i keeps its direction, takes m's size). m is over the global
    batch: a sum all-reduce under ``torch.distributed`` when it is initialised, so every rank must
    call this together. Without a diffusion sample in the global batch nothing is rescaled (the
    authors' code would divide by an empty mean: NaN).
    """
    with torch.no_grad():
        totals = torch.stack([loss[is_diffusion].sum(), is_diffusion.sum().to(loss.dtype)])  # (sum, count)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        if totals[1] == 0:
            return loss
        diffusion_mean = totals[0] / totals[1]
        factor = torch.where(is_diffusion, torch.ones_like(loss), diffusion_mean / (loss + RESCALE_EPS))
    return loss * factor


def _check_ratio(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_guidance(guidance_scale) -> Optional[float]:
    if guidance_scale is None:
        return None
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
            or not math.isfinite(guidance_scale) or guidance_scale <= 0:
        raise ValueError(f"guidance_scale must be a positive number or None, got {guidance_scale!r}")
    return float(guidance_scale)


def _guided(guidance_scale: Optional[float], negative, batch: int):
    """The negative embeddings matched to the batch when guidance is on (g not None or 1), else None."""
    if guidance_scale is None or guidance_scale == 1.0:
        return None
    if negative is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs negative_encoder_hidden_states "
                         "(the negative prompt's embeddings)")
    return match_batch(negative, batch, "negative_encoder_hidden_states")


class FlowMapLoss:
    """Stage 1, the forward flow-map objective (the authors' ``train_bidirection`` / ``train_causal``).

    Args:
        shift: the timestep shift of the draws and of the weighting grid (the authors' ``scheduler_cfg.shift``).
        epsilon: the central difference's half-step, on the 1000 scale (``flowmap_cfg.epsilon``).
        weighting: "beta08", "gaussian" or "uniform" (``scheduler_cfg.weight_type``).
        guidance_scale: the guidance g fused into the student (``fuse_guidance_scale``); None or 1: none.
        diffusion_ratio, consistency_ratio: the global batch's shares of r = t and r = 0 samples.

    ``loss_fn(model, latents, encoder_hidden_states, ...)`` returns the scalar loss (float64, as the
    authors' float64 weight table makes it) whose gradient reaches the model's parameters; see
    :meth:`__call__`.
    """

    def __init__(self, shift: float = 5.0, epsilon: float = 5.0, weighting: str = "beta08",
                 guidance_scale: Optional[float] = 3.0, diffusion_ratio: float = 0.5, consistency_ratio: float = 0.25):
        self.shift = check_shift(shift)
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0 < epsilon < TRAIN_TIMESTEPS:
            raise ValueError(f"epsilon must be a number in (0, {TRAIN_TIMESTEPS}), got {epsilon!r}")
        self.epsilon = epsilon
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        self.weighting = LossWeighting(weighting, self.shift)
        self.guidance_scale = _check_guidance(guidance_scale)
        self.diffusion_ratio = _check_ratio(diffusion_ratio, "diffusion_ratio")
        self.consistency_ratio = _check_ratio(consistency_ratio, "consistency_ratio")
        if self.diffusion_ratio + self.consistency_ratio > 1:
            raise ValueError(f"diffusion_ratio + consistency_ratio must be at most 1, got "
                             f"{self.diffusion_ratio} + {self.consistency_ratio}")

    def __call__(
        self,
        model,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        t: Optional[torch.Tensor] = None,
        r: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        is_diffusion: Optional[torch.Tensor] = None,
        negative_encoder_hidden_states: Optional[torch.Tensor] = None,
        chunk_partition: Optional[Sequence[int]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """The stage-1 loss of one (local) batch.

        Args:
            model: an AnyFlow transformer (ours or diffusers'), bidirectional or FAR.
            latents: clean latents x_0 (B, F, C, H, W).
            encoder_hidden_states: text embeddings (B, S, text_dim).
            t, r: (B,) timesteps on the 1000 scale, already shifted; both or neither. None: drawn
                (:func:`~anyflow.training.objectives.timesteps.sample_flow_map_timesteps`).
            noise: n, shaped like the noised frames. None: drawn (before t and r, as the authors do).
            is_diffusion: (B,) bool, the samples whose loss sets the rescale (default: those drawn
                as such, or ``r == t`` for given timesteps).
            negative_encoder_hidden_states: the negative prompt's embeddings (B or 1, S, text_dim),
                needed when guidance is fused.
            chunk_partition: for a FAR model, the chunks of the F frames (default: the config's).
                The frames before the last ``full_chunk_limit`` chunks are clean context at t = r = 0;
                the rest are noised, and t, r, noise refer to them; the model also sees clean copies
                of them (at t = 0), as the authors' ``train_causal`` does.
            generator: the random draws' generator (noise, then t and r).
        """
        check_latents(latents)
        far = chunk_partition is not None or is_far(model)
        context_latents = None
        if far:
            partition, context_frames = far_split(model, latents.shape[1], chunk_partition)
            context_latents, latents = latents[:, :context_frames], latents[:, context_frames:]
        batch, frames = latents.shape[:2]
        device = latents.device

        # draws: the noise, then (t, r) and the sample kinds
        noise = draw_noise(latents, generator) if noise is None else check_noise(noise, latents.shape)
        if t is None and r is None:
            t, r, drawn = sample_flow_map_timesteps(
                batch, shift=self.shift, diffusion_ratio=self.diffusion_ratio,
                consistency_ratio=self.consistency_ratio, generator=generator, device=device)
        elif t is None or r is None:
            raise ValueError("give both t and r, or neither (then both are drawn)")
        else:
            t = check_timesteps(t, "t", batch, device)
            r = check_timesteps(r, "r", batch, device)
            drawn = r == t
        if is_diffusion is None:
            is_diffusion = drawn
        elif not isinstance(is_diffusion, torch.Tensor) or is_diffusion.dtype != torch.bool \
                or tuple(is_diffusion.shape) != (batch,):
            raise ValueError(f"is_diffusion must be a (B,) = ({batch},) bool tensor, got "
                             f"{getattr(is_diffusion, 'shape', type(is_diffusion).__name__)}")
        negative = _guided(self.guidance_scale, negative_encoder_hidden_states, batch)
        u = self._velocity(model, latents, context_latents, partition if far else None)

        # the prediction, with guidance fused: (u_cond - (1 - g) u_uncond) / g
        x_t = add_noise(latents, noise, t)  # (B, F, C, H, W)
        prediction = u(x_t, t, r, encoder_hidden_states)
        guidance = 1.0
        if negative is not None:
            guidance = self.guidance_scale
            with torch.no_grad():
                uncond = u(x_t, t, r, negative)
            prediction = fuse_guidance(prediction, uncond, guidance)

        # the target: v - (t - r) dF/dt
        v = noise - latents
        dF_dt = central_difference(u, x_t, v, t, r, encoder_hidden_states, self.epsilon, guidance)
        target = v - (t - r).view(batch, 1, 1, 1, 1) * dF_dt

        # per-sample error, weighted by w(t), non-diffusion samples rescaled
        error = ((prediction.float() - target.float()) ** 2).reshape(batch, -1).mean(dim=1)  # (B,)
        weighted = error * self.weighting(t)  # (B,) float64
        return rescale_to_diffusion_mean(weighted, is_diffusion.to(device)).mean()

    @staticmethod
    def _velocity(model, latents, context_latents, partition) -> Velocity:
        """u(x, t, r, text) of the noised frames: the model alone, or FAR with its clean context and copies."""
        if partition is None:
            return lambda x, t, r, text: velocity(model, x, t, r, text)
        batch, frames = latents.shape[:2]
        zeros = torch.zeros(batch, context_latents.shape[1], device=latents.device)  # context: t = r = 0
        clean_timestep = torch.zeros(batch, frames, device=latents.device)

        def u(x, t, r, text):
            t_all = torch.cat([zeros, frame_timesteps(t, frames)], dim=1)  # (B, F_context + F)
            r_all = torch.cat([zeros, frame_timesteps(r, frames)], dim=1)
            return velocity(model, torch.cat([context_latents, x], dim=1), t_all, r_all, text,
                            chunk_partition=list(partition), clean_hidden_states=latents, clean_timestep=clean_timestep)
        return u


def flow_matching_loss(
    model,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    t: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    shift: float = 5.0,
    guidance_scale: Optional[float] = None,
    negative_encoder_hidden_states: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Stage 0, the teacher's flow matching: ``mean_b || u(x_t, t, t) - (n - x_0) ||^2`` (the authors'
    ``WanTeacherTrainer.train_bidirection``).

    Args:
        model: a bidirectional AnyFlow transformer (ours or diffusers').
        latents: clean latents x_0 (B, F, C, H, W).
        encoder_hidden_states: text embeddings (B, S, text_dim).
        t: (B,) timesteps on the 1000 scale, shifted. None: logit-normal, shifted
            (:func:`~anyflow.training.objectives.timesteps.sample_logit_normal_timesteps`).
        noise: n (B, F, C, H, W). None: drawn, before t.
        shift: the shift of the drawn t.
        guidance_scale: a guidance g to fuse, ``(u_cond - (1 - g) u_uncond) / g`` (None or 1: none).
        negative_encoder_hidden_states: (B or 1, S, text_dim), needed with guidance.
        generator: the draws' generator.

    Returns:
        The scalar loss (float32), with gradients to the model's parameters.
    """
    check_latents(latents)
    if is_far(model):
        raise ValueError("flow_matching_loss trains a bidirectional model; a FAR model trains with FlowMapLoss "
                         "and its chunk_partition")
    shift = check_shift(shift)
    guidance_scale = _check_guidance(guidance_scale)
    batch = latents.shape[0]
    noise = draw_noise(latents, generator) if noise is None else check_noise(noise, latents.shape)
    if t is None:
        t = sample_logit_normal_timesteps(batch, shift=shift, generator=generator, device=latents.device)
    else:
        t = check_timesteps(t, "t", batch, latents.device)
    negative = _guided(guidance_scale, negative_encoder_hidden_states, batch)

    x_t = add_noise(latents, noise, t)
    prediction = velocity(model, x_t, t, t, encoder_hidden_states)
    if negative is not None:
        with torch.no_grad():
            uncond = velocity(model, x_t, t, t, negative)
        prediction = fuse_guidance(prediction, uncond, guidance_scale)
    target = noise - latents
    return ((prediction.float() - target.float()) ** 2).reshape(batch, -1).mean(dim=1).mean()
