"""The flow-map schedule: the noise levels of an N-step run, which steps run, and the step itself."""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence

import torch

from ..model.config import TRAIN_TIMESTEPS

MAX_STEPS = TRAIN_TIMESTEPS  # the timestep grid the models were trained on: finer schedules add nothing


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
