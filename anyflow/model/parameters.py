"""The model's parameter inventory without torch: every name and shape a config implies, and the
fp32 islands.

The converter uses it to check a checkpoint before writing a byte, without importing torch or
building the model; a test checks it against the parameters the modules actually create.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from .config import AnyFlowConfig, AnyFlowFARConfig

# Parameters kept in float32 when the model is held in half precision (matched on whole
# dotted name components): the source-time MLP, every modulation table, every affine norm.
FP32_ISLANDS = (
    "time_embed.source_time_mlp",
    "modulation",
    "cross_attn_norm",
    "image_proj.norm_in",
    "image_proj.norm_out",
)

Shape = Tuple[int, ...]

# The dtypes the model can be held in, by the names the API and the CLIs take.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto",) + DTYPE_NAMES  # what the commands' --dtype takes (auto: anyflow.runtime.devices.auto_dtype)

# The linear layers of every block (names within the block) that ``weight_dtype="float8_e4m3fn"`` holds
# as float8 e4m3 with one float32 scale per output row (:mod:`anyflow.runtime.fp8`); with it, the weight
# ``blocks.N.<linear>.weight`` has its scales beside it as ``blocks.N.<linear>.weight_scale`` (out,).
FLOAT8_LINEARS = tuple(f"{attn}.{proj}" for attn in ("self_attn", "cross_attn") for proj in "qkvo") + (
    "ffn.fc_in", "ffn.fc_out")
FLOAT8_NAME = "float8_e4m3fn"  # the one weight dtype besides the model's: weight_dtype=, --weight-dtype, --dtype
SCALE_SUFFIX = "_scale"


def is_fp32_island(param_name: str) -> bool:
    """Whether a parameter of :class:`AnyFlowTransformer3DModel` stays float32 in half precision."""
    dotted = f".{param_name}."
    return any(f".{island}." in dotted for island in FP32_ISLANDS)


def is_float8_weight(param_name: str) -> bool:
    """Whether a parameter is the weight of a block's linear layer, held in float8 with ``weight_dtype``."""
    parts = param_name.split(".")
    return (len(parts) == 5 and parts[0] == "blocks" and parts[1].isdigit() and parts[4] == "weight"
            and ".".join(parts[2:4]) in FLOAT8_LINEARS)


def _linear(name: str, fan_in: int, fan_out: int, weight_dtype: Optional[str] = None) -> Dict[str, Shape]:
    shapes = {f"{name}.weight": (fan_out, fan_in), f"{name}.bias": (fan_out,)}
    if weight_dtype is not None and is_float8_weight(f"{name}.weight"):
        shapes[f"{name}.weight{SCALE_SUFFIX}"] = (fan_out,)  # a buffer: after the layer's parameters
    return shapes


def parameter_shapes(config: AnyFlowConfig, weight_dtype: Optional[str] = None) -> Dict[str, Shape]:
    """Every parameter of the model ``config`` describes, by our name, in ``state_dict`` order.

    With ``weight_dtype="float8_e4m3fn"``, also the scales of the float8 weights (:data:`FLOAT8_LINEARS`),
    each (out,) after its layer's bias, as such a model's ``state_dict`` holds them.
    """
    if weight_dtype not in (None, FLOAT8_NAME):
        raise ValueError(f"weight_dtype must be None or {FLOAT8_NAME!r}, got {weight_dtype!r}")
    d, p = config.hidden_size, config.patch_size
    shapes: Dict[str, Shape] = {
        "patch_embed.proj.weight": (d, config.in_channels, *p),
        "patch_embed.proj.bias": (d,),
    }
    for mlp in ("source_time_mlp", "target_time_mlp"):
        shapes.update(_linear(f"time_embed.{mlp}.fc_in", config.freq_dim, d))
        shapes.update(_linear(f"time_embed.{mlp}.fc_out", d, d))
    shapes.update(_linear("time_embed.modulation_proj", d, 6 * d))
    shapes.update(_linear("text_proj.fc_in", config.text_dim, d))
    shapes.update(_linear("text_proj.fc_out", d, d))
    if config.image_dim is not None:
        e = config.image_dim
        shapes.update({"image_proj.norm_in.weight": (e,), "image_proj.norm_in.bias": (e,)})
        shapes.update(_linear("image_proj.fc_in", e, e))
        shapes.update(_linear("image_proj.fc_out", e, d))
        shapes.update({"image_proj.norm_out.weight": (d,), "image_proj.norm_out.bias": (d,)})
    for i in range(config.num_layers):
        block = f"blocks.{i}"
        shapes[f"{block}.modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            if attn == "cross_attn" and config.cross_attn_norm:
                shapes.update({f"{block}.cross_attn_norm.weight": (d,), f"{block}.cross_attn_norm.bias": (d,)})
            for proj in "qkvo":
                shapes.update(_linear(f"{block}.{attn}.{proj}", d, d, weight_dtype))
            shapes.update({f"{block}.{attn}.norm_q.weight": (d,), f"{block}.{attn}.norm_k.weight": (d,)})
        shapes.update(_linear(f"{block}.ffn.fc_in", d, config.ffn_dim, weight_dtype))
        shapes.update(_linear(f"{block}.ffn.fc_out", config.ffn_dim, d, weight_dtype))
    shapes["head.modulation"] = (1, 2, d)
    shapes.update(_linear("head.proj", d, config.out_channels * p[0] * p[1] * p[2]))
    if isinstance(config, AnyFlowFARConfig):
        shapes["far_patch_embed.proj.weight"] = (d, config.in_channels, *config.compressed_patch_size)
        shapes["far_patch_embed.proj.bias"] = (d,)
    return shapes
