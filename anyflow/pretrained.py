"""The AnyFlow transformers as users load them: the architectures of :mod:`anyflow.model` with checkpoints,
dtypes, LoRA, float8 weights, block offload, compiling and parallel loading added from outside.

    model = AnyFlowTransformer3DModel.from_pretrained("AnyFlow-Wan2.1-T2V-1.3B-Diffusers", dtype="bfloat16")
    far = AnyFlowFARTransformer3DModel.from_pretrained("AnyFlow-FAR-Wan2.1-1.3B-Diffusers", offload="blocks")

:class:`Pretrained` holds these, and the two public classes mix it into the architectures. Every file
format is :mod:`weights_convert`'s, which returns a config and tensors under our names; the runtime
(:mod:`anyflow.runtime`) supplies devices and precision, float8 layers, offload and parallelism.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple, Type, Union

import torch

from .model.config import AnyFlowConfig, AnyFlowFARConfig
from .model.far import AnyFlowFARTransformer
from .model.parameters import is_fp32_island
from .model.transformer import AnyFlowBackbone, AnyFlowTransformer
from .runtime.devices import configure_precision, resolve_device, resolve_dtype
from .runtime.fp8 import FLOAT8, float8_layers, holds_float8, quantise_block_linears
from .runtime.offload import check_offload, offload_blocks
from .runtime.parallel import agreed, average_island_gradients, parallelize, this_ranks_device
from .runtime.torch_support import check_torch_version

check_torch_version()

Adapters = Optional[Sequence[Union[str, Tuple[str, float]]]]


class Pretrained:
    """Checkpoints, dtypes, LoRA and compiling for an AnyFlow transformer (mixed into the architecture).

    Precision: hold the model in half precision with :meth:`to_dtype`, which keeps the parameters named
    in :data:`anyflow.model.parameters.FP32_ISLANDS` in float32.
    """

    def to_dtype(self, dtype: Union[str, torch.dtype]) -> "Pretrained":
        """Cast in place to ``dtype`` (a torch dtype or "float32", "bfloat16", "float16"), keeping the fp32
        islands in float32. Returns self. This is the one supported way to hold the model in half precision.
        """
        dtype = resolve_dtype(dtype)
        for name, param in self.named_parameters():
            if param.dtype != FLOAT8:  # scaled float8 weights (anyflow.runtime.fp8) stay float8, their layers compute in dtype
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
        lora: Adapters = None,
        lora_skip_unknown: bool = False,
        offload: Optional[str] = None,
    ) -> "Pretrained":
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
        in ``dtype`` (:mod:`anyflow.runtime.fp8`, docs/FP8.md). None keeps the checkpoint's: a scaled float8 one
        (``anyflow-convert --dtype float8_e4m3fn``) loads as float8, any other in ``dtype``.

        ``offload="blocks"``: the DiT blocks' weights stay in host memory (pinned on CUDA) and are copied to
        ``device`` one block at a time as they run, the rest of the model on ``device`` (see
        :mod:`anyflow.runtime.offload`; inference only). With ``device="cpu"`` it saves nothing and only runs
        the same logic. None (the default) puts the whole model on ``device``.
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
    def merge_lora(self, path: str, scale: float = 1.0, skip_unknown: bool = False) -> "Pretrained":
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
            raise RuntimeError("merge_lora on a parallel (FSDP) model: pass lora= to anyflow.load_parallel, "
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
    def from_state_dict(cls, config: AnyFlowConfig, state_dict: Mapping[str, torch.Tensor]) -> "Pretrained":
        """The model of ``config`` holding exactly these tensors (our names; no initialisation, no copy)."""
        with torch.device("meta"):
            model = cls(config)
            if holds_float8(state_dict):  # scaled float8 block weights and their scales (anyflow.runtime.fp8)
                quantise_block_linears(model)
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, path: str, max_shard_size: str = "5GB", force: bool = False) -> None:
        """Write our layout to folder ``path``: ``config.json`` and ``model.safetensors`` (or shards).

        An existing ``path`` is replaced only with ``force=True``, and only after the new one is complete.
        """
        from weights_convert import save_state_dict

        save_state_dict(self.config, self.state_dict(), path, max_shard_size=max_shard_size, force=force)

    def compile_blocks(self, **options: Any) -> "Pretrained":
        """Compile every DiT block with ``torch.compile(**options)``, in place; returns self.

        Regional compilation: the blocks share one compiled graph (their weights are its inputs),
        so compiling takes the time of one block, whatever the depth. The embeddings, the head and
        the samplers stay eager; timesteps reach the blocks as tensors, so one graph serves every
        step of a schedule. A new token count (another video size, a FAR chunk seeing a longer
        cache) compiles again (one or two graphs: the first block takes a fresh tensor, the others a view).
        """
        for block in self.blocks:
            block.compile(**options)
        return self


class AnyFlowTransformer3DModel(Pretrained, AnyFlowTransformer):
    """The bidirectional AnyFlow flow-map transformer (:class:`anyflow.model.transformer.AnyFlowTransformer`),
    loadable from every checkpoint layout (:class:`Pretrained`); diffusers' name for it."""


class AnyFlowFARTransformer3DModel(Pretrained, AnyFlowFARTransformer):
    """The frame-autoregressive AnyFlow transformer (:class:`anyflow.model.far.AnyFlowFARTransformer`),
    loadable from every checkpoint layout (:class:`Pretrained`); diffusers' name for it."""


def load_parallel(
    model_class: Type[Pretrained],
    path: str,
    mesh,
    dtype: Optional[Union[str, torch.dtype]] = None,
    device: Optional[Union[str, torch.device]] = None,
    *,
    shard_weights: bool = True,
    sequence_parallel: bool = True,
    lora: Adapters = None,
    lora_skip_unknown: bool = False,
) -> AnyFlowBackbone:
    """Load a checkpoint straight into a parallel model (:func:`anyflow.runtime.parallel.parallelize`): built
    on the meta device, made parallel, then each rank reads from the files only the rows of its own shards
    (no rank holds the whole model).

    ``dtype`` as in ``from_pretrained`` (None keeps the checkpoint's); ``device`` defaults to the
    mesh's device type (this rank's CUDA device when it is CUDA). ``lora`` merges LoRA adapters
    as in ``from_pretrained``, each rank computing the changes of its own rows only.
    """
    from weights_convert.lora import MergedTensor, apply_adapters
    from weights_convert.safetensors_io import torch_dtype
    from weights_convert.sources import open_checkpoint

    def open_and_check():
        checkpoint = open_checkpoint(path)  # headers only; every tensor is read below, rows at a time
        checkpoint.tensors = apply_adapters(checkpoint.tensors, lora, lora_skip_unknown)
        model_class.check_config(checkpoint.config, path)
        resolve_dtype(dtype)
        return checkpoint, (this_ranks_device(mesh) if device is None else resolve_device(device))

    checkpoint, device = agreed(open_and_check)  # one rank's error is every rank's: none waits in a collective
    if dtype is None:
        dtype = torch_dtype(checkpoint.tensors["patch_embed.proj.weight"].dtype)
    with torch.device("meta"):
        model = model_class(checkpoint.config).to_dtype(dtype)
    parallelize(model, mesh, shard_weights=shard_weights, sequence_parallel=sequence_parallel)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            lazy = checkpoint.tensors[name]
            start, stop = _local_rows(lazy.shape[0] if lazy.shape else 1, param, mesh)
            # moved as stored and cast on the device; LoRA products made there too
            piece = lazy.read_rows(start, stop, device) if isinstance(lazy, MergedTensor) else lazy.read_rows(start, stop)
            if tuple(piece.shape) != tuple(local.shape):
                raise ValueError(f"{name}: this rank's shard is {tuple(local.shape)}, the checkpoint gives "
                                 f"{tuple(piece.shape)} (an FSDP sharding this loader does not know)")
            local.copy_(piece.to(device))
    configure_precision(model.device, model.dtype)
    if shard_weights:
        average_island_gradients(model, mesh)
    return model.eval()


def _local_rows(rows: int, param, mesh) -> Tuple[int, int]:
    """The rows [start, stop) this rank holds of ``param``: FSDP2 shards dim 0 as ``torch.chunk`` does."""
    if not hasattr(param, "to_local"):
        return 0, rows
    size = -(-rows // mesh.size())  # chunk size, rounded up
    start = min(mesh.get_local_rank() * size, rows)
    return start, min(start + size, rows)
