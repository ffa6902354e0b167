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
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .config import AnyFlowFARConfig, check_chunk_partition
from .model import PreparedContext

TRAIN_TIMESTEPS = 1000
MAX_STEPS = TRAIN_TIMESTEPS  # the timestep grid the models were trained on: finer schedules add nothing
Context = Union[torch.Tensor, PreparedContext]


def flow_map_sigmas(num_steps: int = 4, shift: float = 5.0, sigmas: Optional[Sequence[float]] = None) -> torch.Tensor:
    """The N + 1 noise levels of an N-step run, float64, from 1 (or ``sigmas[0]``) down to a terminal 0.

    Without ``sigmas`` the base levels are ``linspace(1, 0, N + 1)[:N]``; either way they are
    shifted, ``shift * s / (1 + (shift - 1) * s)``, and a 0 is appended. ``sigmas`` must be
    strictly decreasing and inside [0, 1]; it sets N. A schedule in which no step would run
    (``sigmas=[0.0]``) is refused, and so is one of more than ``MAX_STEPS`` (1000) steps.
    """
    if not (isinstance(shift, numbers.Real) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")
    if sigmas is None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or not 1 <= num_steps <= MAX_STEPS:
            raise ValueError(f"num_steps must be an int from 1 to {MAX_STEPS} (the models' timestep grid), "
                             f"got {num_steps!r}")
        base = torch.linspace(1.0, 0.0, int(num_steps) + 1, dtype=torch.float64)[:-1]
    else:
        base = torch.as_tensor(list(sigmas), dtype=torch.float64)
        if base.dim() != 1 or base.numel() == 0:
            raise ValueError(f"sigmas must be a non-empty list of numbers, got {sigmas!r}")
        if base.numel() > MAX_STEPS:
            raise ValueError(f"sigmas gives {base.numel()} steps; at most {MAX_STEPS} (the models' timestep grid)")
        if not torch.isfinite(base).all() or (base < 0).any() or (base > 1).any():
            raise ValueError(f"sigmas must lie in [0, 1], got {base.tolist()}")
        if (base[1:] >= base[:-1]).any():
            raise ValueError(f"sigmas must be strictly decreasing, got {base.tolist()}")
        if base[0] == 0:
            raise ValueError(f"sigmas {base.tolist()} give no step: the schedule ends at 0, where it starts")
    shifted = base if shift == 1.0 else shift * base / (1 + (shift - 1) * base)
    return torch.cat([shifted, shifted.new_zeros(1)])


def steps_to_run(schedule: torch.Tensor) -> List[int]:
    """The indices i of the steps ``schedule[i] -> schedule[i + 1]`` that run: every one with t != r.

    Custom sigmas ending in 0 make a last step from 0 to the terminal 0, which is skipped.
    """
    return [i for i in range(len(schedule) - 1) if schedule[i] != schedule[i + 1]]


def flow_map_step(latents: torch.Tensor, velocity: torch.Tensor, schedule: torch.Tensor, i: int) -> torch.Tensor:
    """``z_r = z_t - (sigma_t - sigma_r) * u`` for step i of ``schedule``, in the velocity's dtype."""
    return (latents - (schedule[i] - schedule[i + 1]).item() * velocity).to(velocity.dtype)


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
        ``output_type="latent"`` (``anyflow sample`` stores them so too).
    """
    _check_model(model, far=False)
    schedule = flow_map_sigmas(num_steps, shift, sigmas)
    guided = _check_guidance(guidance_scale, encoder_hidden_states, negative_encoder_hidden_states)
    _check_sampling_inputs(model, noise, encoder_hidden_states, context_latents)
    _check_finite(noise=noise, encoder_hidden_states=encoder_hidden_states, context_latents=context_latents,
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

    for i in steps_to_run(schedule):
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
        if callback is not None:
            callback(i, t.item(), latents)
    if given:
        latents[:, :given] = context_latents
    return latents


def _check_model(model, far: bool) -> None:
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


def _check_finite(**inputs) -> None:
    """Once per call: a NaN or infinity in an input would make every latent NaN without a word."""
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = (~torch.isfinite(value)).sum().item()
            raise ValueError(f"{name} has {bad} NaN or infinite values (of {value.numel()})")


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


def sample_far(
    model,
    noise: torch.Tensor,
    encoder_hidden_states: Context,
    *,
    num_steps: int = 4,
    sigmas: Optional[Sequence[float]] = None,
    shift: float = 5.0,
    use_mean_velocity: bool = True,
    chunk_partition: Optional[Sequence[int]] = None,
    context_latents: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[int, int, float, torch.Tensor], None]] = None,
    incremental_cache: bool = True,
    chunk_callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Sample latents chunk by chunk with an AnyFlow FAR model.

    Each chunk of ``chunk_partition`` runs the same flow-map schedule as :func:`sample`, attending
    to the clean frames made before it (a :class:`anyflow.far.FarKVCache`, refreshed after each
    chunk). Given frames (image or video conditioning) fill the first chunks: they are cached,
    never denoised.

    Args:
        model: an :class:`anyflow.far.AnyFlowFARTransformer3DModel`.
        noise: initial latents (B, F, C, H, W), standard normal.
        encoder_hidden_states: UMT5 embeddings (B, S, text_dim) or a :class:`PreparedContext`.
        num_steps, sigmas, shift, use_mean_velocity: the schedule of every chunk, as in :func:`sample`.
        chunk_partition: frames of each chunk, summing to F (default: the model config's, the released
            81-frame split).
        context_latents: K given latent frames (B, K, C, H, W); K must end a chunk (1 for an image
            with the released split, 4 for 13 video frames, ...).
        callback: called after every step as ``callback(chunk_index, step_index, t, chunk_latents)``.
        incremental_cache: refresh the cache by encoding only what changed (default); False
            re-encodes every frame made so far after each chunk, as the reference does (same result).
        chunk_callback: called once per chunk, in order, as soon as its latents are final, as
            ``chunk_callback(chunk_index, chunk_latents)`` (B, frames of the chunk, C, H, W), the
            given chunks included: a caller can decode and show a chunk while the next is made.

    Returns:
        The latents (B, F, C, H, W) in the model's dtype (all frames, the given ones included).
    """
    _check_model(model, far=True)
    schedule = flow_map_sigmas(num_steps, shift, sigmas)
    steps = steps_to_run(schedule)
    cfg = model.config
    if not isinstance(noise, torch.Tensor) or noise.dim() != 5:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a 5-D tensor (B, F, C, H, W), got {shape}")
    batch, frames = noise.shape[:2]
    partition = check_chunk_partition(cfg.chunk_partition if chunk_partition is None else chunk_partition, frames)
    ends = [sum(partition[:i + 1]) for i in range(len(partition))]
    given = check_given_frames(context_latents, tuple(noise.shape), partition)
    _check_finite(noise=noise, encoder_hidden_states=encoder_hidden_states, context_latents=context_latents)

    device, dtype = model.device, model.dtype
    latents = noise.to(device=device, dtype=dtype, copy=True)  # never write into the caller's noise
    if given:
        latents[:, :given] = context_latents.to(device=device, dtype=dtype)
    with torch.no_grad():
        context = encoder_hidden_states
        if isinstance(context, torch.Tensor):
            context = model.prepare_context(context.to(device))  # checks the embeddings
        cache = None
        for chunk, (start, stop) in enumerate(zip([0] + ends[:-1], ends)):
            if stop > given:
                z = latents[:, start:stop]
                for i in steps:
                    t = (schedule[i] * TRAIN_TIMESTEPS).item()
                    r = (schedule[i + 1] * TRAIN_TIMESTEPS).item() if use_mean_velocity else t
                    # (B, F_chunk) float32 timesteps filled in on the device: one compiled graph for every step
                    t_grid, r_grid = (torch.full(z.shape[:2], value, device=device) for value in (t, r))
                    z = flow_map_step(z, model.step(z, t_grid, r_grid, context, cache), schedule, i)
                    if callback is not None:
                        callback(chunk, i, t, z)
                latents[:, start:stop] = z
            if chunk_callback is not None:
                chunk_callback(chunk, latents[:, start:stop])
            if chunk < len(partition) - 1:
                cache = model.encode_cache(latents[:, :stop], partition[:chunk + 1], context,
                                           cache if incremental_cache else None,
                                           reserve_frames=partition[chunk + 1])  # the next chunk's steps write there
    return latents


def check_given_frames(context_latents: Optional[torch.Tensor], noise_shape: Tuple[int, ...],
                       chunk_partition: Sequence[int]) -> int:
    """The number K of frames given to :func:`sample_far`, checked against the noise's shape and to end a chunk."""
    if context_latents is None:
        return 0
    chunk_ends = [sum(chunk_partition[:i + 1]) for i in range(len(chunk_partition))]
    b, f, c, h, w = noise_shape
    if (not isinstance(context_latents, torch.Tensor) or context_latents.dim() != 5 or context_latents.shape[0] != b
            or tuple(context_latents.shape[2:]) != (c, h, w)):
        shape = tuple(context_latents.shape) if isinstance(context_latents, torch.Tensor) else type(context_latents).__name__
        raise ValueError(f"context_latents must be (B={b}, K, C={c}, H={h}, W={w}), got {shape}")
    given = context_latents.shape[1]
    if given >= f:
        raise ValueError(f"context_latents gives {given} frames but the video has {f}: nothing would be generated")
    if given not in chunk_ends:
        raise ValueError(
            f"context_latents gives {given} frames, which do not fill whole chunks (chunks end after frames "
            f"{chunk_ends[:-1]}); give that many frames or choose a chunk_partition with a chunk ending at {given}"
        )
    return given
