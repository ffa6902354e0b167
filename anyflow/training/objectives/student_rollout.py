"""Stage 2's backward simulation: the student generates a video from noise, with gradients.

With the N-step schedule ``1000 = t_0 > t_1 > ... > t_N = 0`` (the sampler's, shifted:
:func:`anyflow.sampling.flow_map_sigmas`) and a chosen step k (``grad_step``, 0 <= k < N), the
rollout makes three flow-map moves,

    z_{t_k}     = z_{t_0}     - (sigma_0     - sigma_k)     u(z_{t_0}, t_0, t_k)        (skipped when k = 0)
    z_{t_{k+1}} = z_{t_k}     - (sigma_k     - sigma_{k+1}) u(z_{t_k}, t_k, t_{k+1})
    x_0         = z_{t_{k+1}} - (sigma_{k+1} - 0)           u(z_{t_{k+1}}, t_{k+1}, 0)  (skipped when k = N - 1)

with gradients through all three, as the authors' ``training_rollout`` does (NVlabs/AnyFlow,
``far/pipelines/pipeline_wan_anyflow.py``): the student learns from its own few-step samples
(the jumps) passing through an intermediate point of an N-step run (the step).

The FAR version runs these moves chunk by chunk (``pipeline_far_wan_anyflow.py``): each chunk of
noise attends to the frames generated before it through the model's key/value cache, which is
encoded from them at t = r = 0 without gradients; the gradient of a chunk flows through its own
three moves.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple

import torch

from ...model.config import check_chunk_partition
from ...sampling.schedule import TRAIN_TIMESTEPS, flow_map_sigmas
from .velocity import is_far, velocity


def rollout_moves(num_steps: int, grad_step: int) -> List[Tuple[int, int]]:
    """The (from, to) schedule indices of the rollout's moves: (0, k), (k, k+1), (k+1, N), each where from != to."""
    for name, value in (("num_steps", num_steps), ("grad_step", grad_step)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not 0 <= grad_step < num_steps:
        raise ValueError(f"grad_step must be in [0, num_steps) = [0, {num_steps}), got {grad_step}")
    moves = [(0, grad_step), (grad_step, grad_step + 1), (grad_step + 1, num_steps)]
    return [(start, stop) for start, stop in moves if start != stop]


def _move(z: torch.Tensor, u: torch.Tensor, sigmas: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``z - (sigma_start - sigma_stop) * u``, formed in float64, rounded to u's dtype (the authors' scheduler step)."""
    return (z.double() - (sigmas[start] - sigmas[stop]) * u.double()).to(u.dtype)


def rollout(
    model,
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    num_steps: int,
    grad_step: int,
    shift: float = 5.0,
    chunk_partition: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """The student's sample from ``noise`` (B, F, C, H, W) through step ``grad_step`` of an N-step run, with gradients.

    Args:
        model: a bidirectional AnyFlow transformer (ours or diffusers'), or our FAR model (chunk by chunk).
        noise: the initial latents, standard normal.
        encoder_hidden_states: text embeddings (B, S, text_dim).
        num_steps: N, the schedule's number of steps.
        grad_step: k in [0, N): the one schedule step taken; jumps lead to it and from it to 0.
        shift: the schedule's shift.
        chunk_partition: the FAR chunks (default: the model config's); FAR models only.

    Returns:
        The generated latents x_0 (B, F, C, H, W) in the model's dtype, differentiable in the
        model's parameters.
    """
    moves = rollout_moves(num_steps, grad_step)
    sigmas = flow_map_sigmas(num_steps, shift)  # (N + 1,) float64, sigma_N = 0
    if not isinstance(noise, torch.Tensor) or noise.dim() != 5:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a 5-D tensor (B, F, C, H, W), got {shape}")
    context = encoder_hidden_states  # ours: embedded once, every block's keys and values with it (same gradient)
    if hasattr(model, "prepare_context"):
        context = model.prepare_context(encoder_hidden_states)
    if not is_far(model):
        if chunk_partition is not None:
            raise ValueError(f"chunk_partition is for a FAR model; {type(model).__name__} is bidirectional")
        return _moves(lambda z, t, r: velocity(model, z, t, r, context), noise, sigmas, moves)

    if not hasattr(model, "encode_cache"):
        raise ValueError(f"the FAR rollout runs anyflow's AnyFlowFARTransformer3DModel (its cache), "
                         f"not {type(model).__name__}")
    partition = check_chunk_partition(model.config.chunk_partition if chunk_partition is None else chunk_partition,
                                      noise.shape[1])
    chunks, cache, start = [], None, 0
    for index, frames in enumerate(partition):
        chunk = noise[:, start:start + frames]
        chunks.append(_moves(lambda z, t, r: model.step(z, t, r, context, cache), chunk, sigmas, moves))
        start += frames
        if index < len(partition) - 1:
            with torch.no_grad():  # the next chunks see these frames, clean, through the cache
                cache = model.encode_cache(torch.cat(chunks, dim=1), partition[:index + 1], context, cache)
    return torch.cat(chunks, dim=1)


def _moves(u, z: torch.Tensor, sigmas: torch.Tensor, moves) -> torch.Tensor:
    """Apply the flow-map moves to z with velocity u(z, t, r), t and r (B, F) float64 on the 1000 scale."""
    batch, frames = z.shape[:2]
    for start, stop in moves:
        t = torch.full((batch, frames), (sigmas[start] * TRAIN_TIMESTEPS).item(), dtype=torch.float64, device=z.device)
        r = torch.full_like(t, (sigmas[stop] * TRAIN_TIMESTEPS).item())
        z = _move(z, u(z, t, r), sigmas, start, stop)
    return z
