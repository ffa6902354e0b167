"""The AnyFlow transformer: patchify -> dual-timestep and context embeddings -> DiT blocks -> head -> unpatchify.

:class:`AnyFlowBackbone` holds what both AnyFlow transformers share (embeddings, blocks, head,
loading, precision, the prepared context); :class:`AnyFlowTransformer3DModel` is the bidirectional
model on it, :class:`anyflow.far.AnyFlowFARTransformer3DModel` the frame-autoregressive one.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import KeyValueSlot
from .block import DiTBlock, modulate, modulation_table
from .config import AnyFlowConfig, AnyFlowFARConfig
from .context import ImageProjection, TextProjection
from .devices import configure_precision, resolve_device
from .layout import Segment, TokenPlan
from .fp8 import FLOAT8, float8_layers, holds_float8, quantise_block_linears
from .linear import Linear
from .offload import BlockOffloader, check_offload, offload_blocks
from .parameters import DTYPE_NAMES, is_fp32_island
from .patchify import PatchEmbed, unpatchify
from .rope import rope_rotations
from .sequence_parallel import gather_tokens, shard_stream
from .timestep import DualTimestepEmbedding
from .torch_support import check_torch_version

check_torch_version()

TimestepLike = Union[torch.Tensor, numbers.Real]


@dataclass
class Transformer3DOutput:
    """Output of :meth:`AnyFlowTransformer3DModel.forward`: the mean velocity (B, F, C_out, H, W)."""

    sample: torch.Tensor


@dataclass
class PreparedContext:
    """The context embedded once, with every block's cross-attention keys and values.

    Made by :meth:`AnyFlowTransformer3DModel.prepare_context`; pass it as ``encoder_hidden_states``
    to reuse it across the steps of a sampler. It belongs to the model that made it (its keys and
    values come from that model's weights): another model refuses it.
    """

    batch_size: int
    kv: List[Tuple[torch.Tensor, torch.Tensor]]
    owner: "weakref.ref[AnyFlowBackbone]"

    @staticmethod
    def cat(contexts: Sequence["PreparedContext"]) -> "PreparedContext":
        """Contexts of one model stacked along the batch (for example negative and positive prompts)."""
        owners = {id(c.owner()) for c in contexts}
        if len(owners) != 1:
            raise ValueError("cannot stack PreparedContexts made by different models")
        kv = [tuple(torch.cat(parts) for parts in zip(*layer)) for layer in zip(*(c.kv for c in contexts))]
        return PreparedContext(sum(c.batch_size for c in contexts), kv, contexts[0].owner)


class OutputHead(nn.Module):
    """Final adaLN (modulated by the mixed embedding ``rt``) and the projection to patch pixels."""

    def __init__(self, hidden_size: int, out_channels: int, patch_size: Tuple[int, int, int], eps: float):
        super().__init__()
        self.eps = eps
        self.modulation = modulation_table(2, hidden_size)
        self.proj = Linear(hidden_size, out_channels * math.prod(patch_size))

    def forward(self, x: torch.Tensor, rt: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """x (B, L, D), rt (B, F, D) one row per frame of ``segments`` -> (B, L, ph*pw*C_out)."""
        m = (self.modulation.float() + rt.float().unsqueeze(2)).unsqueeze(3)  # (B, F, 2, 1, D)
        shift, scale = m.unbind(2)
        return self.proj(modulate(x, shift, scale, self.eps, segments))


class AnyFlowBackbone(nn.Module):
    """The parts of an AnyFlow transformer that do not depend on how frames attend to each other.

    Precision: hold the model in half precision with :meth:`to_dtype`, which keeps the
    parameters named in :data:`anyflow.parameters.FP32_ISLANDS` in float32. Inputs are cast to the model's dtype.
    Set ``gradient_checkpointing = True`` to recompute each block in the backward pass.
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
        self.sequence_parallel_group = None  # set by anyflow.parallel.parallelize
        self.block_offload: Optional[BlockOffloader] = None  # set by anyflow.offload.offload_blocks

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the patch embedding (the fp32 islands aside)."""
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def to_dtype(self, dtype: Union[str, torch.dtype]) -> "AnyFlowBackbone":
        """Cast in place to ``dtype`` (a torch dtype or "float32", "bfloat16", "float16"), keeping
        :data:`anyflow.parameters.FP32_ISLANDS` in float32. Returns self.

        This is the one supported way to hold the model in bfloat16 or float16.
        """
        if isinstance(dtype, str):
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"dtype must be a torch dtype or one of {list(DTYPE_NAMES)}, got {dtype!r}")
            dtype = getattr(torch, dtype)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
        for name, param in self.named_parameters():
            if param.dtype != FLOAT8:  # scaled float8 weights (anyflow.fp8) stay float8, their layers compute in dtype
                param.data = param.data.to(torch.float32 if is_fp32_island(name) else dtype)
        configure_precision(self.device, dtype)
        return self

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: Optional[Union[str, torch.dtype]] = None,
        device: Union[str, torch.device] = "cpu",
        *,
        weight_dtype: Optional[Union[str, torch.dtype]] = None,
        lora: Optional[Sequence[Union[str, Tuple[str, float]]]] = None,
        lora_skip_unknown: bool = False,
        offload: Optional[str] = None,
    ) -> "AnyFlowBackbone":
        """Load any checkpoint :mod:`weights_convert` reads: our layout, a Hub snapshot (or its
        ``transformer`` folder), a single safetensors file, an authors' ``.pt`` (a PEFT-wrapped one
        with its LoRA merged in), a Wan2.1 base (warm start).

        ``dtype`` (a torch dtype or "float32", "bfloat16", "float16"; None keeps the checkpoint's)
        keeps the fp32 islands in float32 in half precision. Names are mapped on the fly, no
        temporary files; safetensors are mapped, not copied, where no cast is needed.

        ``lora``: LoRA adapter files, or (file, scale) pairs, merged into the weights as they are
        read (see :meth:`merge_lora`); ``lora_skip_unknown`` leaves out adapter modules this model
        does not have instead of refusing the adapter.

        ``weight_dtype="float8_e4m3fn"`` (or ``torch.float8_e4m3fn``) holds the blocks' linear weights as
        float8 with a float32 scale per row, quantised one tensor at a time as they are read; they compute
        in ``dtype`` (:mod:`anyflow.fp8`, docs/FP8.md). None keeps the checkpoint's: a scaled float8 one
        (``anyflow-convert --dtype float8_e4m3fn``) loads as float8, any other in ``dtype``.

        ``offload="blocks"``: the DiT blocks' weights stay in host memory (pinned on CUDA) and are copied to
        ``device`` one block at a time as they run, the rest of the model on ``device`` (see
        :mod:`anyflow.offload`; inference only). With ``device="cpu"`` it saves nothing and only runs the same
        logic. None (the default) puts the whole model on ``device``.
        """
        from weights_convert import load_checkpoint  # reads every layout into (config, tensors under our names)

        device = resolve_device(device)
        offload = check_offload(offload)
        config, state_dict = load_checkpoint(path, dtype=dtype, device="cpu" if offload else device, lora=lora,
                                             lora_skip_unknown=lora_skip_unknown, weight_dtype=weight_dtype)
        cls.check_config(config, path)
        model = cls.from_state_dict(config, state_dict)
        configure_precision(device, model.dtype)  # float16 on CUDA: float32 partial sums in matmuls
        return model if offload is None else offload_blocks(model, device)

    @torch.no_grad()
    def merge_lora(self, path: str, scale: float = 1.0, skip_unknown: bool = False) -> "AnyFlowBackbone":
        """Merge the LoRA adapter at ``path`` into the weights, in place; returns self.

        Formats (recognised from the keys): diffusers / PEFT, Wan2.1 original / ComfyUI (with
        ``.diff`` and ``.diff_b`` deltas), musubi-tuner; see :mod:`weights_convert.lora`. Each
        changed weight becomes ``W + scale * (alpha / rank) * B @ A``, computed in float32 and
        rounded once to its dtype (a scaled float8 weight is dequantised, and quantised again with new
        scales); one parameter at a time, no copy of the model. The whole
        adapter (names, shapes, values) is checked first: on any error the model is untouched.
        ``skip_unknown`` leaves out adapter modules this model does not have (for example the image
        cross-attention of a Wan2.1 image-to-video LoRA) instead of refusing the adapter.
        """
        from weights_convert.lora import normalize_lora, open_adapter

        [(path, scale)] = normalize_lora([(path, scale)])
        parameters = dict(self.named_parameters())
        if any(hasattr(p, "to_local") for p in parameters.values()):
            raise RuntimeError("merge_lora on a parallel (FSDP) model: pass lora= to anyflow.parallel.load_parallel, "
                               "or merge before parallelize")
        shapes = {name: tuple(p.shape) for name, p in parameters.items()}
        adapter = open_adapter(path)
        adapter.check(shapes, skip_unknown)
        float8 = float8_layers(self)
        for name, delta, part in adapter.targets(shapes):
            param = parameters[name]
            change = delta.change(part, shapes[name], scale, device=param.device)  # float32, made on the device
            if name in float8:
                float8[name].add_to_weight_(change)  # dequantised, summed in float32, quantised again
            else:
                param.copy_(change.add_(param))  # the sum made in float32, rounded once
        return self

    @classmethod
    def check_config(cls, config: AnyFlowConfig, path: str) -> None:
        """Refuse the checkpoint at ``path`` when its config is the other model's."""
        if type(config) is not cls.config_class:
            far = isinstance(config, AnyFlowFARConfig)
            raise ValueError(
                f"{path}: an AnyFlow {'FAR (frame-autoregressive)' if far else 'bidirectional'} checkpoint; load it with "
                f"{'AnyFlowFARTransformer3DModel' if far else 'AnyFlowTransformer3DModel'}"
                + ("" if far else " (or warm-start a FAR model from it: anyflow-convert SRC OUT --far)")
            )

    @classmethod
    def from_state_dict(cls, config: AnyFlowConfig, state_dict: Mapping[str, torch.Tensor]) -> "AnyFlowBackbone":
        """The model of ``config`` holding exactly these tensors (our names; no initialisation, no copy)."""
        with torch.device("meta"):
            model = cls(config)
            if holds_float8(state_dict):  # scaled float8 block weights and their scales (anyflow.fp8)
                quantise_block_linears(model)
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, path: str, max_shard_size: str = "5GB", force: bool = False) -> None:
        """Write our layout to folder ``path``: ``config.json`` and ``model.safetensors`` (or shards).

        An existing ``path`` is replaced only with ``force=True``, and only after the new one is complete.
        """
        from weights_convert import save_state_dict

        save_state_dict(self.config, self.state_dict(), path, max_shard_size=max_shard_size, force=force)

    def compile_blocks(self, **options: Any) -> "AnyFlowBackbone":
        """Compile every DiT block with ``torch.compile(**options)``, in place; returns self.

        Regional compilation: the blocks share one compiled graph (their weights are its inputs),
        so compiling takes the time of one block, whatever the depth. The embeddings, the head and
        the samplers stay eager; timesteps reach the blocks as tensors, so one graph serves every
        step of a schedule. A new token count (another video size, a FAR chunk seeing a longer
        cache) compiles once more.
        """
        for block in self.blocks:
            block.compile(**options)
        return self

    def set_ffn_chunking(self, tokens_per_chunk: Optional[int] = None) -> "AnyFlowBackbone":
        """Run every block's feed-forward on at most ``tokens_per_chunk`` tokens at a time; returns self.

        None (the default) chunks on CPUs only (:data:`anyflow.block.CPU_TOKENS_PER_CHUNK`), where it
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

    def prepare_context(
        self, encoder_hidden_states: torch.Tensor, encoder_hidden_states_image: Optional[torch.Tensor] = None
    ) -> PreparedContext:
        """Embed text (B, S, text_dim) and image (B, S_img, image_dim) tokens and project every
        block's cross-attention keys and values, once."""
        context = self._embed_context(encoder_hidden_states, encoder_hidden_states_image)
        with self._blocks_in_turn() as blocks:
            kv = [block.context_kv(context) for block in blocks]
        return PreparedContext(context.shape[0], kv, weakref.ref(self))

    def _embed_context(self, text: torch.Tensor, image: Optional[torch.Tensor]) -> torch.Tensor:
        """Checked text (B, S, text_dim) and image (B, S_img, image_dim) tokens -> context (B, S_img + S, D)."""
        self._check_context(text, image)
        context = self.text_proj(text.to(self.device, self.dtype))  # (B, S, D)
        if image is not None:
            context = torch.cat([self.image_proj(image.to(self.device, self.dtype)), context], dim=1)  # image first
        return context

    def _context(self, encoder_hidden_states, encoder_hidden_states_image, batch: int):
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
            raise ValueError(
                f"batch sizes disagree: hidden_states has {batch}, encoder_hidden_states has {context_batch}"
            )
        return context

    def _run_blocks(
        self,
        stream: List[torch.Tensor],
        context: Union[torch.Tensor, PreparedContext],
        mod: torch.Tensor,
        plan: TokenPlan,
        slots: Optional[Sequence[KeyValueSlot]] = None,
    ) -> torch.Tensor:
        """Every block on the tokens (B, L, D) that ``stream``, a one-element list, hands over; returns
        the last block's output. The tokens are taken out of the list, so that no reference of the
        caller keeps them alive while the blocks run (one (L, D) activation less at the peak).
        ``slots``: where each block keeps its self-attention keys and values
        (:class:`anyflow.attention.KeyValueSlot`)."""
        x = stream.pop()
        with self._blocks_in_turn() as blocks:
            for i, block in enumerate(blocks):
                block_context = context.kv[i] if isinstance(context, PreparedContext) else context
                slot = None if slots is None else slots[i]
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, block_context, mod, plan, slot, use_reentrant=False)
                else:
                    x = block(x, block_context, mod, plan, slot)
        return x

    def _blocks_in_turn(self):
        """A context giving the blocks in order; with block offload (:mod:`anyflow.offload`) each holds its
        weights on the device only while it is used."""
        return contextlib.nullcontext(self.blocks) if self.block_offload is None else self.block_offload.in_turn()

    def _check_latents(self, latents: torch.Tensor) -> Tuple[int, int, int]:
        """Validate (B, F, C, H, W) latents; return the patch grid (F, H/ph, W/pw)."""
        cfg = self.config
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"hidden_states must be a 5-D tensor (B, F, C, H, W), got {shape}")
        b, f, c, h, w = latents.shape
        if c != cfg.in_channels:
            raise ValueError(
                f"hidden_states has {c} channels at dim 2 of shape {tuple(latents.shape)}, the model expects "
                f"in_channels={cfg.in_channels} (layout is (B, F, C, H, W))"
            )
        _, ph, pw = cfg.patch_size
        if h % ph or w % pw:
            raise ValueError(f"hidden_states height x width {h}x{w} is not divisible by the patch {ph}x{pw}")
        if min(b, f, h, w) == 0:
            raise ValueError(f"hidden_states has an empty dimension: shape {tuple(latents.shape)}")
        grid = (f, h // ph, w // pw)
        if max(grid) > cfg.rope_max_seq_len:
            raise ValueError(
                f"patch grid (frames, rows, columns) = {grid} exceeds rope_max_seq_len={cfg.rope_max_seq_len}"
            )
        return grid

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

    def _check_context(self, text: torch.Tensor, image: Optional[torch.Tensor]) -> None:
        cfg = self.config
        if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[-1] != cfg.text_dim:
            shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"encoder_hidden_states must be (B, S, text_dim={cfg.text_dim}), got {shape}")
        if cfg.image_dim is None:
            if image is not None:
                raise ValueError(
                    "encoder_hidden_states_image was given but this model has no image projection (image_dim=None)"
                )
            return
        if image is None:
            raise ValueError(f"this model has image_dim={cfg.image_dim}: encoder_hidden_states_image is required")
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[-1] != cfg.image_dim:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"encoder_hidden_states_image must be (B, S_img, image_dim={cfg.image_dim}), got {shape}")
        if image.shape[0] != text.shape[0]:
            raise ValueError(
                f"batch sizes disagree: encoder_hidden_states has {text.shape[0]}, "
                f"encoder_hidden_states_image has {image.shape[0]}"
            )

    def _timestep_grid(self, value: TimestepLike, name: str, batch: int, frames: int) -> torch.Tensor:
        """A number, 0-d, (B,) or (B, F) timestep -> finite float (B, F) on the model's device.

        Nothing here waits for the device: a number is checked on the host and filled in on the
        device (no host-to-device copy); a tensor is checked only where it lives on the host (a
        device tensor's check would wait for the device: the samplers make their timesteps from a
        schedule checked on the host). A tensor keeps one compiled graph for every timestep value.
        """
        if isinstance(value, bool) or not isinstance(value, (torch.Tensor, numbers.Real)):
            raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
        if not isinstance(value, torch.Tensor):
            if not math.isfinite(value):
                raise ValueError(f"{name} has non-finite values: {value}")
            return torch.full((batch, frames), float(value), dtype=torch.float32, device=self.device)
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be real-valued, got dtype {value.dtype}")
        if value.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.isfinite(value).all():
            raise ValueError(f"{name} has non-finite values: {value.tolist()}")
        # float64 stays float64 until the sinusoid, so that t - r is formed as precisely as given
        tensor = value.to(self.device, torch.float64 if value.dtype == torch.float64 else torch.float32)
        if tensor.dim() == 1:
            tensor = tensor[:, None]  # (B,) -> (B, 1): one timestep per sample
        try:
            return torch.broadcast_to(tensor, (batch, frames))
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(value.shape)} does not broadcast to (B, F) = "
                f"({batch}, {frames}); give a number, a (B,) or a (B, F) tensor"
            ) from None


class AnyFlowTransformer3DModel(AnyFlowBackbone):
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
        encoder_hidden_states: Union[torch.Tensor, PreparedContext],
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
            raise ValueError(
                f"attention_kwargs is not supported (no attention processors or LoRA here), got keys "
                f"{sorted(attention_kwargs)}"
            )
        grid = self._check_latents(hidden_states)
        batch, frames = hidden_states.shape[:2]
        context = self._context(encoder_hidden_states, encoder_hidden_states_image, batch)
        t = self._timestep_grid(timestep, "timestep", batch, frames)
        r = self._timestep_grid(r_timestep, "r_timestep", batch, frames)

        x = self.patch_embed(hidden_states.to(self.device, self.dtype))  # (B, L, D)
        rt, mod = self.time_embed(t, r, self.dtype)  # (B, F, D), (B, F, 6, D)
        segments = ((grid[0], grid[1] * grid[2]),)  # one segment: every frame has h*w tokens
        rope = rope_rotations(grid, self.config.attention_head_dim, x.device)  # (L, 1, d/2, 2)
        split = None
        if self.sequence_parallel_group is not None:  # this rank's tokens only (anyflow.parallel)
            if torch.is_grad_enabled():
                raise RuntimeError("sequence parallelism runs inference only: call the model under torch.no_grad() "
                                   "(to train, shard the weights alone)")
            x, segments, rope, (rt, mod), split = shard_stream(self.sequence_parallel_group, x, segments, rope, (rt, mod))
        stream = [x]
        del x  # handed over to the blocks (see _run_blocks)
        x = self._run_blocks(stream, context, mod, TokenPlan(segments, rope, sequence=split))
        out = self.head(x, rt, segments)  # (B, L, ph*pw*C_out)
        if split is not None:
            out = gather_tokens(out, split)
        velocity = unpatchify(out, grid, self.config.patch_size)  # (B, F, C_out, H, W)
        return Transformer3DOutput(velocity) if return_dict else (velocity,)
