"""The AnyFlow transformer: patchify -> dual-timestep and context embeddings -> DiT blocks -> head -> unpatchify.

:class:`AnyFlowBackbone` holds what both AnyFlow transformers share (the embeddings, the blocks,
the head, the prepared context); :class:`AnyFlowTransformer` is the bidirectional model on it,
:class:`anyflow.model.far.AnyFlowFARTransformer` the frame-autoregressive one. Loading, saving,
LoRA, float8 weights, offload and compiling are added from outside: the classes users load
checkpoints with, ``anyflow.AnyFlowTransformer3DModel`` and ``anyflow.AnyFlowFARTransformer3DModel``,
are these with :class:`anyflow.pretrained.Pretrained` mixed in.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import KeyValue, KeyValueSlot, TokenPlan
from .block import DiTBlock, OutputHead
from .checks import TimestepLike, check_context, check_latents, timestep_grid
from .config import AnyFlowConfig
from .embeddings import DualTimestepEmbedding, ImageProjection, PatchEmbed, TextProjection, unpatchify
from .rope import rope_rotations


@dataclass
class Transformer3DOutput:
    """Output of a transformer's ``forward``: the mean velocity (B, F, C_out, H, W)."""

    sample: torch.Tensor


@dataclass
class PreparedContext:
    """The context embedded once, with every block's cross-attention keys and values.

    Made by :meth:`AnyFlowBackbone.prepare_context`; pass it as ``encoder_hidden_states`` to reuse it
    across the steps of a sampler. It belongs to the model that made it (its keys and values come
    from that model's weights): another model refuses it.
    """

    batch_size: int
    kv: List[KeyValue]
    owner: "weakref.ref[AnyFlowBackbone]"

    @staticmethod
    def cat(contexts: Sequence["PreparedContext"]) -> "PreparedContext":
        """Contexts of one model stacked along the batch (for example negative and positive prompts)."""
        owners = {id(c.owner()) for c in contexts}
        if len(owners) != 1:
            raise ValueError("cannot stack PreparedContexts made by different models")
        kv = [tuple(torch.cat(parts) for parts in zip(*layer)) for layer in zip(*(c.kv for c in contexts))]
        return PreparedContext(sum(c.batch_size for c in contexts), kv, contexts[0].owner)


Context = Union[torch.Tensor, PreparedContext]


class AnyFlowBackbone(nn.Module):
    """The parts of an AnyFlow transformer that do not depend on how frames attend to each other.

    Inputs are cast to the model's dtype (that of the patch embedding; the fp32 islands of
    :data:`anyflow.model.parameters.FP32_ISLANDS` aside). Set ``gradient_checkpointing = True`` to
    recompute each block in the backward pass.
    """

    config_class = AnyFlowConfig

    def __init__(self, config: AnyFlowConfig):
        super().__init__()
        if type(config) is not self.config_class:
            raise TypeError(f"{type(self).__name__} takes an {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        d = config.hidden_size
        self.patch_embed = PatchEmbed(config.in_channels, d, config.patch_size)
        self.time_embed = DualTimestepEmbedding(config.freq_dim, d, config.gate_value, config.deltatime_type)
        self.text_proj = TextProjection(config.text_dim, d)
        self.image_proj = ImageProjection(config.image_dim, d) if config.image_dim is not None else None
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_attention_heads, config.ffn_dim, config.cross_attn_norm, config.eps)
            for _ in range(config.num_layers)
        )
        self.head = OutputHead(d, config.out_channels, config.patch_size, config.eps)
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the patch embedding (the fp32 islands aside)."""
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def prepare_context(self, encoder_hidden_states: torch.Tensor,
                        encoder_hidden_states_image: Optional[torch.Tensor] = None) -> PreparedContext:
        """Embed text (B, S, text_dim) and image (B, S_img, image_dim) tokens and project every
        block's cross-attention keys and values, once."""
        context = self._embed_context(encoder_hidden_states, encoder_hidden_states_image)
        return PreparedContext(context.shape[0], [block.context_kv(context) for block in self.blocks], weakref.ref(self))

    def _embed_context(self, text: torch.Tensor, image: Optional[torch.Tensor]) -> torch.Tensor:
        """Checked text (B, S, text_dim) and image (B, S_img, image_dim) tokens -> context (B, S_img + S, D)."""
        check_context(self.config, text, image)
        context = self.text_proj(text.to(self.device, self.dtype))  # (B, S, D)
        if image is not None:
            context = torch.cat([self.image_proj(image.to(self.device, self.dtype)), context], dim=1)  # image first
        return context

    def _context(self, encoder_hidden_states: Context, encoder_hidden_states_image: Optional[torch.Tensor],
                 batch: int) -> Context:
        """The context of a forward: a checked :class:`PreparedContext`, or the embedded context (B, S, D)."""
        if isinstance(encoder_hidden_states, PreparedContext):
            if encoder_hidden_states_image is not None:
                raise ValueError("encoder_hidden_states_image must be None when passing a PreparedContext")
            self._check_prepared(encoder_hidden_states)
            context, context_batch = encoder_hidden_states, encoder_hidden_states.batch_size
        else:
            # raw embeddings: each block's keys and values are made just before the block, so
            # only one block's are alive at a time (a PreparedContext holds every block's)
            context = self._embed_context(encoder_hidden_states, encoder_hidden_states_image)
            context_batch = context.shape[0]
        if context_batch != batch:
            raise ValueError(f"batch sizes disagree: hidden_states has {batch}, encoder_hidden_states has {context_batch}")
        return context

    def _check_prepared(self, prepared: PreparedContext) -> None:
        """A PreparedContext must come from this model, in its current dtype and device."""
        if prepared.owner() is not self:
            raise ValueError(
                "encoder_hidden_states is a PreparedContext made by another model (its keys and values come from "
                "that model's weights); make one with this model's prepare_context"
            )
        key = prepared.kv[0][0]
        if key.dtype != self.dtype or key.device != self.device:
            raise ValueError(
                f"the PreparedContext holds {key.dtype} on {key.device} but the model is now {self.dtype} on "
                f"{self.device}; prepare it again after moving or casting the model"
            )

    def _timesteps(self, timestep: TimestepLike, r_timestep: TimestepLike, batch: int,
                   frames: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """t and r as (B, F) float tensors on the model's device."""
        return (timestep_grid(timestep, "timestep", batch, frames, self.device),
                timestep_grid(r_timestep, "r_timestep", batch, frames, self.device))

    def _run_blocks(
        self,
        tokens: List[torch.Tensor],
        context: Context,
        time_modulation: torch.Tensor,
        plan: TokenPlan,
        slots: Optional[Sequence[KeyValueSlot]] = None,
    ) -> torch.Tensor:
        """Every block on the tokens (B, L, D); returns the last block's output.

        ``tokens`` is a one-element list the tokens are taken out of, so that no reference of the
        caller keeps them alive while the blocks run (one (L, D) activation less at the peak).
        ``slots``: where each block keeps its self-attention keys and values (:class:`KeyValueSlot`).
        """
        x = tokens.pop()
        for i, block in enumerate(self.blocks):
            block_context = context.kv[i] if isinstance(context, PreparedContext) else context
            slot = None if slots is None else slots[i]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, block_context, time_modulation, plan, slot, use_reentrant=False)
            else:
                x = block(x, block_context, time_modulation, plan, slot)
        return x

    def set_ffn_chunking(self, tokens_per_chunk: Optional[int] = None) -> "AnyFlowBackbone":
        """Run every block's feed-forward on at most ``tokens_per_chunk`` tokens at a time; returns self.

        None (the default) chunks on CPUs only (:data:`anyflow.model.block.CPU_TOKENS_PER_CHUNK`), where it
        bounds the peak memory at a small cost; on a GPU all tokens go at once, which is faster. A
        number chunks on any device (on a GPU short of memory, for example: the hidden activation
        is tokens x ffn_dim, about 0.9 GB at 14B 480p in bfloat16 per 32,760 tokens).
        """
        if tokens_per_chunk is not None and (isinstance(tokens_per_chunk, bool) or not isinstance(tokens_per_chunk, int)
                                             or tokens_per_chunk < 1):
            raise ValueError(f"tokens_per_chunk must be a positive int or None, got {tokens_per_chunk!r}")
        for block in self.blocks:
            block.ffn.tokens_per_chunk = tokens_per_chunk
        return self

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (saves memory when training)."""
        self.gradient_checkpointing = enabled


class AnyFlowTransformer(AnyFlowBackbone):
    """The bidirectional AnyFlow flow-map transformer (Wan2.1 DiT with a dual-timestep embedding).

    ``forward`` predicts the mean velocity ``u`` that carries latents from timestep t to r:
    ``z_r = z_t - (sigma_t - sigma_r) * u`` with ``t = 1000 * sigma``; every token attends to
    every token of the video.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: TimestepLike,
        r_timestep: TimestepLike,
        encoder_hidden_states: Context,
        encoder_hidden_states_image: Optional[torch.Tensor] = None,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = True,
    ) -> Union[Transformer3DOutput, Tuple[torch.Tensor]]:
        """Mean velocity from timestep t to r.

        Args:
            hidden_states: latents (B, F, C_in, H, W), frames before channels.
            timestep: source timestep t in [0, 1000]: a number, a 0-d or (B,) tensor, or (B, F).
            r_timestep: target timestep r, same forms as ``timestep``.
            encoder_hidden_states: UMT5 embeddings (B, S, text_dim), or a :class:`PreparedContext`.
            encoder_hidden_states_image: image tokens (B, S_img, image_dim) when ``image_dim`` is set.
            attention_kwargs: accepted for diffusers compatibility; must be None or empty.
            return_dict: return a :class:`Transformer3DOutput` (else a 1-tuple).

        Returns:
            The velocity (B, F, C_out, H, W) in the model's dtype.
        """
        if attention_kwargs:
            raise ValueError(f"attention_kwargs is not supported (no attention processors or LoRA here), got keys "
                             f"{sorted(attention_kwargs)}")
        grid = check_latents(self.config, hidden_states)
        batch, frames = hidden_states.shape[:2]
        context = self._context(encoder_hidden_states, encoder_hidden_states_image, batch)
        t, r = self._timesteps(timestep, r_timestep, batch, frames)

        tokens = [self.patch_embed(hidden_states.to(self.device, self.dtype))]  # (B, L, D), taken by the blocks
        time_embedding, time_modulation = self.time_embed(t, r, self.dtype)  # (B, F, D), (B, F, 6, D)
        segments = ((grid[0], grid[1] * grid[2]),)  # one segment: every frame has h*w tokens
        plan = TokenPlan(segments, rope_rotations(grid, self.config.attention_head_dim, self.device))
        x = self._run_blocks(tokens, context, time_modulation, plan)
        out = self.head(x, time_embedding, segments)  # (B, L, ph*pw*C_out)
        velocity = unpatchify(out, grid, self.config.patch_size)  # (B, F, C_out, H, W)
        return Transformer3DOutput(velocity) if return_dict else (velocity,)
