"""What updates the trained weights: gradient clipping over sharded and whole gradients, AdamW with the
learning rate of ``constant_with_warmup``, and the EMA of the trained weights; parameters that may be
FSDP2 shards or whole tensors alike.

Every update: the learning rate ``lr * k / warmup_iter`` at update k < ``warmup_iter`` (transformers'
``constant_with_warmup``, which the authors use: the first update has lr 0), gradients clipped to a global
norm of ``max_grad_norm``, AdamW, then the EMA (``ema_decay``; a plain copy for the first
``ema_warmup_step`` updates, as the authors' ShardEMA).
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
from torch import nn


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of an FSDP2 DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 DTensor gathered from every process (all must call), else the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def clip_gradients(parameters: Sequence[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so that their global L2 norm is at most ``max_norm``; the norm before.

    As ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``, at most 1), for
    a mix of FSDP2-sharded gradients (their squares summed over the processes) and whole ones
    (the replicated fp32 islands, the same on every process, counted once).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [local(g).float().square().sum() for g in grads if hasattr(g, "to_local")]
    whole_grads = [g.float().square().sum() for g in grads if not hasattr(g, "to_local")]
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.stack(sharded).sum() if sharded else torch.zeros((), device=device)
    if sharded and dist.is_initialized():
        dist.all_reduce(total)
    if whole_grads:
        total = total + torch.stack(whole_grads).sum().to(total.device)
    norm = total.sqrt()
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        local(g).mul_(coefficient.to(g.device))
    return norm.item()


class EMA:
    """Exponential moving average of the trained parameters, in float32 (this process's shards).

    ``update(k)`` after update k: ``ema <- d * ema + (1 - d) * p`` with d = 0 (a copy) for
    k < ``warmup_steps`` and ``decay`` after, as the authors' ShardEMA.
    """

    def __init__(self, named: Dict[str, nn.Parameter], decay: float, warmup_steps: int):
        self.named, self.decay, self.warmup_steps = named, decay, warmup_steps
        self.shadow = {name: local(p).detach().float().clone() for name, p in named.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = self.decay if step >= self.warmup_steps else 0.0
        for name, p in self.named.items():
            self.shadow[name].mul_(decay).add_(local(p).detach().float(), alpha=1 - decay)

    def whole(self) -> Dict[str, torch.Tensor]:
        """The averages as whole tensors (every process must call: sharded ones are gathered)."""
        out = {}
        for name, p in self.named.items():
            if hasattr(p, "to_local"):
                from torch.distributed.tensor import DTensor

                out[name] = DTensor.from_local(self.shadow[name].to(p.dtype), p.device_mesh, p.placements,
                                               shape=p.shape, stride=p.stride()).full_tensor()
            else:
                out[name] = self.shadow[name]
        return out


class TrainedModel:
    """A model that trains, with its parameters, optimizer and learning rate."""

    def __init__(self, name: str, model: nn.Module, options, lora: bool):
        self.name, self.model, self.options, self.lora = name, model, options, lora
        self.named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.updates = 0  # the learning rate's schedule counts this model's updates
        self.optimizer = torch.optim.AdamW(list(self.named.values()), lr=options.lr, betas=tuple(options.betas),
                                           weight_decay=options.weight_decay)

    def update(self, warmup: int, max_grad_norm: float) -> float:
        """Clip, set the learning rate of this update and take it; the gradient norm before clipping.

        A non-finite norm (a NaN or infinite gradient) takes no update: the weights, the optimizer's
        state and the schedule stay as they were, and the norm is returned for the caller to judge.
        """
        norm = clip_gradients(list(self.named.values()), max_grad_norm)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return norm
        for group in self.optimizer.param_groups:
            group["lr"] = self.options.lr * (min(1.0, self.updates / warmup) if warmup > 0 else 1.0)
        self.optimizer.step()
        self.updates += 1
        return norm


def sharded_like(state: dict, parameters: List[nn.Parameter]) -> dict:
    """An optimizer state of local shards, its tensors made DTensors again where the parameters are."""
    from torch.distributed.tensor import DTensor

    for index, values in state["state"].items():
        p = parameters[index]
        if hasattr(p, "to_local"):
            for key, value in values.items():
                if value.dim() > 0:  # exp_avg, exp_avg_sq (step is a scalar)
                    values[key] = DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return state


def mean_over_processes(loss: torch.Tensor) -> float:
    """A loss averaged over the processes (itself alone)."""
    value = loss.detach().float().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()
