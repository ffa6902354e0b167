"""When, and how much: the timesteps a training step draws, the noise it adds, what each sample weighs.

Timesteps live on the models' 1000 scale, ``t = 1000 * sigma``, and the noisy latent at t is

    x_t = sigma * noise + (1 - sigma) * x_0                              (:func:`add_noise`)

Every draw u in [0, 1] is shifted as the sampler's schedule is,

    sigma = shift * u / (1 + (shift - 1) * u)                           (:func:`shift_sigma`)

so that training visits the noise levels sampling uses (shift 5 for every released model).

Three draws, one per objective, each as the authors make it (NVlabs/AnyFlow ``far/trainers``):

- the flow map (stage 1): two uniforms, t the larger and r the smaller, then a share of the global
  batch made diffusion samples (r = t), a share consistency samples (r = 0), the rest left free
  (:func:`sample_flow_map_timesteps`);
- plain flow matching (stage 0 and the fake score): u = sigmoid(n), n ~ N(0, 1), "logit-normal"
  (:func:`sample_logit_normal_timesteps`);
- distribution matching (stage 2's generator): u uniform (:func:`sample_uniform_timesteps`).

A draw is made on the generator's device (without one: with the global generator, on ``device``).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from ...sampling.schedule import TRAIN_TIMESTEPS

WEIGHTINGS = ("beta08", "gaussian", "uniform")


def check_shift(shift: float) -> float:
    """A positive finite shift, or a ValueError naming it."""
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")
    return float(shift)


def check_latents(latents, name: str = "latents") -> None:
    """Latents must be a 5-D tensor (B, F, C, H, W), or a ValueError naming them."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"{name} must be a 5-D tensor (B, F, C, H, W), got {shape}")


def check_timesteps(value, name: str, batch: int, device: torch.device) -> torch.Tensor:
    """A (B,) tensor of finite timesteps on the 1000 scale, floating point (integers become float32)."""
    tensor = torch.as_tensor(value, device=device)
    if tensor.shape != (batch,):
        raise ValueError(f"{name} must be a (B,) = ({batch},) tensor of timesteps, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} has non-finite values: {tensor.tolist()}")
    return tensor


def check_noise(noise, shape) -> torch.Tensor:
    """Noise of exactly ``shape`` (that of the latents it noises), or a ValueError."""
    if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != tuple(shape):
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must have the shape of the noised latents {tuple(shape)}, got {got}")
    return noise


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * u / (1 + (shift - 1) * u)``: noise levels in [0, 1] moved towards 1 (identity at shift 1)."""
    return u if shift == 1.0 else shift * u / (1 + (shift - 1) * u)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = sigma * noise + (1 - sigma) * x_0``, ``sigma = t / 1000``; t (B,) or (B, F), x0 (B, F, C, H, W)."""
    sigma = t.to(device=x0.device, dtype=x0.dtype) / TRAIN_TIMESTEPS
    sigma = sigma.view(*sigma.shape, *[1] * (x0.dim() - sigma.dim()))  # (B, 1, 1, 1, 1) or (B, F, 1, 1, 1)
    return sigma * noise + (1.0 - sigma) * x0


def _draw_device(generator: Optional[torch.Generator], device: Union[str, torch.device, None]) -> torch.device:
    return generator.device if generator is not None else torch.device(device or "cpu")


def draw_noise(like: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise drawn as ``torch.randn_like(like)`` draws it (in ``like``'s memory order),
    from ``generator``."""
    if generator is None:
        return torch.randn_like(like)
    return torch.empty_like(like, device=generator.device).normal_(generator=generator).to(like.device)


def distributed_position() -> Tuple[int, int]:
    """(rank, world size) of this process under ``torch.distributed``; (0, 1) when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sample_flow_map_timesteps(
    batch_size: int,
    *,
    shift: float = 5.0,
    diffusion_ratio: float = 0.5,
    consistency_ratio: float = 0.25,
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device, None] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1's (t, r) pairs: ``t`` (B,), ``r`` (B,) on the 1000 scale, shifted, and ``is_diffusion`` (B,) bool.

    u1, u2 ~ U[0, 1) (u1 drawn first); t = max(u1, u2), r = min(u1, u2). Sample j of the global
    batch (global index ``rank * B + j``, of ``world_size * B``) is

    - a diffusion sample, r = t, if j < n_d = round(diffusion_ratio * global batch);
    - a consistency sample, r = 0, if n_d <= j < n_d + round(consistency_ratio * global batch);
    - free (t > r > 0) otherwise.

    So the diffusion samples sit on the first ranks, as in the authors' ``sample_timestep``
    (Python's ``round``, halves to even). ``rank`` and ``world_size`` default to this process's.
    """
    default_rank, default_world = distributed_position()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    where = _draw_device(generator, device)
    u1 = torch.rand(batch_size, generator=generator, device=where)
    u2 = torch.rand(batch_size, generator=generator, device=where)
    t, r = torch.maximum(u1, u2), torch.minimum(u1, u2)

    global_batch = world_size * batch_size
    n_diffusion = round(diffusion_ratio * global_batch)
    n_consistency = round(consistency_ratio * global_batch)
    index = rank * batch_size + torch.arange(batch_size, device=where)  # position in the global batch
    is_diffusion = index < n_diffusion
    is_consistency = ~is_diffusion & (index < n_diffusion + n_consistency)
    r = torch.where(is_diffusion, t, torch.where(is_consistency, torch.zeros_like(r), r))

    t, r = shift_sigma(t, shift) * TRAIN_TIMESTEPS, shift_sigma(r, shift) * TRAIN_TIMESTEPS
    target = torch.device(device) if device is not None else where
    return t.to(target), r.to(target), is_diffusion.to(target)


def sample_logit_normal_timesteps(
    batch_size: int, *, shift: float = 5.0, generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """(B,) timesteps ``1000 * shift_sigma(sigmoid(n))``, n ~ N(0, 1): stage 0's and the fake score's draw."""
    n = torch.normal(0.0, 1.0, size=(batch_size,), generator=generator, device=_draw_device(generator, device))
    t = shift_sigma(torch.sigmoid(n), shift) * TRAIN_TIMESTEPS
    return t.to(device) if device is not None else t


def sample_uniform_timesteps(
    batch_size: int, *, shift: float = 5.0, generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """(B,) timesteps ``1000 * shift_sigma(u)``, u ~ U[0, 1): the distribution-matching loss's draw."""
    u = torch.rand(batch_size, generator=generator, device=_draw_device(generator, device))
    t = shift_sigma(u, shift) * TRAIN_TIMESTEPS
    return t.to(device) if device is not None else t


class LossWeighting:
    """w(t): the authors' per-timestep loss weight, a table over their training grid looked up at the nearest point.

    The grid is the 1001 shifted timesteps ``g_i = 1000 * shift_sigma(1 - i / 1000)``, i = 0..1000
    (float64, from 1000 down to 0). With ``s_i = g_i / 1000``, the kinds are

    - "beta08":   y_i = s_i * (1 - s_i) ** 0.5   (the authors' name; the exponents are 1 and 1/2)
    - "gaussian": y_i = exp(-2 * ((g_i - 500) / 1000) ** 2) - min_j(...)
    - "uniform":  y_i = 1  (no normalisation)

    normalised (beta08, gaussian) to ``w_i = 1000 * y_i / sum_j y_j``. ``weighting(t)`` returns, in
    float64, the w_i of the grid point nearest to each t (the first of two equally near).
    """

    def __init__(self, kind: str = "beta08", shift: float = 5.0):
        if kind not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {kind!r}")
        shift = check_shift(shift)
        base = torch.linspace(1.0, 0.0, TRAIN_TIMESTEPS + 1, dtype=torch.float64)
        self.kind = kind
        self.grid = shift_sigma(base, shift) * TRAIN_TIMESTEPS  # (1001,) from 1000 down to 0
        if kind == "beta08":
            s = self.grid / TRAIN_TIMESTEPS
            y = (s ** 1.0) * ((1 - s) ** 0.5)
            self.weights = y * (TRAIN_TIMESTEPS / y.sum())
        elif kind == "gaussian":
            y = torch.exp(-2 * ((self.grid - TRAIN_TIMESTEPS / 2) / TRAIN_TIMESTEPS) ** 2)
            y = y - y.min()
            self.weights = y * (TRAIN_TIMESTEPS / y.sum())
        else:
            self.weights = torch.ones_like(self.grid)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """Weights (float64, t's shape and device) of timesteps t on the 1000 scale."""
        nearest = (self.grid[:, None] - t.detach().flatten()[None, :].to(self.grid.device)).abs().argmin(dim=0)
        return self.weights[nearest].reshape(t.shape).to(t.device)
