"""Training LoRA: low-rank updates injected into named linear modules, saved as a diffusers / PEFT adapter.

The authors train every stage as a PEFT LoRA (rank 256, alpha 256) on the modules whose diffusers
names contain one of their targets: self-attention q, k, v, o (``attn1.to_q`` ...), the FFN
(``ffn.net.0.proj``, ``ffn.net.2``) and both time MLPs (``time_embedder``, ``delta_embedder``).
:func:`inject_lora` takes the same targets, or our own names (``self_attn.q``, ``ffn.fc_in``,
``source_time_mlp``, ...), and matches them as the authors do: a target selects every linear module
whose name contains it (a bare string is one target: ``"attn1.to_q"`` selects the q projections).
Each selected :class:`anyflow.model.layers.Linear` becomes a :class:`LoRALinear`,

    y = W x + b + (alpha / rank) * B (A x)        A (rank, in), B (out, rank)

keeping its ``weight`` and ``bias`` (same parameters, same names), with ``lora_A.weight`` and
``lora_B.weight`` beside them. A starts Kaiming-uniform and B zero, as PEFT starts them, so the
model is unchanged until B trains.

:func:`save_lora_adapter` writes the factors as diffusers' ``save_lora_weights`` does
(``transformer.<diffusers module>.lora_A.weight``, with ``lora_adapter_metadata`` holding rank and
alpha): :meth:`merge_lora`, ``from_pretrained(lora=...)``, ``anyflow sample --lora`` and diffusers'
``load_lora_weights`` all read it.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..model.layers import Linear, linear


class LoRALinear(Linear):
    """A linear layer plus a low-rank update ``(alpha / rank) * B @ A``; ``weight`` and ``bias`` are the base's own."""

    def __init__(self, base: Linear, rank: int, alpha: float, generator: Optional[torch.Generator] = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = Linear(rank, self.out_features, bias=False, **factory)
        with torch.no_grad():  # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), drawn on the CPU
            bound = 1 / math.sqrt(self.in_features)
            self.lora_A.weight.copy_(torch.empty(rank, self.in_features).uniform_(-bound, bound, generator=generator))
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.bias)  # (..., out)
        down = self.lora_A(x).to(out.dtype)  # (..., rank)
        # the update added into the base output in one product (no second output-sized tensor: the FFN's is the
        # largest activation of a block); the base output is saved by no backward, so it may change in place
        flat = out.view(-1, self.out_features)
        flat.addmm_(down.reshape(-1, self.rank), self.lora_B.weight.t().to(out.dtype), alpha=self.scaling)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def diffusers_module_name(ours: str) -> str:
    """Our module name -> diffusers' (``blocks.0.self_attn.q`` -> ``blocks.0.attn1.to_q``)."""
    from weights_convert.state_dict import rename_key

    name = rename_key(f"{ours}.weight", "to_diffusers")
    if name is None:
        raise ValueError(f"{ours} has no diffusers name (not a module of the AnyFlow transformer)")
    return name[: -len(".weight")]


def linear_modules(model: nn.Module) -> Dict[str, Tuple[str, Linear]]:
    """Every linear module of the model (LoRA factors aside): our name -> (its diffusers name, the module)."""
    return {name: (diffusers_module_name(name), module) for name, module in model.named_modules()
            if isinstance(module, Linear) and not name.endswith((".lora_A", ".lora_B"))}


def match_targets(model: nn.Module, targets: Union[str, Sequence[str]]) -> List[str]:
    """Our names of the linear modules whose diffusers name or our name contains one of ``targets``
    (a sequence of strings, or one string: one target).

    A target that selects nothing is refused by name, with the nearest module name it may have meant;
    anything but a non-empty string or a non-empty sequence of them, in one line.
    """
    listed = [targets] if isinstance(targets, str) else targets
    if not (isinstance(listed, Sequence) and listed and all(isinstance(t, str) and t for t in listed)):
        raise ValueError(f"LoRA targets must be a non-empty string (a part of module names) or a non-empty list of "
                         f"them, got {targets!r}")
    candidates = linear_modules(model)
    chosen = []
    for target in listed:
        hits = [ours for ours, (theirs, _) in candidates.items() if target in theirs or target in ours]
        if not hits:
            names = sorted({n.split(".", 2)[2] if n.startswith("blocks.") else n
                            for ours, (theirs, _) in candidates.items() for n in (ours, theirs)})
            near = difflib.get_close_matches(target, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0]}'?" if near else f"; linear modules are named like {names[:6]}"
            raise ValueError(f"LoRA target '{target}' matches no linear module of the model (targets are parts of "
                             f"module names, diffusers' or ours){hint}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def inject_lora(model: nn.Module, targets: Union[str, Sequence[str]], rank: int, alpha: float,
                generator: Optional[torch.Generator] = None) -> List[str]:
    """Wrap the linear modules ``targets`` select (see :func:`match_targets`; one string is one target) in
    :class:`LoRALinear`, in place.

    Returns our names of the wrapped modules. The new factors are on the base weights' device and
    in their dtype, A drawn from ``generator`` (a CPU one; None: the global one), in module order;
    nothing is frozen here (see :func:`train_only_lora`).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    names = match_targets(model, targets)
    twice = [name for name in names if isinstance(model.get_submodule(name), LoRALinear)]
    if twice:
        raise ValueError(f"{twice[0]} already has a LoRA")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, generator))
    return names


def train_only_lora(model: nn.Module) -> List[nn.Parameter]:
    """Freeze every parameter but the LoRA factors; the factors, which train."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)
        if param.requires_grad:
            trainable.append(param)
    if not trainable:
        raise ValueError("the model has no LoRA factors to train: call inject_lora first")
    return trainable


def lora_layers(model: nn.Module) -> Iterator[Tuple[str, LoRALinear]]:
    """(our module name, layer) of every :class:`LoRALinear` in ``model``."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def adapter_tensors(model: nn.Module, values: Mapping[str, torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The adapter's tensors under diffusers' keys (``transformer.<module>.lora_A.weight``), float32 on the CPU.

    ``values`` (our parameter name -> tensor) replaces the model's own factors, for example with
    their EMA; absent names take the model's.
    """
    values = values or {}
    out = {}
    for name, layer in lora_layers(model):
        theirs = diffusers_module_name(name)
        for factor in ("lora_A", "lora_B"):
            key = f"{name}.{factor}.weight"
            tensor = values.get(key, getattr(layer, factor).weight).detach()
            out[f"transformer.{theirs}.{factor}.weight"] = tensor.float().cpu().contiguous()
    return out


def merged_state_dict(model: nn.Module, values: Mapping[str, torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The model's parameters under our names with every LoRA merged in (``W + (alpha / rank) B @ A``, float32),
    the layout ``from_pretrained`` reads; ``values`` (our parameter name -> tensor) replaces the model's own.

    Sharded (FSDP2) parameters are gathered: under several processes every one must call this.
    """
    values = values or {}
    state = {}
    for name, param in model.named_parameters():
        tensor = values[name] if name in values else param.detach()
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        state[name] = tensor
    for name, layer in lora_layers(model):
        down, up = state.pop(f"{name}.lora_A.weight").float(), state.pop(f"{name}.lora_B.weight").float()
        weight = state[f"{name}.weight"]
        state[f"{name}.weight"] = (weight.float() + layer.scaling * up @ down).to(weight.dtype)
    return state


def adapter_metadata(model: nn.Module) -> Dict[str, str]:
    """The safetensors metadata diffusers writes beside an adapter: rank, alpha and modules under ``transformer.``."""
    layers = list(lora_layers(model))
    ranks, alphas = {layer.rank for _, layer in layers}, {layer.alpha for _, layer in layers}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"one adapter file holds one rank and one alpha, the model has ranks {sorted(ranks)} "
                         f"and alphas {sorted(alphas)}")
    config = {"transformer.r": ranks.pop(), "transformer.lora_alpha": alphas.pop(),
              "transformer.target_modules": sorted(diffusers_module_name(n) for n, _ in layers)}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}


def save_lora_adapter(model: nn.Module, path: str, values: Mapping[str, torch.Tensor] = None) -> None:
    """Write the model's LoRA factors (or ``values`` for them, see :func:`adapter_tensors`) to the
    safetensors file ``path`` as a diffusers / PEFT adapter; written whole under a partial name, then renamed."""
    from weights_convert.partials import discard, partial_path
    from weights_convert.safetensors_io import write_file

    tensors = adapter_tensors(model, values)
    if not tensors:
        raise ValueError("the model has no LoRA layers to save")
    partial = partial_path(path)
    try:
        write_file(partial, sorted(tensors.items()), adapter_metadata(model))
        os.replace(partial, path)
    finally:
        discard(partial)
