"""How the objectives call a model: ``u(x, t, r)``, the mean velocity that carries x from t to r.

Every call passes what the authors pass: keywords, one timestep per frame (B, F), and it takes the
first output. So the objectives run on :class:`anyflow.AnyFlowTransformer3DModel` and
:class:`anyflow.AnyFlowFARTransformer3DModel` as on diffusers' models of the same names,
whose ``forward`` has the same keywords and wants per-frame timesteps.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ...model.config import check_chunk_partition


def frame_timesteps(t: torch.Tensor, frames: int) -> torch.Tensor:
    """(B,) timesteps -> (B, F), one per frame (the authors' ``repeat(t, 'b -> b f')``); (B, F) stays."""
    return t[:, None].expand(-1, frames).contiguous() if t.dim() == 1 else t


def velocity(model, latents: torch.Tensor, t: torch.Tensor, r: torch.Tensor, encoder_hidden_states,
             **far_inputs) -> torch.Tensor:
    """``u(latents, t, r)`` (B, F_out, C, H, W); t and r (B,) or (B, F) on the 1000 scale.

    ``far_inputs``: ``chunk_partition``, ``clean_hidden_states``, ``clean_timestep`` for a FAR model.
    """
    frames = latents.shape[1]
    return model(hidden_states=latents, timestep=frame_timesteps(t, frames), r_timestep=frame_timesteps(r, frames),
                 encoder_hidden_states=encoder_hidden_states, return_dict=False, **far_inputs)[0]


def match_batch(context: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Embeddings (B, S, D) for a batch of B: one row (the authors' single negative prompt) is repeated."""
    if not isinstance(context, torch.Tensor) or context.dim() != 3:
        shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"{name} must be a (B, S, text_dim) tensor, got {shape}")
    if context.shape[0] == batch:
        return context
    if context.shape[0] == 1:
        return context.expand(batch, -1, -1)
    raise ValueError(f"{name} has batch {context.shape[0]}, the latents have {batch} (give {batch} rows or 1)")


def is_far(model) -> bool:
    """Whether ``model`` is a FAR (frame-autoregressive) model: its config names a chunk partition."""
    return getattr(getattr(model, "config", None), "chunk_partition", None) is not None


def far_split(model, frames: int, chunk_partition: Optional[Sequence[int]]) -> Tuple[Tuple[int, ...], int]:
    """(the checked partition, the number of context frames): with FAR's causal training the frames
    before the last ``full_chunk_limit`` chunks are clean context; the rest are noised."""
    if not is_far(model):
        raise ValueError(f"chunk_partition is for a FAR model; {type(model).__name__} is bidirectional")
    partition = check_chunk_partition(model.config.chunk_partition if chunk_partition is None else chunk_partition,
                                      frames)
    noisy_frames = sum(partition[-model.config.full_chunk_limit:])
    return partition, frames - noisy_frames
